"""`mad bench train`: what the cache buys per training epoch, and what streaming it costs.

Same branch (M-adapter), frames, batch and training step in every mode:

    cache (RAM)      tokens read from the cache into RAM once; an epoch is branch steps only
    cache (stream)   the same epoch with tokens read from disk by spawned DataLoader workers
    online           as a user would write it: DataLoader workers decode each batch's videos
                     while the main process runs the frozen ViT (random weights, `precision`)
                     under no_grad and the same branch step
    online, decoded  the same batches decoded beforehand: the frozen ViT + branch alone

Online training is timed for a few steps (after a warm-up step) and extrapolated to
a whole epoch (steps per epoch x median step time): a whole online epoch takes too
long to be worth running. The whole comparison is repeated (`repeats`) and each
ratio is reported as min / median / max over the repeats. The one-time cost of
building the cache (`mad extract` on the same videos) is measured too, so the
number of epochs after which the cache pays for itself can be read off.
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
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mad.adapt.config import TrainConfig, resolve
from mad.adapt.families import build_model, family
from mad.adapt.step import make_optimizer, train_step
from mad.bench import video_subset
from mad.errors import MadError
from mad.options import at_least, check_choice, check_counts, check_number
from mad.runtime import branch_autocast, exit_with_parent, machine_info, resolve_device

TRAIN = TrainConfig()
RATIOS = ("online_over_stream", "online_over_ram", "online_decoded_over_stream", "online_decoded_over_ram",
          "stream_over_ram")


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


def _cached_epoch(branch, optimizer, data, batch_size: int, epoch: int, device, precision: str, arch: str
                  ) -> tuple[float, list[float]]:
    """(seconds, per-step seconds) of one training epoch over `data`.

    A step's time runs from the end of the previous step (or the epoch's start) to the
    end of this one, so it includes waiting for its batch.
    """
    entry = family(arch)
    _sync(device)
    started = last = time.perf_counter()
    step_seconds = []
    for arrays, labels, _, _ in data.train_batches(batch_size, seed=0, epoch=epoch):
        _step(branch, optimizer, entry.inputs(data.to_device(arrays, device), data.manifest), labels, device,
              precision)
        _sync(device)
        now = time.perf_counter()
        step_seconds.append(now - last)
        last = now
    return time.perf_counter() - started, step_seconds


class DecodedVideos(Dataset):
    """Online training's dataset: one video's sampled frames, decoded in a DataLoader worker."""

    def __init__(self, paths: list[str], labels: np.ndarray, frames: int, size: int):
        self.paths, self.labels, self.frames, self.size = paths, labels, frames, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from mad.extract.decode import decode_clip

        clip = decode_clip(self.paths[i], self.frames, 1, 1, self.size).frames[0]  # uint8 [T, 3, S, S]
        return torch.from_numpy(clip), int(self.labels[i])


def _online_steps(branch, optimizer, backbone, batches, frames: int, device, precision: str) -> list[float]:
    """Seconds of each step over `batches` (frames, labels): wait for the batch + frozen ViT + branch step."""
    step_seconds = []
    last = time.perf_counter()
    for clips, labels in batches:
        x = clips.flatten(0, 1).to(device)  # [B*T, 3, S, S]
        levels = [t.view(len(labels), frames, *t.shape[1:]) for t in backbone(x)]  # K x [B, T, N, D]
        _step(branch, optimizer, levels, torch.as_tensor(labels, dtype=torch.long), device, precision)
        _sync(device)
        now = time.perf_counter()
        step_seconds.append(now - last)
        last = now
    return step_seconds


def _take(loader: DataLoader, count: int, kept: list):
    """`count` batches from `loader` (starting over when it ends), each also appended to `kept`."""
    while True:
        for batch in loader:
            kept.append(batch)
            yield batch
            if len(kept) == count:
                return


def bench_train(videos: str, model: str = "ViT-B-16", layers: str = "4,8,12", frames: int = 8, batch_size: int = 8,
                epochs: int = 2, width: int = 384, online_steps: int = 3, workers: int = 2, limit: int | None = None,
                device: str = "auto", precision: str = "bf16", cache: str | None = None, grid_downsample: int = 1,
                out: str | None = None, branch_precision: str = "auto", cell_size: str = "auto",
                store: str = "compact", repeats: int = 3, decode_workers: int = 2) -> dict:
    """Time cached epochs (RAM and streamed) against online training on `videos`, `repeats` times;
    print and return the figures."""
    from mad.adapt.branch import count_parameters
    from mad.cache.dataset import InMemoryTokens, StreamingTokens, usable_videos
    from mad.cache.store import Store
    from mad.extract.backbone import load_backbone
    from mad.extract.run import ExtractConfig, extract

    device = resolve_device(device)
    if branch_precision not in ("auto", "bf16", "fp32"):
        raise BenchTrainError(f"--branch-precision {branch_precision!r}: use auto, bf16 or fp32")
    check_counts(frames=frames, batch_size=batch_size, epochs=epochs, width=width, online_steps=online_steps,
                 repeats=repeats, limit=limit, grid_downsample=grid_downsample)
    check_number("workers", workers, at_least(0))
    check_number("decode_workers", decode_workers, at_least(0))
    check_choice("store", store, ("compact", "full"))
    bf16 = branch_precision == "bf16" or (branch_precision == "auto" and device.type == "cuda")
    tmp = tempfile.TemporaryDirectory(prefix="mad-bench-train-")
    try:
        # 0. the cache: given, or extracted now from the same videos (one-time cost, measured)
        extract_seconds = None
        root = Path(videos)  # the store's paths are relative to this
        if cache is None:
            if limit is not None:
                root = video_subset(videos, limit, Path(tmp.name) / "videos")
            cache = str(Path(tmp.name) / "cache")
            started = time.perf_counter()
            with random_weights_expected():
                extract(ExtractConfig(videos=str(root), out=cache, layers=layers, model=model, pretrained="none",
                                      frames=frames, precision=precision, grid_downsample=grid_downsample,
                                      device=str(device), store=store, progress=False))
            extract_seconds = time.perf_counter() - started
        cached = Store.open(cache)
        selected = usable_videos(cached)
        m = cached.manifest
        frames = m.frames  # a given cache decides
        num_classes = max(len(cached.class_names), int(cached.labels().max()) + 1)
        settings = TrainConfig(cache=cache, width=width, heads=next(h for h in (6, 4, 2, 1) if width % h == 0),
                               cell_size="auto" if m.storage == "compact" else cell_size,
                               correlation=m.compact["correlation"] if m.storage == "compact" else TRAIN.correlation)
        _, branch_cfg = resolve(settings, m, num_classes, cache)  # the branch `mad train` would build

        def new_branch():
            torch.manual_seed(0)
            branch = build_model(branch_cfg).to(device)
            return branch, make_optimizer(branch, TRAIN.lr, TRAIN.weight_decay)

        with random_weights_expected():  # taps shaped as the cache's tokens
            backbone = load_backbone(m.model, "none", cached.layers, device, precision,
                                     grid_downsample=m.grid_downsample, model_config=m.model_config)
        paths, labels = cached.paths(), cached.labels()
        dataset = DecodedVideos([str(root / paths[v]) for v in selected], labels[selected], frames,
                                backbone.info.image_size)
        in_ram = InMemoryTokens(cached, selected, progress=False)
        steps_per_epoch = math.ceil(len(selected) / batch_size)
        runs = []
        for repeat in range(repeats):
            run = {}
            # 1. epochs from RAM (the first one warms up and is not counted when there are more)
            branch, optimizer = new_branch()
            ram = [_cached_epoch(branch, optimizer, in_ram, batch_size, e, device, branch_precision, branch_cfg.arch)
                   for e in range(max(epochs, 1))]
            run["ram_epoch_seconds"] = statistics.median(s for s, _ in (ram[1:] or ram))

            # 2. the same epochs streamed from disk (an extra first pass spawns the workers)
            streamed = StreamingTokens(cached, selected, workers=workers, pin_memory=device.type == "cuda")
            try:
                branch, optimizer = new_branch()
                stream = [_cached_epoch(branch, optimizer, streamed, batch_size, e, device, branch_precision,
                                        branch_cfg.arch)
                          for e in range(max(epochs, 1) + 1)]
            finally:
                streamed.close()
            run["stream_epoch_seconds"] = statistics.median(s for s, _ in stream[1:])

            # 3. online, decoding in DataLoader workers overlapped with the ViT (step 0 warms up and spawns them)
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=decode_workers,
                                multiprocessing_context="spawn" if decode_workers else None,
                                prefetch_factor=2 if decode_workers else None,
                                worker_init_fn=partial(exit_with_parent, os.getpid()),
                                generator=torch.Generator().manual_seed(repeat))
            branch, optimizer = new_branch()
            kept = []  # the same batches, kept decoded for step 4
            online = _online_steps(branch, optimizer, backbone, _take(loader, online_steps + 1, kept), frames,
                                   device, branch_precision)
            run["online_step_seconds"] = statistics.median(online[1:])

            # 4. online without decoding: the same batches, already decoded (frozen ViT + branch only)
            branch, optimizer = new_branch()
            decoded = _online_steps(branch, optimizer, backbone, kept, frames, device, branch_precision)
            run["online_decoded_step_seconds"] = statistics.median(decoded[1:])

            online_epoch = run["online_step_seconds"] * steps_per_epoch
            decoded_epoch = run["online_decoded_step_seconds"] * steps_per_epoch
            run.update(online_over_stream=online_epoch / run["stream_epoch_seconds"],
                       online_over_ram=online_epoch / run["ram_epoch_seconds"],
                       online_decoded_over_stream=decoded_epoch / run["stream_epoch_seconds"],
                       online_decoded_over_ram=decoded_epoch / run["ram_epoch_seconds"],
                       stream_over_ram=run["stream_epoch_seconds"] / run["ram_epoch_seconds"])
            runs.append(run)

        def spread(key):
            values = sorted(r[key] for r in runs)
            return {"min": values[0], "median": statistics.median(values), "max": values[-1]}

        result = {
            "machine": machine_info(device), "date": datetime.date.today().isoformat(),
            "settings": {"videos": videos, "clips": len(selected), "model": m.model, "weights": "random",
                         "layers": cached.layers, "frames": frames, "batch_size": batch_size, "branch_width": width,
                         "branch_cell_size": int(branch_cfg.cell_size), "store": m.storage,
                         "branch_parameters": count_parameters(new_branch()[0]), "device": str(device),
                         "precision": precision, "branch_bf16_autocast": bf16, "grid_downsample": m.grid_downsample,
                         "tokens": m.tokens, "stream_workers": workers, "decode_workers": decode_workers,
                         "online_steps_timed": online_steps, "repeats": repeats, "threads": torch.get_num_threads()},
            "steps_per_epoch": steps_per_epoch,
            "extract_seconds": extract_seconds,
            "runs": runs,
            **{key: spread(key) for key in ("ram_epoch_seconds", "stream_epoch_seconds", "online_step_seconds",
                                            "online_decoded_step_seconds", *RATIOS)},
        }
        if extract_seconds is not None:  # epochs after which extract-once + streamed epochs beat online epochs
            saved = result["online_step_seconds"]["median"] * steps_per_epoch - \
                result["stream_epoch_seconds"]["median"]
            result["break_even_epochs"] = extract_seconds / saved if saved > 0 else None
        _print(result)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            kind = "gpu" if device.type == "cuda" else "cpu"
            suffix = "_bf16" if bf16 and kind == "cpu" else ""  # a CPU run with the bf16 branch, beside the fp32 one
            suffix += "" if cell_size == "auto" else f"_cell{branch_cfg.cell_size}"
            name = f"train_{kind}_{Path(m.model).stem}_{m.storage}{suffix}.json"
            (Path(out) / name).write_text(json.dumps(result, indent=2) + "\n")
        return result
    finally:
        tmp.cleanup()


def _print(r: dict) -> None:
    from rich.table import Table

    from mad.progress import make_console
    from mad.tables import print_table

    s = r["settings"]
    spread = lambda d, f="{:.3f}": " / ".join(f.format(d[k]) for k in ("min", "median", "max"))  # noqa: E731
    table = Table(title=f"mad bench train: {s['clips']} clips, {s['model']} ({s['precision']}, random weights), "
                        f"T={s['frames']}, batch {s['batch_size']}, {r['steps_per_epoch']} steps / epoch, "
                        f"{s['store']} store, branch width {s['branch_width']}, cells of {s['branch_cell_size']}x"
                        f"{s['branch_cell_size']} patches{' (bf16 autocast)' if s['branch_bf16_autocast'] else ''}, "
                        f"{s['device']}; min / median / max over {s['repeats']} repeats")
    table.add_column("mode")
    table.add_column("s / epoch", justify="right")
    n = r["steps_per_epoch"]
    scale = lambda d: {k: v * n for k, v in d.items()}  # noqa: E731
    table.add_row("cache, in RAM", spread(r["ram_epoch_seconds"], "{:.2f}"))
    table.add_row(f"cache, streamed ({s['stream_workers']} reader processes)", spread(r["stream_epoch_seconds"], "{:.2f}"))
    table.add_row(f"online ({s['decode_workers']} decoding workers)*", spread(scale(r["online_step_seconds"]), "{:.1f}"))
    table.add_row("online, frames decoded beforehand (ViT + branch)*",
                  spread(scale(r["online_decoded_step_seconds"]), "{:.1f}"))
    console = make_console()
    print_table(table, console)
    ratios = Table(title="ratios (min / median / max)")
    for column in ("", "vs cache streamed", "vs cache in RAM"):
        ratios.add_column(column)
    ratios.add_row("online, including decode", spread(r["online_over_stream"], "{:.1f}x"),
                   spread(r["online_over_ram"], "{:.1f}x"))
    ratios.add_row("online, excluding decode", spread(r["online_decoded_over_stream"], "{:.1f}x"),
                   spread(r["online_decoded_over_ram"], "{:.1f}x"))
    ratios.add_row("cache streamed / in RAM", spread(r["stream_over_ram"], "{:.2f}x"), "")
    print_table(ratios, console)
    console.print(f"* online epoch = {n} steps x median of {s['online_steps_timed']} timed steps (extrapolated, "
                  f"not run). Targets on CPU: online excluding decode / streamed >= 20x; streamed / RAM <= 1.10x "
                  f"(epochs of >= 12 steps).")
    if r.get("extract_seconds") is not None:
        even = r.get("break_even_epochs")
        console.print(f"building the cache took {r['extract_seconds']:.1f} s once"
                      + (f"; it pays for itself after {math.ceil(even)} epoch(s)" if even else ""))
