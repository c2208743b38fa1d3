"""What the branch reads of the cached levels: the results of its parameter-free first steps.

From K levels [B, T, N, D] (N = 1 + H*W, CLS first):
    cells        K x [B, T, 1 + cells, D] float16: LayerNorm (no affine, float32), then the
                 patch grid averaged in cell x cell cells; CLS normalised, kept first
    similarity   [B, T, H, W, K*G, (2r+1)^2] float32 or None: cosine of every patch (per
                 channel group, after LayerNorm) to its neighbours within r in frame t-1
    cls          K x [B, T, D] float32: the raw CLS token
    token_mean   K x [B, T, D] float32: the raw mean over all N tokens
A full store's levels go through `branch_inputs` on the training device; a compact store
holds these results (`mad.cache.compact`), so both give the branch the same inputs, up to
the compact store's 8-bit values. Nothing here is trained: gradients never flow into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class BranchInputs:
    cells: list[torch.Tensor]
    cls: list[torch.Tensor]
    token_mean: list[torch.Tensor]
    similarity: torch.Tensor | None = None

    def to(self, device) -> "BranchInputs":
        move = lambda xs: [x.to(device, non_blocking=True) for x in xs]  # noqa: E731
        return BranchInputs(move(self.cells), move(self.cls), move(self.token_mean),
                            None if self.similarity is None else self.similarity.to(device, non_blocking=True))


def average_cells(x: torch.Tensor, cell: int) -> torch.Tensor:
    """Average the square patch grid of [B, T, 1+H*W, C] tokens in `cell` x `cell` cells (CLS kept):
    [B, T, 1+H'*W', C].

    A grid side that `cell` does not divide keeps a smaller last row and column,
    averaged over the patches it has (14 -> 7, 16 -> 8, 7 -> 4).
    """
    if cell == 1:
        return x
    B, T, N, C = x.shape
    side = math.isqrt(N - 1)
    grid = x[:, :, 1:].reshape(B * T, side, side, C).permute(0, 3, 1, 2)  # [B*T, C, H, W]
    grid = F.avg_pool2d(grid, cell, ceil_mode=True)  # [B*T, C, H', W']
    patches = grid.flatten(2).transpose(1, 2).reshape(B, T, -1, C)  # [B, T, H'*W', C]
    return torch.cat([x[:, :, :1], patches], dim=2)


def by_clips(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) for an fn that works clip by clip, run on a few clips at a time on CPU, so its temporaries stay small.

    glibc serves allocations over 32 MiB straight from the kernel and gives them
    back on free, so every full-grid float32 temporary of a whole batch (38 MiB per
    ViT-B level at batch 8) would cost fresh zeroed pages (README, "Where mad departs").
    CUDA's caching allocator has no such cost, so there it is one call.
    """
    if x.is_cuda or x.dim() < 2:
        return fn(x)
    clip_bytes = 4 * x[0].numel()  # as float32; pieces of about 8 MiB
    step = max(1, (8 << 20) // clip_bytes)
    return torch.cat([fn(x[i:i + step]) for i in range(0, x.shape[0], step)]) if step < x.shape[0] else fn(x)


def normalized_cells(x: torch.Tensor, cell: int, eps: float = 1e-5) -> torch.Tensor:
    """[B, T, N, D] -> float16 [B, T, 1 + cells, D]: LayerNorm without affine (float32), then cells."""
    return by_clips(lambda clips: average_cells(F.layer_norm(clips.float(), clips.shape[-1:], eps=eps), cell).half(),
                    x)


def match_similarity(x: torch.Tensor, radius: int, groups: int) -> torch.Tensor:
    """[B, T, N, D] -> [B, T, H, W, G, (2r+1)^2]: cosine of each patch to the (2r+1)^2 around it in frame t-1.

    Per channel group, after LayerNorm; frame 0 is matched with itself; zero features around the grid.
    """
    B, T, N, D = x.shape
    side = math.isqrt(N - 1)

    def clips(x):
        b = x.shape[0]
        y = F.layer_norm(x[:, :, 1:].float(), (D,)).view(b, T, side, side, groups, D // groups)
        y = F.normalize(y, dim=-1)  # [b, T, H, W, G, c]
        prev = torch.cat([y[:, :1], y[:, :-1]], dim=1)  # frame t-1
        prev = F.pad(prev, (0, 0, 0, 0, radius, radius, radius, radius))  # [b, T, H+2r, W+2r, G, c]
        return torch.stack([(y * prev[:, :, dy:dy + side, dx:dx + side]).sum(-1)  # [b, T, H, W, G]
                            for dy in range(2 * radius + 1) for dx in range(2 * radius + 1)], dim=-1)

    return by_clips(clips, x)


def resolve_cell_size(setting, num_tokens: int) -> int:
    """`cell_size` as a number: "auto" takes the largest cell that leaves at least 7 cells per grid side.

    7 x 7 is the grid of a ViT-B/32 at 224 px, the grid CLIP video models are commonly
    trained on: a ViT-B/16's 14 x 14 is averaged to it, a ViT-L/14's 16 x 16 to 8 x 8;
    finer grids stay as they are. A grid that is not square keeps every patch.
    """
    if str(setting) == "auto":
        side = math.isqrt(num_tokens - 1)
        return max(1, side // 7) if side * side == num_tokens - 1 else 1
    try:
        cell = int(setting)
    except ValueError:
        cell = 0
    if cell < 1:
        raise ValueError(f"cell_size {setting!r}: give auto, 1 (every patch) or more")
    return cell


@torch.no_grad()
def branch_inputs(levels: list[torch.Tensor], cell: int = 1, radius: int = 0, groups: int = 4,
                  cells: bool = True) -> BranchInputs:
    """What the branch reads of full levels (see the module docstring); `radius` 0: no similarity,
    `cells` False: no cells (the baselines read only cls and token_mean).

    Always in float32 (cells stored as float16), also inside a training step's autocast: these are the
    values a compact store holds, and CPU autocast cannot even concatenate float16 tensors.
    """
    with torch.autocast(levels[0].device.type, enabled=False):
        return _branch_inputs(levels, cell, radius, groups, cells)


def _branch_inputs(levels, cell, radius, groups, cells) -> BranchInputs:
    return BranchInputs(
        cells=[normalized_cells(x, cell) for x in levels] if cells else [],
        cls=[x[:, :, 0].float() for x in levels],
        token_mean=[x.mean(dim=2, dtype=torch.float32) for x in levels],
        similarity=torch.cat([match_similarity(x, radius, groups) for x in levels], dim=-2) if radius else None,
    )
