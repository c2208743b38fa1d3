"""One mode in one process: `python -m mad.bench.memory --mode X --config JSON [--limit-gb G]`.

The child side (`child_main`, `run_mode`) builds the mode, runs one warm-up and
`steps` timed training steps through `mad.adapt.step.train_step` (the step `mad train`
runs: label-smoothed cross-entropy, backward, gradient clipping, AdamW) and prints one
JSON line. The parent side (`run_child`, `find_max_batch`) starts such processes.

Top-level imports: torch and the standard library only (no open_clip, rich, matplotlib),
so the cached mode's process holds nothing but the branch.

The attention artefact measured in workloads.py, one mode by hand (prints the JSON line):

    python -m mad.bench.memory --mode in-backbone-adapter --config '{"model": "ViT-B-16",
      "frames": 8, "batch": 1, "layers": [4, 8, 12], "device": "cpu", "precision": "bf16",
      "steps": 2, "classes": 174, "branch_width": 384, "in_width": 768, "num_tokens": 197,
      "image_size": 224, "open_clip_attention": true}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mad.adapt.step import make_optimizer, train_step
from mad.bench.memory.config import BASELINE_MODES, GIB, LR, MODES, TRAINS, WEIGHT_DECAY, BenchConfig, BenchError
from mad.bench.memory.meter import MemoryMeter, return_free_memory
from mad.bench.memory.workloads import autocast_for, builder, count
from mad.runtime import DTYPES

# =========================================================================== child side


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
        x = torch.randn(4, 3, 16, 16, dtype=dtype, device=cfg.device)

        def forward():
            h = norm(patchify(x).flatten(2).transpose(1, 2))  # [4, 16, 16]
            h = h + mha(h, h, h, need_weights=False)[0]
            h = temporal(h.transpose(1, 2)).transpose(1, 2)
            q, k, v = linear(h).chunk(3, dim=-1)  # 3 x [4, 16, 16]
            h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])
            return F.gelu(h).mean(dim=(1, 3)).float()  # [4, 16] logits

        labels = torch.zeros(4, dtype=torch.long, device=cfg.device)
        train_step(forward, labels, make_optimizer(modules, LR, WEIGHT_DECAY), modules.parameters())


def run_mode(cfg: BenchConfig, mode: str, limit_gb: float | None = None) -> dict:
    """Build one mode, run 1 warm-up + `cfg.steps` timed training steps, report memory and time."""
    # import the code first: libraries (open_clip pulls in torchvision, ~150 MB) are not training memory
    import mad.adapt.families  # noqa: F401
    if not mode.endswith("-cached"):
        from mad._compat import import_open_clip

        import_open_clip()
    torch.manual_seed(0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    warm_up_runtime(cfg)
    meter = MemoryMeter(cfg.device)
    limit = int(limit_gb * GIB) if limit_gb else None
    if limit:
        meter.limit(limit, mode)

    try:
        workload = builder(mode)(cfg)
    except torch.cuda.OutOfMemoryError:  # a budget probe whose model alone does not fit
        return {"mode": mode, "batch": cfg.batch, "fits": False, "oom": True}
    return_free_memory()  # building leaves the fp32 originals of cast weights behind as free heap
    model_and_inputs = meter.current() - meter.baseline
    trainable = workload.trainable
    optimizer = make_optimizer(workload.trained, LR, WEIGHT_DECAY)
    labels = torch.randint(0, cfg.classes, (cfg.batch,), device=cfg.device)

    def step() -> float:
        if meter.cuda:
            torch.cuda.synchronize(cfg.device)
        started = time.perf_counter()
        train_step(workload.forward, labels, optimizer, trainable, autocast_for(cfg))
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
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": count(workload.modules),
        "backbone_parameters": workload.backbone_parameters,
        "open_clip_imported": "open_clip" in sys.modules,
        "precision_policy": workload.policy,
        "memory_measure": meter.method,
        "threads": torch.get_num_threads(),
    }


def child_main(argv: list[str] | None = None) -> None:
    """`python -m mad.bench.memory --mode X --config JSON [--limit-gb G]`: one JSON line on stdout."""
    parser = argparse.ArgumentParser(prog="python -m mad.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES + BASELINE_MODES, required=True)
    parser.add_argument("--config", required=True, help="BenchConfig as JSON (written by the parent)")
    parser.add_argument("--limit-gb", type=float, default=None, help="budget probe: stop once over this many GiB")
    args = parser.parse_args(argv)
    cfg = BenchConfig(**json.loads(args.config))
    print(json.dumps(run_mode(cfg, args.mode, args.limit_gb)), flush=True)


# =========================================================================== parent side


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
