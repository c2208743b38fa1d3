"""The modes, built: what each holds in memory, what it trains, and its forward pass.

The two modes that backpropagate through the backbone use open_clip's public API only:
`visual.forward_intermediates` runs the blocks, and the in-backbone adapters go in with
`register_forward_pre_hook` on each block of `visual.transformer.resblocks`.

Attention (`SelfAttention`): open_clip's blocks call their batch_first
`nn.MultiheadAttention`, which transposes its input to [N, B, D] before the input
projection. When that input requires grad and the weight does not (a frozen backbone
under adapters), at::matmul does not fold the strided 3-D input into one matrix product
and materialises the weight expanded over N instead: [197, 768, 2304] bf16 = 0.65 GiB
per block call for ViT-B/16. That is an artefact of the module's layout, not the cost of
the method (CLIP's own LND code never hits it), and torch 2.13 with open_clip 3.3.0 still
hits it. Measured on CPU (ViT-B-16, 8 frames, batch 1, bf16, peak RSS over 2 steps; the
command is in harness.py's docstring, "open_clip_attention" true against false):

    in-backbone-adapter   open_clip's attention 1236 MiB, 32 s/step;  SelfAttention 601 MiB, 10 s/step
    full-finetune         open_clip's attention 1140 MiB;             SelfAttention 1141 MiB (weights
                          require grad there, so matmul folds: no artefact, same figure)

So in both modes each block's `attn` is replaced (plain module assignment) by
`SelfAttention`, a small module that computes the same self-attention from the module's
public weights (`in_proj_weight`, `in_proj_bias`, `out_proj`, `num_heads`, `dropout`) on
the batch-first stream, where the input projection is one matrix product; both modes run
the same forward. Anything it does not cover (a mask, cross-attention, separate q/k/v
weights) goes to the wrapped module unchanged.

Precision, as users train: on CUDA every trained module keeps fp32 weights and the step
runs under autocast to the benchmark precision (AIM and ST-Adapter train with mixed
precision); on CPU no step runs under autocast, weights are cast instead (the backbone and
the in-backbone adapters to the benchmark precision, so the residual stream is never copied
to fp32; the linear heads and the M-adapter branch stay fp32 and upcast their small input,
as `mad train --precision auto` on CPU).
"""

from __future__ import annotations

import functools
import math
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mad.bench.memory.config import BenchConfig, BenchError, on_cuda
from mad.runtime import DTYPES


@dataclass
class Workload:
    """One mode, built: what it holds in memory, what it trains, and one forward pass."""

    modules: list[nn.Module]  # every module in the process (for parameter counts)
    trained: nn.Module  # its parameters that require grad are the trained ones
    forward: Callable[[], torch.Tensor]  # one batch -> logits [B, classes]
    backbone_parameters: int  # 0 only where no backbone was built
    policy: str  # which weights are in which dtype, and why

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.trained.parameters() if p.requires_grad]


def count(modules: list[nn.Module]) -> int:
    """Parameters of all `modules`, trainable or not."""
    return sum(p.numel() for m in modules for p in m.parameters())


def autocast_for(cfg: BenchConfig):
    """CUDA: autocast to the benchmark precision. CPU: None (weights are cast instead: CPU autocast
    makes a ViT-B/16 forward 7-11x slower than casting, so nobody trains a backbone that way)."""
    if on_cuda(cfg) and cfg.precision != "fp32":
        return torch.autocast("cuda", dtype=DTYPES[cfg.precision])
    return None


# ------------------------------------------------------------------ the backbone, public API only


def load_random_backbone(cfg: BenchConfig, precision: str):
    """The real-size backbone with random weights (open_clip is imported here, never at module level)."""
    from mad.extract.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": intended here
        return load_backbone(cfg.model, pretrained="none", layers=cfg.layers, device=cfg.device, precision=precision)


def random_frames(cfg: BenchConfig) -> torch.Tensor:
    """uint8 frames [B*T, 3, S, S], as the decoder hands them over (decoding is not measured)."""
    S = cfg.image_size
    return torch.randint(0, 256, (cfg.batch * cfg.frames, 3, S, S), dtype=torch.uint8, device=cfg.device)


def normalized(backbone, frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B*T, 3, S, S] -> normalised pixels in the backbone's weight dtype (as Backbone.forward)."""
    return ((frames.float() / 255.0 - backbone.mean) / backbone.std).to(backbone.dtype)


class SelfAttention(nn.Module):
    """The self-attention of a batch_first `nn.MultiheadAttention`, from its public weights.

    Same call and result as the module for what open_clip's blocks ask of it (query is
    key is value, no mask, no weights returned); anything else goes to the module.
    Its parameters are the module's own, so counts and training are unchanged.
    """

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    @staticmethod
    def covers(attn: nn.Module) -> bool:
        return (isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn.in_proj_weight is not None
                and attn.bias_k is None and not attn.add_zero_attn)

    def forward(self, query, key, value, need_weights: bool = True, attn_mask=None, **kwargs):
        if key is not query or value is not query or need_weights or attn_mask is not None or kwargs:
            return self.attn(query, key, value, need_weights=need_weights, attn_mask=attn_mask, **kwargs)
        attn = self.attn
        B, N, D = query.shape
        heads = attn.num_heads
        qkv = F.linear(query, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3D]: q, k, v stacked as the module
        q, k, v = qkv.view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, N, D/heads]
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.dropout if self.training else 0.0)
        return attn.out_proj(x.transpose(1, 2).reshape(B, N, D)), None  # as the module: (output, weights)


def lean_attention(visual: nn.Module) -> int:
    """Replace every block's batch_first nn.MultiheadAttention by `SelfAttention`; how many were replaced."""
    replaced = 0
    for block in visual.transformer.resblocks:
        if SelfAttention.covers(getattr(block, "attn", None)):
            block.attn = SelfAttention(block.attn)
            replaced += 1
    return replaced


def deepest_cls_logits(backbone, head: nn.Linear, frames: torch.Tensor, cfg: BenchConfig) -> torch.Tensor:
    """Forward with gradients through the backbone (adapters, if any, run from their hooks):
    CLS of the deepest tapped block, after ln_post, averaged over T -> head."""
    visual = backbone.visual
    out = visual.forward_intermediates(
        normalized(backbone, frames), indices=[max(cfg.layers) - 1], stop_early=True, intermediates_only=True,
        output_fmt="NLC", output_extra_tokens=True)  # open_clip is 0-based
    cls = visual.ln_post(out["image_intermediates_prefix"][-1][:, 0])  # [B*T, D]
    cls = cls.view(cfg.batch, cfg.frames, -1).mean(dim=1)  # [B, D]
    return head(cls.to(head.weight.dtype))  # [B, classes]


def backprop_backbone(cfg: BenchConfig, precision: str):
    """The backbone of the two modes that backpropagate through it, with `SelfAttention` in its blocks."""
    backbone = load_random_backbone(cfg, precision)
    if not cfg.open_clip_attention:
        lean_attention(backbone.visual)
    return backbone


def build_full_finetune(cfg: BenchConfig) -> Workload:
    if on_cuda(cfg):
        # fp32 master weights + autocast: what a GPU user fine-tunes with
        backbone = backprop_backbone(cfg, "fp32")
        policy = f"backbone and head fp32 weights (trained), {cfg.precision} autocast"
    else:
        # weights in the benchmark precision and trained as such (AdamW states in that dtype too):
        # the cheapest full fine-tuning a CPU user could run, so this mode's figure is a lower bound
        backbone = backprop_backbone(cfg, cfg.precision)
        policy = f"backbone {cfg.precision} weights trained in {cfg.precision} (no fp32 master copy); head fp32"
    backbone.requires_grad_(True).train()
    head = nn.Linear(cfg.in_width, cfg.classes).to(cfg.device)
    frames = random_frames(cfg)
    return Workload(
        modules=[backbone, head],
        trained=nn.ModuleList([backbone, head]),
        forward=lambda: deepest_cls_logits(backbone, head, frames, cfg),
        backbone_parameters=count([backbone]),
        policy=policy,
    )


class TemporalAdapter(nn.Module):
    """ST-Adapter (Pan et al., NeurIPS 2022): down-projection -> depthwise convolution over T
    (the 3x1x1 kernel, per token) -> up-projection, added to the residual stream.

    The up-projection starts at zero, so the adapted block starts as the frozen one.
    The stream goes in as it is, in its own dtype: on CPU the adapter's weights are in
    that dtype too, on CUDA autocast picks it.
    """

    def __init__(self, width: int, bottleneck: int, frames: int, kernel_size: int = 3):
        super().__init__()
        self.frames = frames
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv1d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, groups=bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B*T, N, D]
        BT, N, _ = x.shape
        T, B = self.frames, BT // self.frames
        h = self.down(x)  # [B*T, N, C]
        C = h.shape[-1]
        h = h.view(B, T, N, C).permute(0, 2, 3, 1).reshape(B * N, C, T)  # one sequence over time per token
        h = self.conv(h)
        h = h.view(B, N, C, T).permute(0, 3, 1, 2).reshape(BT, N, C)  # back to [B*T, N, C]
        return x + self.up(h).to(x.dtype)


def insert_adapters(visual: nn.Module, adapters: nn.ModuleList) -> None:
    """Run adapter i on block i's input (ST-Adapter's place: before the block's attention), by forward pre-hook."""
    if not getattr(visual.transformer, "batch_first", True):
        raise BenchError("the in-backbone adapter needs a batch_first open_clip transformer")
    for block, adapter in zip(visual.transformer.resblocks, adapters, strict=True):
        block.register_forward_pre_hook(lambda module, args, adapter=adapter: (adapter(args[0]), *args[1:]))


def build_in_backbone_adapter(cfg: BenchConfig) -> Workload:
    backbone = backprop_backbone(cfg, cfg.precision)  # frozen: requires_grad False
    # ST-Adapter's ViT-B/16 bottleneck is 384 = D/2; kept as D/2 for other widths
    bottleneck = cfg.in_width // 2
    blocks = backbone.visual.transformer.resblocks
    # CUDA: fp32 weights under autocast; CPU: weights in the benchmark precision, as the stream
    dtype = torch.float32 if on_cuda(cfg) else DTYPES[cfg.precision]
    adapters = nn.ModuleList(TemporalAdapter(cfg.in_width, bottleneck, cfg.frames)
                             for _ in blocks).to(cfg.device, dtype)
    insert_adapters(backbone.visual, adapters)
    head = nn.Linear(cfg.in_width, cfg.classes).to(cfg.device)
    frames = random_frames(cfg)
    adapted = (f"adapters and head fp32 weights, {cfg.precision} autocast" if on_cuda(cfg) else
               f"adapters {cfg.precision} weights trained in {cfg.precision} (no fp32 copy of the stream); head fp32")
    return Workload(
        modules=[backbone, adapters, head],
        trained=nn.ModuleList([adapters, head]),
        forward=lambda: deepest_cls_logits(backbone, head, frames, cfg),
        backbone_parameters=count([backbone]),
        policy=f"backbone {cfg.precision} frozen, backprop through it; {adapted}",
    )


# ------------------------------------------------------------------ a branch family (the registry's)


def branch_for(cfg: BenchConfig, arch: str):
    """(its registry entry, the branch config `mad train --arch <arch>` resolves on this backbone, the levels it
    reads, what a store holds for it): resolved against the manifest a store of this backbone would have."""
    from mad.adapt.config import TrainConfig, resolve
    from mad.adapt.families import family, store_needs, stored_names
    from mad.cache.manifest import Manifest

    needs = store_needs(",".join(stored_names()), cfg.last_blocks)
    side = math.isqrt(cfg.num_tokens - 1)
    manifest = Manifest(model=cfg.model, layers=list(cfg.layers), frames=cfg.frames, tokens=cfg.num_tokens,
                        width=cfg.in_width, grid=[side, side], depth=cfg.depth, storage="full",
                        branches={name: need.record(cfg.depth, cfg.heads, 1e-5) for name, need in needs.items()})
    settings = TrainConfig(arch=arch, width=cfg.branch_width, cell_size=str(cfg.cell_size))
    _, branch = resolve(settings, manifest, cfg.classes, "mad bench memory", given=())  # each arch's preset
    entry = family(arch)
    return entry, branch, entry.levels(manifest), needs[entry.stored_as]


def build_branch_online(cfg: BenchConfig, arch: str) -> Workload:
    """The branch on the backbone's taps (of the levels it reads), the backbone under no_grad."""
    from mad.extract.backbone import load_backbone

    entry, branch_cfg, levels, need = branch_for(cfg, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": intended here
        backbone = load_backbone(cfg.model, pretrained="none", layers=levels[-1:], device=cfg.device,
                                 precision=cfg.precision, extra_levels=levels)
    # the frozen weights a store carries for it (the q/k of its blocks), from this backbone
    frozen = {f"{need.frozen}{k}": v for k, v in backbone.frozen_qk(levels[1:]).items()} if need.frozen else None
    branch = entry.build(branch_cfg, frozen).to(cfg.device)
    frames = random_frames(cfg)
    B, T, N, D = cfg.batch, cfg.frames, cfg.num_tokens, cfg.in_width

    def forward():
        taps = backbone(frames)  # no_grad inside: a [B*T, N, D] tap per level, in the backbone dtype
        return branch([x.view(B, T, N, D) for x in taps])  # the branch upcasts

    return Workload(
        modules=[backbone, branch],
        trained=branch,
        forward=forward,
        backbone_parameters=count([backbone]),
        policy=f"backbone {cfg.precision} under no_grad; branch fp32 weights"
               + (f", {cfg.precision} autocast" if autocast_for(cfg) else ""),
    )


def build_branch_cached(cfg: BenchConfig, arch: str) -> Workload:
    """The branch on batches as the cache reader returns them; no backbone (frozen weights a store carries
    stay at their initial values: memory and time do not depend on them)."""
    entry, branch_cfg, levels, _ = branch_for(cfg, arch)
    branch = entry.build(branch_cfg).to(cfg.device)
    # what the cache reader returns for one batch: float16 [B, T, N, D] per level, in host RAM
    cached = [torch.randn(cfg.batch, cfg.frames, cfg.num_tokens, cfg.in_width).to(torch.float16) for _ in levels]

    def forward():
        return branch([x.to(cfg.device, non_blocking=True) for x in cached])  # float16, as mad.adapt.train feeds them

    if "open_clip" in sys.modules:  # the point of this mode: the backbone's code is not even loaded
        raise BenchError(f"{arch}-cached imported open_clip: the process must hold no backbone")
    return Workload(
        modules=[branch],
        trained=branch,
        forward=forward,
        backbone_parameters=0,
        policy="float16 tokens as cached; branch fp32 weights"
               + (f", {cfg.precision} autocast" if autocast_for(cfg) else ""),
    )


def builder(mode: str) -> Callable[[BenchConfig], Workload]:
    """The mode's builder: the two in-backbone modes, or <arch>-online / <arch>-cached for a branch family."""
    if mode in BUILDERS:
        return BUILDERS[mode]
    arch, _, where = mode.rpartition("-")
    return functools.partial(build_branch_online if where == "online" else build_branch_cached, arch=arch)


BUILDERS = {
    "full-finetune": build_full_finetune,
    "in-backbone-adapter": build_in_backbone_adapter,
}
