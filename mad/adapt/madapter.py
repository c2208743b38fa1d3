"""The M-adapter branch over cached levels of a frozen image model, (the madapter family).

M-adapter (Li et al., CVIU 2024) trains a small branch *beside* a frozen image
model: it reads the outputs of several of its layers and never backpropagates
into it. Here those outputs come from the cache. Input: K levels, shallow to
deep, each [B, T, N, D] (N = 1 + H*W tokens, CLS first). Output: logits [B, C].

    madapter   per-level projection (averaged in cells) -> hierarchical gated fusion
               -> + motion + correlation -> + time embedding
               -> depth x Block(attention within a frame, temporal module, MLP)
               -> mean over tokens and time + deepest CLS -> head
    (the static baselines meanpool and linear: `mad.adapt.baselines`; EVL: `mad.adapt.evl`)

The temporal module is a residual depthwise convolution over T ("conv", the
paper's choice) or attention over T ("attn"), per token; attention within the
frame comes first so each token also knows its neighbourhood.

Ours, beside the paper (evidence in the README, "Where mad departs"): `Motion`
(the normalised frame-to-frame change of every token) and `Correlation` (where
each patch's content came from in the previous frame) are added to the fused
tokens; the branch averages each level's patch grid in cells of `cell_size` x
`cell_size` patches right after LayerNorm, so its projections and blocks run on
fewer tokens while the correlation still matches patches on the full grid.

The layers it shares with other families (fusion, attention, MLP, head) are in `mad.adapt.layers`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mad.adapt.branch import BranchConfig, ConfigError, Family, check_positive, register
from mad.adapt.layers import Attention, Dropout, GatedFusion, Head, LevelProjection, Mlp
from mad.cache import compact
from mad.cache.inputs import BranchInputs, average_cells, branch_inputs, match_similarity, resolve_cell_size
from mad.cache.manifest import Manifest

TEMPORAL = ("conv", "conv3d", "attn", "none")


class Motion(nn.Module):
    """Frame-to-frame change of every token, normalised and projected: LayerNorm(h_t - h_{t-1}) -> Linear.

    Within a clip, appearance (colours, background, texture) is nearly constant and
    makes up most of each token; what moves is a small change on top of it. The
    LayerNorm puts that change at unit scale, so the blocks see motion as clearly as
    appearance. Zero at t = 0.
    """

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, h):  # [B, T, N, d]
        change = h - torch.cat([h[:, :1], h[:, :-1]], dim=1)  # h_t - h_{t-1}; 0 at t = 0
        return self.proj(self.norm(change))


class Correlation(nn.Module):
    """Where each patch came from: its match to the patches around it in the previous frame.

    For every patch at frame t and every offset (dy, dx) within `radius`, the cosine
    similarity of its feature to the one at (y+dy, x+dx) in frame t-1, per level and
    channel group (the cost volume of optical-flow networks and of correlation networks
    for video, Wang et al. CVPR 2020). A softmax over the offsets, with a learned
    temperature, turns them into match probabilities p: a local flow estimate that
    does not depend on what the object looks like. The projected input is
    [p, p*x, p*y], with (x, y) the patch's position in [-1, 1]: the branch ends in a
    mean over tokens, and the mean of a linear map of these is a linear map of the
    flow field's moments: its mean (translation) and its position-weighted terms
    (divergence = zoom, curl = rotation, shear): without them a mean over tokens cannot
    tell clockwise from anticlockwise motion. CLS gets zeros.

    The matches (`mad.cache.inputs.match_similarity`) are taken on the cached levels
    (LayerNorm, no projection) at their full grid, so a branch that averages the grid
    in cells still sees motion of one patch; the features are averaged into the cells
    before the projection (the mean of position-weighted terms keeps the moments).
    """

    def __init__(self, num_levels: int, in_width: int, width: int, radius: int = 1, groups: int = 4, cell: int = 1):
        super().__init__()
        if in_width % groups:
            raise ValueError(f"level width {in_width} is not divisible by {groups} correlation groups")
        self.radius, self.groups, self.cell = radius, groups, cell
        self.temperature = nn.Parameter(torch.tensor(10.0))  # cosine similarities are in [-1, 1]; sharpen them
        self.proj = nn.Linear(3 * num_levels * groups * (2 * radius + 1) ** 2, width)

    def match(self, levels: list[torch.Tensor]) -> torch.Tensor:  # K x [B, T, N, D] -> [B, T, H, W, K*G, (2r+1)^2]
        with torch.no_grad():  # matches are read, not trained through
            return torch.cat([match_similarity(x, self.radius, self.groups) for x in levels], dim=-2)

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:  # [B, T, H, W, K*G, (2r+1)^2] -> [B, T, N', d]
        B, T, side = similarity.shape[:3]
        # softmax over the offsets laid out first: on CPU much faster than over a last dim of 9
        p = torch.softmax((similarity * self.temperature).movedim(-1, 0).contiguous(), dim=0).movedim(0, -1)
        coords = torch.linspace(-1, 1, side, device=p.device, dtype=p.dtype)
        ys, xs = coords.view(side, 1, 1, 1), coords.view(1, side, 1, 1)
        features = torch.cat([p, p * xs, p * ys], dim=-1).reshape(B, T, side * side, -1)  # [B, T, H*W, F]
        if self.cell > 1:  # into the branch's cells: [B, T, H'*W', F]
            features = average_cells(F.pad(features, (0, 0, 1, 0)), self.cell)[:, :, 1:]
        y = self.proj(features)  # [B, T, H'*W', d]
        return torch.cat([torch.zeros_like(y[:, :, :1]), y], dim=2)


class TemporalConv(nn.Module):
    """Residual depthwise convolution over T, per token and channel.

    LayerNorm -> depthwise Conv1d over T -> GELU -> Linear. The GELU matters: a
    purely linear filter followed by mean pooling over time is (up to the borders)
    blind to the order of frames. The output Linear starts at zero, so the module
    starts as the identity and the branch starts as a per-frame model.
    """

    def __init__(self, width: int, kernel_size: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # [B, T, N, d]
        B, T, N, C = x.shape
        y = self.norm(x).permute(0, 2, 3, 1).reshape(B * N, C, T)  # one sequence over time per token
        y = self.conv(y)
        y = y.view(B, N, C, T).permute(0, 3, 1, 2)  # [B, T, N, d]
        return x + self.proj(F.gelu(y))


class SpaceTimeConv(nn.Module):
    """Residual depthwise convolution over (T, H, W) of the patch tokens (CLS passes through).

    LayerNorm -> depthwise Conv3d (3x3x3) -> GELU -> Linear, zero-initialised output.
    A per-channel filter over time *and* neighbouring patches can be oriented in
    space-time, i.e. respond to an edge moving one way and not the other (a motion
    energy detector); a filter over time alone at one patch cannot tell which way
    the object went. ST-Adapter uses the same depthwise 3-D kernel inside the backbone.
    """

    def __init__(self, width: int, kernel_size: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv3d(width, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.proj = nn.Linear(width, width)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x):  # [B, T, N, d]
        B, T, N, C = x.shape
        side = math.isqrt(N - 1)
        if side * side != N - 1:
            raise ValueError(f"conv3d needs a square patch grid; {N - 1} patch tokens is not one")
        patches = self.norm(x[:, :, 1:]).view(B, T, side, side, C).permute(0, 4, 1, 2, 3)  # [B, d, T, H, W]
        y = self.conv(patches).permute(0, 2, 3, 4, 1).reshape(B, T, N - 1, C)  # back to [B, T, H*W, d]
        y = self.proj(F.gelu(y))
        return torch.cat([x[:, :, :1], x[:, :, 1:] + y], dim=2)


class TemporalAttention(nn.Module):
    """Residual attention over T, per token (zero-initialised output, like TemporalConv)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        nn.init.zeros_(self.attn.proj.weight)
        nn.init.zeros_(self.attn.proj.bias)

    def forward(self, x):  # [B, T, N, d]
        B, T, N, C = x.shape
        y = self.norm(x).transpose(1, 2).reshape(B * N, T, C)  # one sequence over time per token
        y = self.attn(y).view(B, N, T, C).transpose(1, 2)  # [B, T, N, d]
        return x + y


class Block(nn.Module):
    """Attention among the tokens of each frame, then the temporal module, then an MLP."""

    def __init__(self, width: int, heads: int, temporal: str = "conv", kernel_size: int = 3,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.attn_dropout = Dropout(dropout)
        if temporal == "conv":
            self.temporal = TemporalConv(width, kernel_size)
        elif temporal == "conv3d":
            self.temporal = SpaceTimeConv(width, kernel_size)
        elif temporal == "attn":
            self.temporal = TemporalAttention(width, heads)
        else:
            self.temporal = nn.Identity()
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout)

    def forward(self, x):  # [B, T, N, d]
        B, T, N, C = x.shape
        x = x + self.attn_dropout(self.attn(self.norm1(x).view(B * T, N, C)).view(B, T, N, C))
        x = self.temporal(x)
        x = x + self.mlp(self.norm2(x))
        return x


class MAdapter(nn.Module):
    """The M-adapter branch: fuse K levels, mix tokens within and across frames, classify."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.cell = int(cfg.cell_size)
        self.fusion = GatedFusion(cfg.num_levels, cfg.in_width, cfg.width)
        self.motion = Motion(cfg.width) if cfg.motion else None
        self.correlation = (Correlation(cfg.num_levels, cfg.in_width, cfg.width, radius=cfg.correlation,
                                        groups=cfg.correlation_groups, cell=self.cell) if cfg.correlation else None)
        self.time_embed = nn.Parameter(torch.zeros(cfg.num_frames, cfg.width))
        nn.init.trunc_normal_(self.time_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.temporal, cfg.kernel_size, cfg.mlp_ratio,
                                          cfg.dropout) for _ in range(cfg.depth))
        self.cls_proj = LevelProjection(cfg.in_width, cfg.width)
        self.head = Head(cfg.width, cfg.num_classes, cfg.dropout)

    def inputs(self, levels: list[torch.Tensor]) -> BranchInputs:
        """What this branch reads of K full levels [B, T, N, D] (a compact store holds it already)."""
        c = self.correlation
        return branch_inputs(levels, self.cell, c.radius if c is not None else 0, c.groups if c is not None else 4)

    def forward(self, x: list[torch.Tensor] | BranchInputs) -> torch.Tensor:
        x = x if isinstance(x, BranchInputs) else self.inputs(x)
        h = self.fusion(x.cells, normalized=True)  # [B, T, N', d], N' = 1 + the cells
        motion = self.motion(h) if self.motion is not None else 0
        correlation = self.correlation(x.similarity) if self.correlation is not None else 0
        h = h + motion + correlation
        h = h + self.time_embed[:, None, :]  # same embedding for every token of frame t
        for block in self.blocks:
            h = block(h)
        pooled = h.mean(dim=(1, 2))  # [B, d]
        cls = self.cls_proj(x.cls[-1].mean(dim=1))  # deepest CLS over time: [B, d]
        return self.head(pooled + cls)


class LayersFamily(Family):
    """A family that reads the store's --layers: full levels, or a compact store's records (decoded on the
    device to the same `BranchInputs`). Stored as "madapter": its inputs are what every store holds."""

    stored_as = "madapter"

    def reads(self, manifest: Manifest) -> list[str]:
        return ["records"] if manifest.storage == "compact" else super().reads(manifest)

    def inputs(self, arrays: dict[str, torch.Tensor], manifest: Manifest):
        if manifest.storage != "compact":
            return super().inputs(arrays, manifest)
        c = manifest.compact
        return compact.decode(arrays["records"], c["layout"], len(manifest.layers), manifest.side or 0,
                              c["correlation_groups"])

    def check(self, cfg: BranchConfig) -> BranchConfig:
        if cfg.num_levels < 1:
            raise ValueError("the model needs at least one cached level")
        if cfg.temporal not in TEMPORAL:
            raise ValueError(f"temporal {cfg.temporal!r}: use one of {', '.join(TEMPORAL)}")
        if cfg.correlation < 0:
            raise ValueError(f"correlation {cfg.correlation}: give a radius in patches, or 0 for none")
        check_positive(cfg)
        return cfg.replace(cell_size=resolve_cell_size(cfg.cell_size, cfg.num_tokens))


class MAdapterFamily(LayersFamily):
    name = "madapter"
    description = "M-adapter: fused --layers, motion and patch correlation, blocks over space and time"
    label, benchmarked = "M-adapter", True
    model = MAdapter

    def check(self, cfg: BranchConfig) -> BranchConfig:
        cfg = super().check(cfg)
        side = math.isqrt(cfg.num_tokens - 1)
        if (cfg.correlation or cfg.cell_size > 1) and side * side != cfg.num_tokens - 1:
            raise ValueError(f"correlation and cells need a square patch grid; {cfg.num_tokens - 1} patch tokens "
                             "is not one (turn them off with correlation 0 and cell size 1)")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        if cfg.correlation and cfg.in_width % cfg.correlation_groups:
            raise ValueError(f"level width {cfg.in_width} is not divisible by {cfg.correlation_groups} "
                             "correlation groups")
        return cfg

    def fit(self, cfg: BranchConfig, manifest: Manifest, location: str) -> BranchConfig:
        """A compact store holds what the branch reads for one cell size and one correlation radius: its cells
        and correlation come from the store; other settings are refused in one line (correlation 0 is
        served: the stored matches are left unread)."""
        if manifest.storage != "compact":
            return cfg
        fixed = manifest.compact
        remedy = "extract a full store (mad extract --store full) or a compact one with that setting"
        if str(cfg.cell_size) not in ("auto", str(fixed["cell_size"])):
            cell = fixed["cell_size"]
            raise ConfigError(f"{location}: a compact store with cells of {cell}x{cell} patches cannot serve "
                              f"--cell-size {cfg.cell_size}; {remedy}")
        if cfg.correlation not in (0, fixed["correlation"]):
            raise ConfigError(f"{location}: a compact store with correlation radius {fixed['correlation']} "
                              f"cannot serve --correlation {cfg.correlation}; {remedy}")
        return cfg.replace(cell_size=fixed["cell_size"], correlation_groups=fixed["correlation_groups"])

    def describe(self, cfg: BranchConfig, parameters: int) -> str:
        text = super().describe(cfg, parameters)
        if int(cfg.cell_size) > 1:
            side = math.isqrt(cfg.num_tokens - 1)
            cells = -(-side // int(cfg.cell_size))
            text += f", patch grid {side}x{side} averaged to {cells}x{cells} cells"
        return text


register(MAdapterFamily())
