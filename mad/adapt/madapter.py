"""The M-adapter branch over cached levels of a frozen image model, and two baselines.

M-adapter (Li et al., CVIU 2024) trains a small branch *beside* a frozen image
model: it reads the outputs of several of its layers and never backpropagates
into it. Here those outputs come from the cache. Input: K levels, shallow to
deep, each [B, T, N, D] (N = 1 + H*W tokens, CLS first). Output: logits [B, C].

    madapter   per-level projection (averaged in cells) -> hierarchical gated fusion
               -> + motion + correlation -> + time embedding
               -> depth x Block(attention within a frame, temporal module, MLP)
               -> mean over tokens and time + deepest CLS -> head
    meanpool   every level averaged over time and tokens -> projection + fusion -> head
    linear     deepest level's CLS averaged over time -> head
    evl        EVL's decoder (Lin et al., ECCV 2022) over the last blocks: `mad.adapt.evl`

The temporal module is a residual depthwise convolution over T ("conv", the
paper's choice) or attention over T ("attn"), per token; attention within the
frame comes first so each token also knows its neighbourhood.

Ours, beside the paper (evidence in the README, "Where mad departs"): `Motion`
(the normalised frame-to-frame change of every token) and `Correlation` (where
each patch's content came from in the previous frame) are added to the fused
tokens; the branch averages each level's patch grid in cells of `cell_size` x
`cell_size` patches right after LayerNorm, so its projections and blocks run on
fewer tokens while the correlation still matches patches on the full grid.

One file for the whole model, as nanoGPT's model.py: it is over 400 lines because
its memory-lean autograd Functions sit beside the modules that use them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from mad.cache.inputs import BranchInputs, average_cells, branch_inputs, match_similarity, resolve_cell_size

ARCHS = ("madapter", "meanpool", "linear", "evl")
TEMPORAL = ("conv", "conv3d", "attn", "none")


@dataclass
class BranchConfig:
    """Everything that defines a branch; saved in every checkpoint (`model_args`).

    The first six fields describe the cached tokens (a store's manifest gives them);
    the rest are the branch's own settings, whose defaults `mad train` uses.
    """

    arch: str = "madapter"       # madapter, meanpool, linear or evl
    num_levels: int = 3          # K cached levels
    in_width: int = 768          # D of the cached tokens
    num_tokens: int = 197        # N = 1 + H*W
    num_frames: int = 8          # T
    num_classes: int = 400
    width: int = 384             # d, the branch's width
    depth: int = 1               # blocks
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.1         # in the blocks (attention output, MLP) and before the head
    temporal: str = "conv"       # conv (over T per token), conv3d (over T and neighbouring patches), attn, none
    kernel_size: int = 3
    motion: bool = True          # add the frame-to-frame change of every token (`Motion`)
    correlation: int = 1         # radius in patches of the match to the previous frame (`Correlation`); 0: off
    correlation_groups: int = 4  # channel groups matched separately
    cell_size: int | str = "auto"  # average the patch grid in n x n cells; auto: see `resolve_cell_size`
    # evl: `width` is its attention's q/k/v width (0: D), `heads` 0: D / 64, `depth` its decoder layers, one
    # per block read (0: every cached block); the backbone attention's heads and ln_1 eps give its q, k
    qk_heads: int = 12
    qk_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: dict) -> "BranchConfig":
        values = {_RENAMED.get(k, k): v for k, v in values.items()}
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown branch settings: {', '.join(sorted(unknown))}")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


_RENAMED = {"grid_pool": "cell_size"}  # names in checkpoints written before mad 0.2


class _Project(torch.autograd.Function):
    """Linear(x) for an input that needs no gradient (normalised cells), keeping x itself for backward.

    Autograd would keep a float32 copy of every level's cells (the input cast to the
    weight's dtype) until the backward pass: with several levels of a ViT that is most
    of the branch's memory. The float16 cells are held anyway; the backward pass casts
    them again to get the weight gradient. Gradients never flow into them: they come
    from a frozen model.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):  # grad: [..., d]
        x, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # [M, d]
        grad_weight = (grad.t() @ x.reshape(-1, x.shape[-1]).to(grad.dtype)).to(weight.dtype)  # [d, D]
        return None, grad_weight, grad.sum(dim=0).to(weight.dtype)


class LevelProjection(nn.Module):
    """P_k = Linear(D -> d) . LayerNorm(D): puts one level into the branch's width.

    The LayerNorm has no affine parameters of its own: the Linear that follows absorbs
    them (same functions, fewer parameters). `normalized` input (the cells of
    `BranchInputs`, float16) skips the LayerNorm and keeps no float32 copy for backward.
    """

    def __init__(self, in_width: int, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.proj = nn.Linear(in_width, width)

    def forward(self, x, normalized: bool = False):  # [..., D] -> [..., d]
        if normalized and not x.requires_grad:
            return _Project.apply(x, self.proj.weight, self.proj.bias)
        x = x.to(self.proj.weight.dtype)
        return self.proj(x if normalized else F.layer_norm(x, x.shape[-1:], eps=self.eps))


class GatedFusion(nn.Module):
    """h_1 = P_1(x_1); h_k = g_k * h_{k-1} + (1 - g_k) * P_k(x_k), shallow to deep.

    g_k = sigmoid(gate_k) is learned per channel and starts at 0.5. Works on any
    leading shape ([B, T, N, D] cells or [B, D] pooled vectors).
    """

    def __init__(self, num_levels: int, in_width: int, width: int):
        super().__init__()
        self.projections = nn.ModuleList(LevelProjection(in_width, width) for _ in range(num_levels))
        self.gates = nn.Parameter(torch.zeros(num_levels - 1, width))

    def forward(self, levels: list[torch.Tensor], normalized: bool = False) -> torch.Tensor:
        h = self.projections[0](levels[0], normalized)
        for k in range(1, len(levels)):
            g = torch.sigmoid(self.gates[k - 1])
            level = self.projections[k](levels[k], normalized)
            h = level + g * (h - level)  # = g * h + (1 - g) * level; keeps one tensor, not two, for backward
        return h


class Attention(nn.Module):
    """Multi-head self-attention over the middle axis of [B, L, d]."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert width % heads == 0, f"width {width} is not divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, h, L, C/h]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, L, C)
        return self.proj(x)


class _GeluLinear(torch.autograd.Function):
    """Linear(GELU(a)), keeping only `a` for the backward pass and recomputing GELU(a) there.

    Autograd would keep both the MLP's hidden activation and its GELU (each 4x the
    branch width per token): the largest tensors of the branch. GELU is cheap to redo.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, a, weight, bias):
        ctx.save_for_backward(a, weight)
        return F.linear(F.gelu(a), weight, bias)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad):  # grad: [..., d]
        a, weight = ctx.saved_tensors
        hidden = F.gelu(a).reshape(-1, a.shape[-1])  # [M, hidden]
        grad2 = grad.reshape(-1, grad.shape[-1])  # [M, d]
        grad_weight = (grad2.t() @ hidden.to(grad2.dtype)).to(weight.dtype)  # [d, hidden]
        del hidden  # before the next [M, hidden] tensors: this backward runs at the step's memory peak
        grad_bias = grad2.sum(dim=0).to(weight.dtype)
        grad_a = torch.ops.aten.gelu_backward(grad @ weight.to(grad.dtype), a.to(grad.dtype))  # [..., hidden]
        return grad_a.to(a.dtype), grad_weight, grad_bias


class Mlp(nn.Module):
    """Linear -> GELU -> Linear -> Dropout (GELU and the second Linear as one memory-lean step)."""

    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(_GeluLinear.apply(self.fc1(x), self.fc2.weight, self.fc2.bias))


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
        self.attn_dropout = nn.Dropout(dropout)
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


class Head(nn.Module):
    """LayerNorm -> Dropout -> Linear(num_classes)."""

    def __init__(self, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.norm(x)))


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


class MeanPool(nn.Module):
    """Baseline: every level averaged over time and tokens, then projection and fusion. No temporal module."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.fusion = GatedFusion(cfg.num_levels, cfg.in_width, cfg.width)
        self.head = Head(cfg.width, cfg.num_classes, cfg.dropout)

    def forward(self, x: list[torch.Tensor] | BranchInputs) -> torch.Tensor:
        x = x if isinstance(x, BranchInputs) else branch_inputs(x, cells=False)
        pooled = [m.mean(dim=1) for m in x.token_mean]  # K x [B, D]
        return self.head(self.fusion(pooled))


class LinearProbe(nn.Module):
    """Baseline: the deepest level's CLS token averaged over time, LayerNorm, Linear."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.head = Head(cfg.in_width, cfg.num_classes, cfg.dropout)

    def forward(self, x: list[torch.Tensor] | BranchInputs) -> torch.Tensor:
        cls = x.cls[-1] if isinstance(x, BranchInputs) else x[-1][:, :, 0].float()  # [B, T, D]
        return self.head(cls.mean(dim=1))  # [B, D] -> [B, C]


def check_branch(cfg: BranchConfig) -> BranchConfig:
    """`cfg` with its cell size resolved, or a ValueError saying which setting cannot be served."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    if cfg.num_levels < 1:
        raise ValueError("the model needs at least one cached level")
    if cfg.arch == "evl":
        return check_evl(cfg)
    if cfg.temporal not in TEMPORAL:
        raise ValueError(f"temporal {cfg.temporal!r}: use one of {', '.join(TEMPORAL)}")
    if cfg.correlation < 0:
        raise ValueError(f"correlation {cfg.correlation}: give a radius in patches, or 0 for none")
    for name in ("width", "heads", "depth"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be at least 1 (got {getattr(cfg, name)})")
    cell = resolve_cell_size(cfg.cell_size, cfg.num_tokens)
    if cfg.arch == "madapter":
        side = math.isqrt(cfg.num_tokens - 1)
        if (cfg.correlation or cell > 1) and side * side != cfg.num_tokens - 1:
            raise ValueError(f"correlation and cells need a square patch grid; {cfg.num_tokens - 1} patch tokens "
                             "is not one (turn them off with correlation 0 and cell size 1)")
        if cfg.width % cfg.heads:
            raise ValueError(f"width {cfg.width} is not divisible by heads {cfg.heads}")
        if cfg.correlation and cfg.in_width % cfg.correlation_groups:
            raise ValueError(f"level width {cfg.in_width} is not divisible by {cfg.correlation_groups} "
                             "correlation groups")
    return BranchConfig(**{**cfg.to_dict(), "cell_size": cell})


def check_evl(cfg: BranchConfig) -> BranchConfig:
    """An evl `cfg` with its 0 (from the cache) settings resolved, or a ValueError naming the setting."""
    for name in ("width", "heads", "depth"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be at least 1, or 0 for EVL's default (got {getattr(cfg, name)})")
    width = cfg.width or cfg.in_width
    heads = cfg.heads or max(1, width // 64)
    depth = cfg.depth or cfg.num_levels - 1
    if depth < 1:
        raise ValueError("evl needs at least two cached levels (a block's input and its output)")
    side = math.isqrt(cfg.num_tokens - 1)
    if side * side != cfg.num_tokens - 1:
        raise ValueError(f"evl needs a square patch grid; {cfg.num_tokens - 1} patch tokens is not one")
    if depth > cfg.num_levels - 1:
        raise ValueError(f"depth {depth}: evl reads one cached block per decoder layer, and the cache holds "
                         f"{cfg.num_levels - 1} (mad extract --evl-layers)")
    if width % heads:
        raise ValueError(f"width {width} is not divisible by heads {heads}")
    if cfg.in_width % cfg.qk_heads:
        raise ValueError(f"level width {cfg.in_width} is not divisible by the backbone's {cfg.qk_heads} heads")
    return BranchConfig(**{**cfg.to_dict(), "width": width, "heads": heads, "depth": depth, "cell_size": 1})


def build_model(cfg: BranchConfig) -> nn.Module:
    """The branch `cfg.arch` for K = cfg.num_levels cached levels of [T, N, D] tokens.

    Every arch but evl works on any patch grid; correlation, cells larger than 1, conv3d and evl need a square one.
    """
    from mad.adapt.evl import EVL  # evl.py reads BranchConfig from here

    cfg = check_branch(cfg)
    return {"madapter": MAdapter, "meanpool": MeanPool, "linear": LinearProbe, "evl": EVL}[cfg.arch](cfg)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
