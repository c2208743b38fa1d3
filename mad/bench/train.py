"""`mad bench train`: what the cache buys per training epoch, and what streaming it costs.

Same branch (M-adapter), frames, batch and training step in every mode:

    cache (RAM)     tokens read from the cache into RAM once; an epoch is branch steps only
    cache (stream)  the same epoch with tokens read from disk by spawned DataLoader workers
    online          every step decodes the batch's videos, runs the frozen ViT (random
                    weights, `precision`) under no_grad, then the same branch step

Online training is timed for a few steps (after a warm-up step) and extrapolated
to a whole epoch (steps per epoch x median step time): a whole online epoch takes
too long to be worth running. The one-time cost of building the cache (`mad
extract` on the same videos) is measured too, so the number of epochs after which
the cache pays for itself can be read off.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from mad.adapt.step import make_optimizer, train_step
from mad.adapt.train import TrainConfig
from mad.errors import MadError
from mad.runtime import branch_autocast, machine_info, resolve_device


class BenchTrainError(MadError):
    """The benchmark cannot run with these options (message says why)."""


@contextlib.contextmanager
def random_weights_expected():
    """Silence the random-weights warning: timings do not depend on weight values."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step(branch, optimizer, inputs, labels, device, precision: str) -> None:
    """One training step, as `mad train` takes it (its step, its default smoothing and clipping)."""
    train_step(lambda: branch(inputs), labels.to(device), optimizer, branch.parameters(),
               branch_autocast(precision, device), TRAIN.label_smoothing, TRAIN.clip_grad)


TRAIN = TrainConfig()


def _cached_epoch(branch, optimizer, data, batch_size: int, epoch: int, device, precision: str
                  ) -> tuple[float, int, list[float]]:
    """(seconds, steps, per-step seconds) of one training epoch over `data`.

    A step's time runs from the end of the previous step (or the epoch's start) to the
    end of this one, so it includes waiting for its batch: the first step of an epoch
    also carries the readers' start-up latency, later ones what prefetching did not hide.
    """
    _sync(device)
    started = last = time.perf_counter()
    step_seconds = []
    for arrays, labels, _, _ in data.train_batches(batch_size, seed=0, epoch=epoch):
        _step(branch, optimizer, data.to_model(arrays, device), labels, device, precision)
        _sync(device)
        now = time.perf_counter()
        step_seconds.append(now - last)
        last = now
    return time.perf_counter() - started, len(step_seconds), step_seconds


def bench_train(videos: str, model: str = "ViT-B-16", layers: str = "4,8,12", frames: int = 8, batch_size: int = 8,
                epochs: int = 2, width: int = 384, online_steps: int = 3, workers: int = 2, limit: int | None = None,
                device: str = "auto", precision: str = "bf16", cache: str | None = None, grid_downsample: int = 1,
                out: str | None = None, branch_precision: str = "auto", cell_size: str = "auto") -> dict:
    """Time a cached epoch (RAM and streamed) against online training on `videos`; print and return the figures."""
    from mad.adapt.madapter import BranchConfig, build_model, check_branch, count_parameters
    from mad.cache.dataset import InMemoryTokens, StreamingTokens, usable_videos
    from mad.cache.store import Store
    from mad.extract.backbone import load_backbone
    from mad.extract.decode import decode_clip
    from mad.extract.run import ExtractConfig, extract

    device = resolve_device(device)
    if branch_precision not in ("auto", "bf16", "fp32"):
        raise BenchTrainError(f"--branch-precision {branch_precision!r}: use auto, bf16 or fp32")
    bf16 = branch_precision == "bf16" or (branch_precision == "auto" and device.type == "cuda")
    tmp = tempfile.TemporaryDirectory(prefix="mad-bench-train-")
    try:
        # 0. the cache: given, or extracted now from the same videos (one-time cost, measured)
        extract_seconds = None
        root = Path(videos)  # the store's paths are relative to this
        if cache is None:
            if limit is not None:  # a subset without copying: symlink the first `limit` videos
                from mad.extract.videos import find_videos

                root = Path(tmp.name) / "videos"
                for path in find_videos(videos).paths[:limit]:
                    (root / path).parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(Path(videos).resolve() / path, root / path)
            cache = str(Path(tmp.name) / "cache")
            started = time.perf_counter()
            with random_weights_expected():
                extract(ExtractConfig(videos=str(root), out=cache, layers=layers, model=model, pretrained="none",
                                      frames=frames, precision=precision, grid_downsample=grid_downsample,
                                      device=str(device), store="full",  # every token: the committed figures
                                      progress=False))
            extract_seconds = time.perf_counter() - started
        store = Store.open(cache)
        selected = usable_videos(store)
        m = store.manifest
        frames = m.frames  # a given cache decides
        num_classes = max(len(store.class_names), int(store.labels().max()) + 1)
        try:  # the branch `mad train --cell-size` would build
            branch_cfg = check_branch(BranchConfig(
                num_levels=len(m.layers), in_width=m.width, num_tokens=m.tokens, num_frames=m.frames,
                num_classes=num_classes, width=width, heads=next(h for h in (6, 4, 2, 1) if width % h == 0),
                cell_size=m.compact["cell_size"] if m.storage == "compact" else cell_size))
        except ValueError as e:
            raise BenchTrainError(f"--cell-size: {e}") from None
        branch_cell = int(branch_cfg.cell_size)
        in_ram = InMemoryTokens(store, selected, progress=False)

        def new_branch():
            torch.manual_seed(0)
            branch = build_model(branch_cfg).to(device)
            return branch, make_optimizer(branch, TRAIN.lr, TRAIN.weight_decay)

        # 1. epochs from RAM (the first one warms the allocator up and is not counted when there are more)
        branch, optimizer = new_branch()
        ram_epochs = [_cached_epoch(branch, optimizer, in_ram, batch_size, e, device, branch_precision)
                      for e in range(max(epochs, 1))]
        steps_per_epoch = ram_epochs[0][1]
        ram_seconds = statistics.median(s for s, _, _ in (ram_epochs[1:] or ram_epochs))
        ram_later_steps = [t for _, _, steps in (ram_epochs[1:] or ram_epochs) for t in steps[1:]]

        # 2. the same epochs streamed from disk (the first pass also spawns the workers)
        streamed = StreamingTokens(store, selected, workers=workers)
        try:
            branch, optimizer = new_branch()
            stream_epochs = [_cached_epoch(branch, optimizer, streamed, batch_size, e, device, branch_precision)
                             for e in range(max(epochs, 1) + 1)]
        finally:
            streamed.close()
        stream_seconds = statistics.median(s for s, _, _ in stream_epochs[1:])
        stream_first_steps = [steps[0] for _, _, steps in stream_epochs[1:]]
        stream_later_steps = [t for _, _, steps in stream_epochs[1:] for t in steps[1:]]

        # 3. online: decode + frozen ViT + branch every step, a few steps, extrapolated to an epoch
        with random_weights_expected():  # taps shaped as the cache's tokens
            backbone = load_backbone(m.model, "none", store.layers, device, precision,
                                     grid_downsample=m.grid_downsample, model_config=m.model_config)
        size = backbone.info.image_size
        branch, optimizer = new_branch()
        paths, labels = store.paths(), store.labels()
        order = [int(v) for v in selected]
        decode_times, backbone_times, step_times = [], [], []
        for step in range(online_steps + 1):  # step 0 is the warm-up
            batch = [order[(step * batch_size + i) % len(order)] for i in range(batch_size)]
            started = time.perf_counter()
            clips = [decode_clip(str(root / paths[v]), frames, 1, 1, size).frames[0] for v in batch]
            frames_batch = torch.from_numpy(np.stack(clips)).flatten(0, 1).to(device)  # [B*T, 3, S, S]
            decoded = time.perf_counter()
            taps = backbone(frames_batch)  # K x [B*T, N, D]
            levels = [x.view(len(batch), frames, *x.shape[1:]) for x in taps]
            _sync(device)
            encoded = time.perf_counter()
            _step(branch, optimizer, levels, torch.as_tensor(labels[batch], dtype=torch.long), device,
                  branch_precision)
            _sync(device)
            finished = time.perf_counter()
            if step:
                decode_times.append(decoded - started)
                backbone_times.append(encoded - decoded)
                step_times.append(finished - started)
        online_step = statistics.median(step_times)
        online_seconds = online_step * steps_per_epoch

        result = {
            "machine": machine_info(device), "date": datetime.date.today().isoformat(),
            "settings": {"videos": videos, "clips": len(order), "model": m.model, "weights": "random",
                         "layers": store.layers, "frames": frames, "batch_size": batch_size, "branch_width": width,
                         "branch_cell_size": branch_cell,
                         "branch_parameters": count_parameters(branch), "device": str(device),
                         "precision": precision, "branch_bf16_autocast": bf16, "grid_downsample": m.grid_downsample, "tokens": m.tokens,
                         "stream_workers": workers, "online_steps_timed": online_steps,
                         "threads": torch.get_num_threads()},
            "steps_per_epoch": steps_per_epoch,
            "extract_seconds": extract_seconds,
            "cache_epoch_seconds": ram_seconds,
            "stream_epoch_seconds": stream_seconds,
            "online_epoch_seconds_extrapolated": online_seconds,
            "online_step_seconds": {"decode": statistics.median(decode_times),
                                    "backbone": statistics.median(backbone_times), "total": online_step},
            "cache_step_seconds": ram_seconds / steps_per_epoch,
            "stream_step_seconds": stream_seconds / steps_per_epoch,
            "online_over_cache": online_seconds / ram_seconds,
            "stream_over_ram": stream_seconds / ram_seconds,
        }
        if ram_later_steps and stream_later_steps:  # steps after an epoch's first (needs 2+ steps per epoch)
            result["cache_later_step_seconds"] = statistics.median(ram_later_steps)
            result["stream_later_step_seconds"] = statistics.median(stream_later_steps)
            result["stream_first_step_seconds"] = statistics.median(stream_first_steps)
            result["stream_over_ram_later_steps"] = (result["stream_later_step_seconds"]
                                                     / result["cache_later_step_seconds"])
        if extract_seconds is not None:
            # epochs after which extract-once + cached epochs beat online epochs
            saved_per_epoch = online_seconds - ram_seconds
            result["break_even_epochs"] = extract_seconds / saved_per_epoch if saved_per_epoch > 0 else None
        _print(result)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            kind = "gpu" if device.type == "cuda" else "cpu"
            suffix = "_bf16" if bf16 and kind == "cpu" else ""  # a CPU run with the bf16 branch, beside the fp32 one
            suffix += "" if cell_size == "auto" else f"_cell{branch_cell}"  # the default's figures keep the plain name
            name = f"train_{kind}_{Path(m.model).stem}_pool{m.grid_downsample}{suffix}.json"
            (Path(out) / name).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        tmp.cleanup()


def _print(r: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = r["settings"]
    table = Table(title=f"mad bench train: {s['clips']} clips, {s['model']} ({s['precision']}, random weights), "
                        f"T={s['frames']}, {s['tokens']} tokens (grid downsample {s['grid_downsample']}), "
                        f"batch {s['batch_size']}, M-adapter width {s['branch_width']}, cells of "
                        f"{s['branch_cell_size']}x{s['branch_cell_size']} patches"
                        f"{' (bf16 autocast)' if s.get('branch_bf16_autocast') else ''}, {s['device']}")
    for column in ("mode", "s / step", "s / epoch", "vs cache (RAM)"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    n = r["steps_per_epoch"]
    table.add_row("cache, in RAM", f"{r['cache_step_seconds']:.3f}", f"{r['cache_epoch_seconds']:.2f}", "1.00x")
    table.add_row(f"cache, streamed ({s['stream_workers']} workers)", f"{r['stream_step_seconds']:.3f}",
                  f"{r['stream_epoch_seconds']:.2f}", f"{r['stream_over_ram']:.2f}x")
    o = r["online_step_seconds"]
    table.add_row(f"online (decode {o['decode']:.2f} s + ViT {o['backbone']:.2f} s + branch)", f"{o['total']:.3f}",
                  f"{r['online_epoch_seconds_extrapolated']:.1f}*", f"{r['online_over_cache']:.1f}x")
    console = Console()
    console.print(table)
    console.print(f"* online epoch = {n} steps x median of {s['online_steps_timed']} timed steps (extrapolated, "
                  f"not run). Targets: online / cache >= 20x on CPU, streamed / RAM <= 1.10x.")
    if "stream_over_ram_later_steps" in r:
        console.print(f"streamed / RAM, steps after each epoch's first: {r['stream_over_ram_later_steps']:.2f}x "
                      f"({r['stream_later_step_seconds']:.3f} vs {r['cache_later_step_seconds']:.3f} s); an epoch's "
                      f"first streamed step takes {r['stream_first_step_seconds']:.3f} s (readers start on its batch)")
    if r.get("extract_seconds") is not None:
        even = r.get("break_even_epochs")
        console.print(f"building the cache took {r['extract_seconds']:.1f} s once"
                      + (f"; it pays for itself after {math.ceil(even)} epoch(s)" if even else ""))
