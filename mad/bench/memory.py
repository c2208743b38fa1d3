"""`mad bench memory`: measured training memory of four ways to adapt a frozen ViT to video.

Every mode trains on the same backbone architecture (random weights: memory and
time do not depend on weight values), frames, batch and precision, with the same
step (forward, cross-entropy, backward, AdamW step):

    full-finetune         every backbone weight trained, linear head on CLS averaged over T
    in-backbone-adapter   frozen backbone, ST-Adapter-style temporal adapter before attention
                          in every block: gradients flow back through the whole backbone
    madapter-online       backbone under no_grad each step, M-adapter branch trained on its taps
    madapter-cached       M-adapter branch trained from float16 tokens as read from the cache;
                          no backbone exists in that process

Each mode runs in a fresh subprocess (`python -m mad.bench.memory --mode X --config JSON`,
one JSON line on stdout), so one mode's allocator state cannot leak into another's
figure. Peak memory: CUDA `max_memory_allocated` over the timed steps; CPU the
process's peak resident set (VmHWM, reset after the warm-up step) minus its
resident set just before the model was built.

This module is imported by the child processes: keep its top-level imports to torch
and the standard library (no open_clip, no rich, no matplotlib) so the cached
mode's process holds nothing but the branch.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("full-finetune", "in-backbone-adapter", "madapter-online", "madapter-cached")
REFERENCE_MODE = "in-backbone-adapter"  # ratios are to this: the family M-adapter is an alternative to
TRAINS = {
    "full-finetune": "backbone + head",
    "in-backbone-adapter": "adapters in the blocks + head",
    "madapter-online": "branch (backbone no_grad)",
    "madapter-cached": "branch (no backbone)",
}
LABELS = {  # chart labels
    "full-finetune": "full\nfine-tune",
    "in-backbone-adapter": "in-backbone\nadapter",
    "madapter-online": "M-adapter\nonline",
    "madapter-cached": "M-adapter\nfrom cache",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30
OVER_LIMIT_EXIT = 3  # a CPU probe that crossed its memory limit and stopped itself


class BenchError(Exception):
    """A benchmark that cannot run (message says why)."""


@dataclass
class BenchConfig:
    """Everything a mode's process needs; the shapes are resolved once, by the parent."""

    model: str  # open_clip name or model-config .json path
    frames: int  # T
    batch: int  # clips per step (B); the backbone sees B*T images
    layers: list[int]  # 1-based blocks tapped for the M-adapter (the deepest one feeds the heads)
    device: str  # cpu, cuda, cuda:N (resolved, never "auto")
    precision: str  # backbone weights: fp32, bf16, fp16
    steps: int  # timed steps, after one warm-up step
    classes: int
    branch_width: int  # M-adapter width d
    in_width: int  # backbone width D
    num_tokens: int  # N = 1 + H*W
    image_size: int
    threads: int = 0  # torch CPU threads in each mode's process (0: torch's default)
    grid_pool: int = 1  # M-adapter grid pooling, resolved as `mad train --grid-pool` resolves it


# =========================================================================== child side: one mode


@dataclass
class Workload:
    """One mode, built: what it holds in memory, what it trains, and one forward pass."""

    modules: list[nn.Module]  # every module in the process (for parameter counts)
    trainable: list[nn.Parameter]
    forward: Callable[[], torch.Tensor]  # one batch -> logits [B, classes]
    backbone_parameters: int  # 0 only where no backbone was built
    policy: str  # which weights are in which dtype, and why


def on_cuda(cfg: BenchConfig) -> bool:
    return cfg.device.startswith("cuda")


def autocast_for(cfg: BenchConfig):
    """CUDA: autocast to the benchmark precision, as users train. CPU: none (weights are cast
    instead; CPU autocast is slow enough that nobody would train that way)."""
    if on_cuda(cfg) and cfg.precision != "fp32":
        return torch.autocast("cuda", dtype=DTYPES[cfg.precision])
    return nullcontext()


def load_random_backbone(cfg: BenchConfig, precision: str):
    """The real-size backbone with random weights (open_clip is imported here, never at module level)."""
    from mad.extract.backbone import load_backbone

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": intended here
        return load_backbone(cfg.model, pretrained="none", layers=cfg.layers, device=cfg.device, precision=precision)


def random_frames(cfg: BenchConfig) -> torch.Tensor:
    """uint8 frames [B*T, 3, S, S], as the decoder hands them over."""
    S = cfg.image_size
    return torch.randint(0, 256, (cfg.batch * cfg.frames, 3, S, S), dtype=torch.uint8, device=cfg.device)


def normalized(backbone, frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B*T, 3, S, S] -> normalised pixels in the backbone's weight dtype (as Backbone.forward)."""
    return ((frames.float() / 255.0 - backbone.mean) / backbone.std).to(backbone.dtype)


def attention(attn: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """nn.MultiheadAttention's computation with its weights, written out for [B, N, D] input.

    Why not call the module: open_clip's batch_first attention hands at::matmul a transposed
    input; when that input requires grad and the weight does not (a frozen backbone under an
    adapter), matmul does not fold it and materialises the weight expanded over N:
    [197, 768, 2304] bf16 = 0.65 GiB per call for ViT-B/16. That is an artefact, not the
    method's cost (CLIP's own LND code never hits it), so both gradient modes use this.
    """
    B, N, D = x.shape
    heads = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # [B, N, 3D]: q, k, v stacked as in the module
    q, k, v = qkv.view(B, N, 3, heads, D // heads).permute(2, 0, 3, 1, 4)  # 3 x [B, heads, N, D/heads]
    x = F.scaled_dot_product_attention(q, k, v)  # [B, heads, N, D/heads]
    return attn.out_proj(x.transpose(1, 2).reshape(B, N, D))


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock.forward (self-attention, no mask) with `attention` above."""
    x = x + block.ls_1(attention(block.attn, block.ln_1(x)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def deepest_cls_logits(backbone, head: nn.Linear, frames: torch.Tensor, cfg: BenchConfig,
                       adapters: nn.ModuleList | None = None) -> torch.Tensor:
    """Forward with gradients through the backbone (each block preceded by its adapter, if any):
    CLS of the deepest tapped block, averaged over T -> head."""
    visual = backbone.visual
    x = visual._embeds(normalized(backbone, frames))  # [B*T, N, D]
    for i, block in enumerate(visual.transformer.resblocks):
        if adapters is not None:
            x = adapters[i](x)  # ST-Adapter's place: before the block's attention
        x = block_forward(block, x)
    cls = visual.ln_post(x[:, 0])  # [B*T, D]
    cls = cls.view(cfg.batch, cfg.frames, -1).mean(dim=1)  # [B, D]
    return head(cls.to(head.weight.dtype))  # [B, classes]


def check_blocks(backbone) -> None:
    """`block_forward` re-implements open_clip's standard block: refuse any other kind."""
    from open_clip.transformer import ResidualAttentionBlock

    for block in backbone.visual.transformer.resblocks:
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
            raise BenchError(f"{type(block).__name__}: only open_clip's ResidualAttentionBlock is supported")


def count(modules: list[nn.Module]) -> int:
    """Parameters of all `modules`, trainable or not."""
    return sum(p.numel() for m in modules for p in m.parameters())


def build_full_finetune(cfg: BenchConfig) -> Workload:
    if on_cuda(cfg):
        # fp32 master weights + autocast: what a GPU user fine-tunes with
        backbone = load_random_backbone(cfg, "fp32")
        policy = f"backbone and head fp32 weights (trained), {cfg.precision} autocast"
    else:
        # weights in the benchmark precision and trained as such (AdamW states in that dtype too):
        # the cheapest full fine-tuning a CPU user could run, so this mode's figure is a lower bound
        backbone = load_random_backbone(cfg, cfg.precision)
        policy = f"backbone {cfg.precision} weights trained in {cfg.precision} (no fp32 master copy); head fp32"
    check_blocks(backbone)
    backbone.requires_grad_(True).train()
    head = nn.Linear(cfg.in_width, cfg.classes).to(cfg.device)
    frames = random_frames(cfg)
    return Workload(
        modules=[backbone, head],
        trainable=[p for m in (backbone, head) for p in m.parameters()],
        forward=lambda: deepest_cls_logits(backbone, head, frames, cfg),
        backbone_parameters=count([backbone]),
        policy=policy,
    )


class TemporalAdapter(nn.Module):
    """ST-Adapter (Pan et al., NeurIPS 2022): down-projection -> depthwise convolution over T
    (the 3x1x1 kernel, per token) -> up-projection, added to the residual stream.

    The up-projection starts at zero, so the adapted block starts as the frozen one.
    `cast_input`: compute in the adapter's own weight dtype (CPU, no autocast); under
    autocast the stream goes in as it is and autocast picks the dtype.
    """

    def __init__(self, width: int, bottleneck: int, frames: int, kernel_size: int = 3, cast_input: bool = True):
        super().__init__()
        self.frames = frames
        self.cast_input = cast_input
        self.down = nn.Linear(width, bottleneck)
        self.conv = nn.Conv1d(bottleneck, bottleneck, kernel_size, padding=kernel_size // 2, groups=bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B*T, N, D]
        BT, N, _ = x.shape
        T, B = self.frames, BT // self.frames
        h = self.down(x.to(self.down.weight.dtype) if self.cast_input else x)  # [B*T, N, C]
        C = h.shape[-1]
        h = h.view(B, T, N, C).permute(0, 2, 3, 1).reshape(B * N, C, T)  # one sequence over time per token
        h = self.conv(h)
        h = h.view(B, N, C, T).permute(0, 3, 1, 2).reshape(BT, N, C)  # back to [B*T, N, C]
        return x + self.up(h).to(x.dtype)


def build_in_backbone_adapter(cfg: BenchConfig) -> Workload:
    backbone = load_random_backbone(cfg, cfg.precision)  # frozen: requires_grad False
    # ST-Adapter's ViT-B/16 bottleneck is 384 = D/2; kept as D/2 for other widths
    bottleneck = cfg.in_width // 2
    check_blocks(backbone)
    blocks = backbone.visual.transformer.resblocks
    # fp32 weights like every small trained module here (the heads, the M-adapter branch): CUDA runs
    # them under autocast; on CPU they compute in fp32 on the cast stream, as mad's trainer does
    adapters = nn.ModuleList(TemporalAdapter(cfg.in_width, bottleneck, cfg.frames, cast_input=not on_cuda(cfg))
                             for _ in blocks).to(cfg.device)
    head = nn.Linear(cfg.in_width, cfg.classes).to(cfg.device)
    frames = random_frames(cfg)
    weights = "autocast" if on_cuda(cfg) else "fp32 compute on the stream cast at their border"
    return Workload(
        modules=[backbone, adapters, head],
        trainable=list(adapters.parameters()) + list(head.parameters()),
        forward=lambda: deepest_cls_logits(backbone, head, frames, cfg, adapters),
        backbone_parameters=count([backbone]),
        policy=f"backbone {cfg.precision} frozen, backprop through it; adapters and head fp32 weights, {weights}",
    )


def build_branch(cfg: BenchConfig) -> nn.Module:
    from mad.adapt.madapter import build_model

    return build_model("madapter", num_levels=len(cfg.layers), in_width=cfg.in_width, num_tokens=cfg.num_tokens,
                       num_frames=cfg.frames, num_classes=cfg.classes, width=cfg.branch_width,
                       grid_pool=cfg.grid_pool).to(cfg.device)


def build_madapter_online(cfg: BenchConfig) -> Workload:
    backbone = load_random_backbone(cfg, cfg.precision)
    branch = build_branch(cfg)
    frames = random_frames(cfg)
    B, T, N, D = cfg.batch, cfg.frames, cfg.num_tokens, cfg.in_width

    def forward():
        taps = backbone(frames)  # no_grad inside: K x [B*T, N, D] in the backbone dtype
        levels = [x.view(B, T, N, D) for x in taps]  # K x [B, T, N, D] in the backbone dtype; the branch upcasts
        return branch(levels)

    return Workload(
        modules=[backbone, branch],
        trainable=list(branch.parameters()),
        forward=forward,
        backbone_parameters=count([backbone]),
        policy=f"backbone {cfg.precision} under no_grad; branch fp32 weights"
               + (", autocast" if on_cuda(cfg) else ""),
    )


def build_madapter_cached(cfg: BenchConfig) -> Workload:
    branch = build_branch(cfg)
    # what the cache reader returns for one batch: float16 [B, T, N, D] per level, in host RAM
    cached = [torch.randn(cfg.batch, cfg.frames, cfg.num_tokens, cfg.in_width).to(torch.float16)
              for _ in cfg.layers]

    def forward():
        levels = [x.to(cfg.device, non_blocking=True) for x in cached]  # float16, as mad.adapt.train feeds them
        return branch(levels)

    if "open_clip" in sys.modules:  # the point of this mode: the backbone's code is not even loaded
        raise BenchError("madapter-cached imported open_clip: the process must hold no backbone")
    return Workload(
        modules=[branch],
        trainable=list(branch.parameters()),
        forward=forward,
        backbone_parameters=0,
        policy="float16 tokens as cached; branch fp32 weights" + (", autocast" if on_cuda(cfg) else ""),
    )


BUILDERS = {
    "full-finetune": build_full_finetune,
    "in-backbone-adapter": build_in_backbone_adapter,
    "madapter-online": build_madapter_online,
    "madapter-cached": build_madapter_cached,
}


def proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def warm_up_runtime(cfg: BenchConfig) -> None:
    """One tiny training step with the op types every mode uses, in fp32 and the benchmark dtype.

    The first backward/optimizer step of a process starts autograd threads and kernel
    libraries (about 100 MB of RSS on CPU, whatever the model size). That is a fixed cost
    of any torch process, not training memory, so it is paid before the baseline.
    """
    for dtype in {torch.float32, DTYPES[cfg.precision]}:
        patchify = nn.Conv2d(3, 16, 4, 4)
        norm, linear = nn.LayerNorm(16), nn.Linear(16, 48)
        temporal = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        mha = nn.MultiheadAttention(16, 2, batch_first=True)
        modules = nn.ModuleList([patchify, norm, linear, temporal, mha]).to(cfg.device, dtype)
        optimizer = torch.optim.AdamW(modules.parameters())
        x = torch.randn(4, 3, 16, 16, dtype=dtype, device=cfg.device)
        h = norm(patchify(x).flatten(2).transpose(1, 2))  # [4, 16, 16]
        h = h + mha(h, h, h, need_weights=False)[0]
        h = temporal(h.transpose(1, 2)).transpose(1, 2)
        q, k, v = linear(h).chunk(3, dim=-1)  # 3 x [4, 16, 16]
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
        labels = torch.zeros(4, dtype=torch.long, device=cfg.device)
        F.cross_entropy(F.gelu(h).mean(dim=(1, 2)).float(), labels).backward()
        optimizer.step()


def return_free_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so RSS tracks live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes the allocator's retained slack
        pass


class MemoryMeter:
    """Peak memory of this process's training, relative to just before the model was built.

    CUDA: `max_memory_allocated` (tensors only; not the CUDA context or the caching
    allocator's slack). CPU: resident set size, which counts everything the process
    touched (weights, activations, optimizer state, allocator slack), in pages.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        return_free_memory()
        self.baseline = self.current()
        if self.cuda:
            self.method = "CUDA max_memory_allocated over the timed steps"
        elif proc_status_kib("VmHWM") is not None:
            self.method = ("CPU peak RSS (VmHWM) over the timed steps minus RSS before the model was built "
                           "(glibc mmap threshold 64 KiB, so RSS follows live memory)")
        else:
            self.method = "CPU peak RSS since process start (ru_maxrss) minus RSS before the model was built"

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        rss = proc_status_kib("VmRSS")
        return rss * 1024 if rss is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        return_free_memory()
        try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "CPU peak RSS since process start (VmHWM, not resettable here) minus RSS before the build"

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = proc_status_kib("VmHWM")
        return (hwm * 1024 if hwm is not None else self._maxrss()) - self.baseline


def stop_when_over(meter: MemoryMeter, limit_bytes: int, mode: str) -> None:
    """CPU budget probes: a thread that ends the process once its RSS crosses the limit,
    so a probe that does not fit can never take the (shared) machine's memory with it."""

    def watch():
        while True:
            rss = proc_status_kib("VmRSS")
            if rss is not None and rss * 1024 - meter.baseline > limit_bytes:
                print(json.dumps({"mode": mode, "fits": False, "over_limit": True}), flush=True)
                os._exit(OVER_LIMIT_EXIT)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def run_mode(cfg: BenchConfig, mode: str, limit_gb: float | None = None) -> dict:
    """Build one mode, run 1 warm-up + `cfg.steps` timed training steps, report memory and time."""
    # import the code first: libraries (open_clip pulls in torchvision, ~150 MB) are not training memory
    import mad.adapt.madapter  # noqa: F401
    if mode != "madapter-cached":
        from mad._compat import import_open_clip

        import_open_clip()
    torch.manual_seed(0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    warm_up_runtime(cfg)
    meter = MemoryMeter(cfg.device)
    limit = int(limit_gb * GIB) if limit_gb else None
    if limit and meter.cuda:
        total = torch.cuda.get_device_properties(cfg.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), cfg.device)
    elif limit and proc_status_kib("VmRSS") is not None:
        stop_when_over(meter, limit, mode)

    try:
        workload = BUILDERS[mode](cfg)
    except torch.cuda.OutOfMemoryError:  # a budget probe whose model alone does not fit
        return {"mode": mode, "batch": cfg.batch, "fits": False, "oom": True}
    return_free_memory()  # building leaves the fp32 originals of cast weights behind as free heap
    model_and_inputs = meter.current() - meter.baseline
    optimizer = torch.optim.AdamW(workload.trainable, lr=1e-4)
    labels = torch.randint(0, cfg.classes, (cfg.batch,), device=cfg.device)

    def step() -> float:
        if meter.cuda:
            torch.cuda.synchronize(cfg.device)
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast_for(cfg):
            logits = workload.forward()  # [B, classes]
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        if meter.cuda:
            torch.cuda.synchronize(cfg.device)
        return time.perf_counter() - started

    try:
        step()  # warm-up: allocates AdamW state, picks kernels
        meter.reset_peak()
        times = [step() for _ in range(cfg.steps)]
    except torch.cuda.OutOfMemoryError:
        return {"mode": mode, "batch": cfg.batch, "fits": False, "oom": True}
    peak = meter.peak()
    return {
        "mode": mode,
        "trains": TRAINS[mode],
        "batch": cfg.batch,
        "peak_bytes": peak,
        "model_and_inputs_bytes": model_and_inputs,
        "fits": limit is None or peak <= limit,
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "trainable_parameters": sum(p.numel() for p in workload.trainable),
        "total_parameters": count(workload.modules),
        "backbone_parameters": workload.backbone_parameters,
        "open_clip_imported": "open_clip" in sys.modules,
        "precision_policy": workload.policy,
        "memory_measure": meter.method,
        "threads": torch.get_num_threads(),
    }


def child_main(argv: list[str] | None = None) -> None:
    """`python -m mad.bench.memory --mode X --config JSON [--limit-gb G]`: one JSON line on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--config", required=True, help="BenchConfig as JSON (written by the parent)")
    parser.add_argument("--limit-gb", type=float, default=None, help="budget probe: stop once over this many GiB")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**json.loads(args.config))
    print(json.dumps(run_mode(cfg, args.mode, args.limit_gb)), flush=True)


# =========================================================================== parent side


def resolve_config(model: str, frames: int, batch: int, layers: str, device: str, precision: str, steps: int,
                   classes: int, branch_width: int, threads: int = 0, grid_pool: str = "auto") -> BenchConfig:
    """Check the options and read the backbone's shapes from its open_clip config (no model is built)."""
    from mad.extract.backbone import BackboneError, parse_layers, register_model_config, resolve_device
    from mad._compat import import_open_clip

    if precision not in DTYPES:
        raise BenchError(f"--precision {precision!r}: use one of {', '.join(DTYPES)}")
    for name, value in (("--frames", frames), ("--batch", batch), ("--steps", steps), ("--classes", classes)):
        if value < 1:
            raise BenchError(f"{name} must be at least 1 (got {value})")
    try:
        device = resolve_device(device)
        name = register_model_config(model)
        vision = import_open_clip().get_model_config(name)["vision_cfg"]
        blocks = parse_layers(layers, vision["layers"])
    except BackboneError as e:
        raise BenchError(str(e)) from None
    if not device.startswith("cuda") and precision == "fp16":
        warnings.warn("fp16 training on CPU is slow and unusual; bf16 is the CPU default", stacklevel=2)
    size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    patch = vision["patch_size"] if isinstance(vision["patch_size"], int) else vision["patch_size"][0]
    from mad.adapt.madapter import resolve_grid_pool

    num_tokens = 1 + (size // patch) ** 2
    try:
        branch_pool = resolve_grid_pool(grid_pool, num_tokens)
    except ValueError as e:
        raise BenchError(f"--grid-pool: {e}") from None
    return BenchConfig(model=model, frames=frames, batch=batch, layers=blocks, device=device, precision=precision,
                       steps=steps, classes=classes, branch_width=branch_width, in_width=vision["width"],
                       num_tokens=num_tokens, image_size=size, threads=threads, grid_pool=branch_pool)


def run_child(cfg: BenchConfig, mode: str, limit_gb: float | None = None, timeout: float | None = None) -> dict:
    """Run one mode in a fresh interpreter and return its JSON line."""
    command = [sys.executable, "-m", "mad.bench.memory", "--mode", mode, "--config", json.dumps(asdict(cfg))]
    if limit_gb:
        command += ["--limit-gb", str(limit_gb)]
    # glibc serves allocations >= 64 KiB by mmap and returns them on free, so RSS follows live
    # memory; with its default (adaptive) threshold, freed tensors stay in the heap and the same
    # run's peak RSS varied by +-10 MB here
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"mode": mode, "batch": cfg.batch, "timed_out": True}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        if limit_gb is not None and done.returncode < 0:  # killed (the kernel's OOM killer): did not fit
            return {"mode": mode, "batch": cfg.batch, "fits": False, "killed": reason}
        raise BenchError(f"{mode} (batch {cfg.batch}) failed: {reason}")
    return json.loads(lines[-1])


def find_max_batch(probe: Callable[[int], dict], max_batch: int = 1024, max_probes: int = 16) -> dict:
    """Largest batch for which `probe(batch)["fits"]`: doubling from 1, then bisection.

    Bisection stops once the gap to the first failing batch is within 1/16 of the
    answer (exact up to batch 16), which bounds it to 4 probes after doubling.
    Bounded overall too: at most `max_probes` probes and batches up to `max_batch`.
    A probe that times out ends the search; the answer is then a lower bound
    (`limited_by` says so).
    """
    probes: list[dict] = []
    fits, fails = 0, None  # largest batch known to fit, smallest known not to

    def try_batch(batch: int) -> bool | None:
        result = probe(batch)
        probes.append({"batch": batch, **{k: result[k] for k in ("fits", "peak_bytes", "timed_out") if k in result}})
        return None if result.get("timed_out") else bool(result.get("fits"))

    limited_by = "budget"
    batch = 1
    while True:  # doubling
        if len(probes) >= max_probes:
            limited_by = "probe count"
            break
        ok = try_batch(batch)
        if ok is None:
            limited_by = "probe time"
            break
        if not ok:
            fails = batch
            break
        fits = batch
        if batch >= max_batch:
            limited_by = "batch cap"
            break
        batch = min(2 * batch, max_batch)
    while fails is not None and fails - fits > max(1, fits // 16) and limited_by == "budget":  # bisection
        if len(probes) >= max_probes:
            limited_by = "probe count"
            break
        middle = (fits + fails) // 2
        ok = try_batch(middle)
        if ok is None:
            limited_by = "probe time"
        elif ok:
            fits = middle
        else:
            fails = middle
    return {"max_batch": fits, "first_failing_batch": fails, "limited_by": limited_by, "probes": probes}


def machine_info(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"device": "cuda" if device.startswith("cuda") else "cpu", "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    memory_kib = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()) \
        if Path("/proc/meminfo").exists() else None
    if memory_kib:
        info["ram_gib"] = round(int(memory_kib.group(1)) / 2**20, 1)
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1), cuda=torch.version.cuda)
    return info


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import mad

    found = {"python": platform.python_version(), "torch": torch.__version__, "mad": mad.__version__}
    try:
        found["open_clip_torch"] = version("open_clip_torch")
    except PackageNotFoundError:
        pass
    return found


def model_name(model: str) -> str:
    """ViT-B-16 -> ViT-B-16; path/to/my-vit.json -> my-vit."""
    return Path(model).stem if model.endswith(".json") else model.replace("/", "_")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= 0.1 * GIB else f"{n_bytes / 2**20:.1f} MiB"


def add_ratios(rows: list[dict]) -> None:
    """Peak memory relative to the in-backbone adapter (None when that mode is not in the run)."""
    reference = next((r["peak_bytes"] for r in rows if r["mode"] == REFERENCE_MODE), None)
    for row in rows:
        row["peak_vs_reference"] = row["peak_bytes"] / reference if reference else None


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    cfg = report["config"]
    title = (f"Training memory: {model_name(cfg['model'])}, T={cfg['frames']}, batch {cfg['batch']}, "
             f"{report['machine']['device']}, {cfg['precision']}")
    table = Table(title=title, caption=report["memory_measure"])
    for column in ("mode", "trains", "trainable", "total params", "peak memory", "vs in-backbone", "step (median)"):
        table.add_column(column, justify="left" if column in ("mode", "trains") else "right", no_wrap=True)
    budget = report.get("budget")
    if budget:
        table.add_column(f"max batch @ {budget['gib']:g} GiB", justify="right")
    for row in report["modes"]:
        ratio = row["peak_vs_reference"]
        cells = [row["mode"], row["trains"], f"{row['trainable_parameters'] / 1e6:.2f} M",
                 f"{row['total_parameters'] / 1e6:.2f} M", gib(row["peak_bytes"]),
                 f"{ratio:.3f}x" if ratio is not None else "-", f"{row['step_seconds_median']:.3f} s"]
        if budget:
            found = budget["modes"][row["mode"]]
            if found["limited_by"] != "budget":  # a lower bound
                cells.append(f">= {found['max_batch']} ({found['limited_by']})")
            elif found["first_failing_batch"] - found["max_batch"] > 1:  # bisection stopped within 1/16
                cells.append(f"{found['max_batch']} (< {found['first_failing_batch']})")
            else:
                cells.append(str(found["max_batch"]))
        table.add_row(*cells)
    console = Console()
    console.width = max(console.width, 132)  # a piped or narrow terminal would wrap the table into noise
    console.print(table)


def plot_chart(report: dict, path: Path) -> None:
    """Two bar charts side by side: peak memory (with the ratio to the reference) and step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["modes"]
    names = [LABELS[row["mode"]] for row in rows]
    colours = ["#b0413e", "#d08c3a", "#4a7fb0", "#2e8b57"][: len(rows)]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    peaks = [row["peak_bytes"] / GIB for row in rows]
    bars = ax_mem.bar(names, peaks, color=colours)
    for bar, row in zip(bars, rows):
        ratio = row["peak_vs_reference"]
        label = gib(row["peak_bytes"]) + (f"\n{ratio:.2f}x" if ratio is not None else "")
        ax_mem.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_mem.set_ylabel("peak training memory (GiB)")
    ax_mem.set_ylim(0, max(peaks) * 1.25)
    ax_mem.set_title(f"peak memory ({'CUDA max allocated' if report['machine']['device'] == 'cuda' else 'CPU RSS'})",
                     fontsize=10)
    times = [row["step_seconds_median"] for row in rows]
    bars = ax_time.bar(names, times, color=colours)
    for bar, value in zip(bars, times):
        ax_time.annotate(f"{value:.2f} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                         va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_time.set_ylabel("median step time (s)")
    ax_time.set_ylim(0, max(times) * 1.2)
    ax_time.set_title("one training step (forward, backward, AdamW)", fontsize=10)
    for ax in (ax_mem, ax_time):
        ax.tick_params(axis="x", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    cfg = report["config"]
    machine = report["machine"].get("gpu") or report["machine"]["cpu"]
    setting = f"{model_name(cfg['model'])}, {cfg['frames']} frames, batch {cfg['batch']}, {cfg['precision']}"
    fig.suptitle(f"{setting}, {machine}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run_benchmark(model: str = "ViT-B-16", frames: int = 8, batch: int = 8, layers: str = "4,8,12",
                  device: str = "auto", precision: str = "bf16", steps: int = 5, budget_gb: float | None = None,
                  out: str | Path = "benchmarks/results", classes: int = 174, branch_width: int = 384,
                  threads: int = 0, modes: tuple[str, ...] = MODES, command: str | None = None,
                  probe_timeout: float = 300.0, quiet: bool = False, grid_pool: str = "auto") -> dict:
    """Run every mode in its own process, print the table, write JSON and PNG into `out`; return the report."""
    cfg = resolve_config(model, frames, batch, layers, device, precision, steps, classes, branch_width, threads,
                         grid_pool)
    rows = []
    for mode in modes:
        if not quiet:
            print(f"{mode}: batch {cfg.batch} x {cfg.frames} frames ...", file=sys.stderr, flush=True)
        row = run_child(cfg, mode)
        if "peak_bytes" not in row:  # CUDA out of memory
            raise BenchError(f"{mode} does not fit in memory at batch {cfg.batch}: try a smaller --batch")
        rows.append(row)
    add_ratios(rows)
    report = {
        "benchmark": "memory",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join(sys.argv),
        "machine": machine_info(cfg.device),
        "versions": versions(),
        "config": asdict(cfg),
        "memory_measure": rows[0]["memory_measure"],
        "reference_mode": REFERENCE_MODE,
        "weights": "random (memory and time do not depend on weight values)",
        "modes": rows,
    }
    if budget_gb:
        report["budget"] = {"gib": budget_gb, "modes": {}}
        for mode in modes:
            if not quiet:
                print(f"{mode}: largest batch within {budget_gb:g} GiB ...", file=sys.stderr, flush=True)

            def probe(b: int, mode=mode) -> dict:
                probe_cfg = BenchConfig(**{**asdict(cfg), "batch": b, "steps": 1})
                return run_child(probe_cfg, mode, limit_gb=budget_gb, timeout=probe_timeout)

            report["budget"]["modes"][mode] = find_max_batch(probe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory_{report['machine']['device']}_{model_name(model)}"
    report["files"] = {"json": str(out / f"{stem}.json"), "png": str(out / f"{stem}.png")}
    Path(report["files"]["json"]).write_text(json.dumps(report, indent=2) + "\n")
    plot_chart(report, Path(report["files"]["png"]))
    if not quiet:
        print_table(report)
        print(f"wrote {report['files']['json']} and {report['files']['png']}")
    return report


if __name__ == "__main__":
    child_main()
