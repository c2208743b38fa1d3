"""Layers the branch families share (timm's layers/): level projection and fusion, attention, MLP, head.

Two memory-lean autograd Functions sit beside the modules that use them: `_Project`
keeps float16 cells rather than a float32 copy, `_GeluLinear` recomputes GELU in backward.
Both work under `torch.func.vmap` (a stacked sweep, `mad.adapt.stacked`).

`Dropout` draws its masks from a key (`dropout_key`), not from torch's global generator, so a
configuration's masks are the same alone and stacked with others under vmap.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F


def remember_autocast(ctx, device_type: str = "cuda") -> None:
    """What `torch.amp.custom_fwd` records for `custom_bwd` (backward runs under forward's autocast), for an
    autograd Function written with `setup_context` (the form vmap needs)."""
    ctx._dtype = torch.get_autocast_dtype(device_type)
    ctx._fwd_used_autocast = torch.is_autocast_enabled(device_type)


class _Project(torch.autograd.Function):
    """Linear(x) for an input that needs no gradient (normalised cells), keeping x itself for backward.

    Autograd would keep a float32 copy of every level's cells (the input cast to the
    weight's dtype) until the backward pass: with several levels of a ViT that is most
    of the branch's memory. The float16 cells are held anyway; the backward pass casts
    them again to get the weight gradient. Gradients never flow into them: they come
    from a frozen model.
    """

    generate_vmap_rule = True  # forward and backward are plain torch ops: vmap runs them as they are

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x.to(weight.dtype), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)
        remember_autocast(ctx)

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


def scaled_dot_product(q, k, v, dropout_p: float = 0.0):  # [..., Lq, c], [..., Lk, c], [..., Lk, c] -> [..., Lq, c]
    """F.scaled_dot_product_attention; under vmap (a stacked sweep) its math, since SDPA has no batching rule on
    CPU (a per-member loop instead). Stacked, attention dropout is refused: it would use torch's generator."""
    if torch._C._functorch.is_batchedtensor(q):
        assert dropout_p == 0, "attention dropout does not stack"
        return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


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
        x = scaled_dot_product(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, L, C)
        return self.proj(x)


class _GeluLinear(torch.autograd.Function):
    """Linear(GELU(a)), keeping only `a` for the backward pass and recomputing GELU(a) there.

    Autograd would keep both the MLP's hidden activation and its GELU (each 4x the
    branch width per token): the largest tensors of the branch. GELU is cheap to redo.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(a, weight, bias):
        return F.linear(F.gelu(a), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, weight, _ = inputs
        ctx.save_for_backward(a, weight)
        remember_autocast(ctx)

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
        self.dropout = Dropout(dropout)

    def forward(self, x):
        return self.dropout(_GeluLinear.apply(self.fc1(x), self.fc2.weight, self.fc2.bias))


class Head(nn.Module):
    """LayerNorm -> Dropout -> Linear(num_classes)."""

    def __init__(self, width: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.dropout = Dropout(dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.dropout(self.norm(x)))


# --------------------------------------------------------------------------- keyed dropout

_KEYS: list[dict] = []  # the innermost `dropout_key` context: its key and how many masks it has drawn


@contextmanager
def dropout_key(key: torch.Tensor, active: bool = True):
    """Dropout layers inside draw their masks from `key` (an int64 scalar; under vmap, one per member),
    each call its own stream. `active` False: no member of a stack has a nonzero rate (masks are skipped)."""
    _KEYS.append({"key": key, "calls": 0, "active": active})
    try:
        yield
    finally:
        _KEYS.pop()


def mix(x):
    """A 32-bit integer hash ("hash32": xorshift-multiply, a bijection) of a Python int or an int64 tensor of
    values below 2**32; the constant is below 2**31, so no product overflows int64."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
    return (x >> 16) ^ x


def step_key(seed: int, epoch: int, batch: int) -> int:
    """The dropout key of a member's step: a function of (seed, epoch, batch) only, so a resumed run and a run
    beside any stack-mates draw the masks it draws alone (a counter-based generator, as JAX's keys)."""
    return mix(mix(mix(seed & 0xFFFFFFFF) ^ epoch) ^ batch)


def keyed_uniform(key, call: int, shape, device) -> torch.Tensor:
    """Uniform [0, 1) float32 of `shape`, a function of (key, call, element index) only."""
    index = torch.arange(math.prod(shape), device=device, dtype=torch.int64).view(shape)
    stream = mix(key ^ mix(call))  # this call's stream of this key
    bits = mix(mix((index + stream) & 0xFFFFFFFF))
    return (bits >> 8).to(torch.float32) * 2.0 ** -24


class Dropout(nn.Module):
    """nn.Dropout whose masks come from the enclosing `dropout_key` (torch's generator outside one).

    The rate is also a (non-saved) buffer, so a stack of members with different rates holds
    one per member and vmap gives each its own.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)
        self.register_buffer("rate", torch.tensor(self.p), persistent=False)

    def forward(self, x):
        if not self.training:
            return x
        if not _KEYS:
            return F.dropout(x, self.p, True)
        keys = _KEYS[-1]
        keys["calls"] += 1  # counted even when skipped: a member's streams do not depend on its mates' rates
        if not keys["active"] or (self.p == 0 and not torch._C._functorch.is_batchedtensor(self.rate)):
            return x
        keep = keyed_uniform(keys["key"], keys["calls"], x.shape, x.device) >= self.rate
        return x * keep / (1 - self.rate)

    def extra_repr(self) -> str:
        return f"p={self.p}"
