"""`mad bench storage`: the storage modes side by side, in one run.

Part 1, the real architecture (random weights: bytes and speed do not depend on them) on
real videos, per mode (full, compact):
    bytes per video-view   on disk, from the store itself (what `mad info` prints)
    extraction clips/s     `mad extract` into a fresh store, start-up included
    read clips/s           one reader (this process) reading batches of (video, view) chunks
                           as a training reader does, over every video; 3 passes
    step time              training steps of the default branch from the store in RAM and
                           streamed by reader processes, side by side (steps after an epoch's
                           first, as `mad bench train`)
Part 2, accuracy: the demo task (`mad demo`'s videos and ViT), extracted in both modes,
the branch trained from each with the same seeds; val top-1 per seed.
Every repeated figure is reported as min / median / max.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from mad.errors import MadError
from mad.options import at_least, check_counts, check_number
from mad.runtime import machine_info, resolve_device

MODES = ("full", "compact")


def _spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "runs": len(values)}


def _link_subset(videos: str, limit: int | None, root: Path) -> Path:
    from mad.extract.videos import find_videos

    for path in find_videos(videos).paths[:limit]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(videos).resolve() / path, root / path)
    return root


def read_clips_per_second(location: str, batch_size: int = 8, passes: int = 3) -> list[float]:
    """Clips/s of one reader reading every done video's first view, in batches, as a training reader does."""
    from mad.cache.dataset import ChunkReader, usable_videos
    from mad.cache.store import Store

    store = Store.open(location)
    videos = usable_videos(store)
    reader = ChunkReader(location, {n: (s[1:], d) for n, (s, d) in store.data_arrays.items()}, videos)
    items = [(i, 0) for i in range(len(videos))]
    reader.__getitems__(items[:batch_size])  # opens the store and its arrays
    rates = []
    for _ in range(passes):
        started = time.perf_counter()
        for i in range(0, len(items), batch_size):
            reader.__getitems__(items[i:i + batch_size])
        rates.append(len(items) / (time.perf_counter() - started))
    return rates


def step_seconds(location: str, batch_size: int, epochs: int, workers: int, device) -> dict:
    """Seconds per training step (after each epoch's first) from the store in RAM and streamed."""
    from mad.adapt.config import TrainConfig, resolve
    from mad.adapt.families import build_model
    from mad.adapt.step import make_optimizer
    from mad.bench.train import _cached_epoch
    from mad.cache.dataset import InMemoryTokens, StreamingTokens, usable_videos
    from mad.cache.store import Store

    store = Store.open(location)
    videos = usable_videos(store)
    result = {}
    for source in ("ram", "streamed"):
        data = (InMemoryTokens(store, videos, progress=False) if source == "ram"
                else StreamingTokens(store, videos, workers=workers))
        try:
            cfg, branch = resolve(TrainConfig(), store.manifest, max(2, len(store.class_names)), location)
            torch.manual_seed(0)
            model = build_model(branch).to(device)
            optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
            steps = []
            for epoch in range(epochs + 1):  # the first epoch warms up (and starts the readers)
                _, seconds = _cached_epoch(model, optimizer, data, batch_size, epoch, device, "auto", cfg.arch)
                if epoch:
                    steps += seconds[1:] or seconds  # one-step epochs: that step
        finally:
            data.close()
        result[source] = _spread(steps)
    result["streamed_over_ram"] = result["streamed"]["median"] / result["ram"]["median"]
    return result


def demo_accuracy(root: Path, seeds: list[int], epochs: int, progress: bool) -> dict:
    """Val top-1 of the demo task from a full and a compact store of the same videos, per seed."""
    from mad.adapt.train import TrainConfig, train
    from mad.demo import DemoConfig, demo_extract_config, demo_train_config
    from mad.extract.run import extract
    from mad.synthetic import make_demo_videos

    cfg = DemoConfig(out=str(root), epochs=epochs, progress=False)
    videos = make_demo_videos(root / "videos", videos_per_class=cfg.videos_per_class,
                              val_per_class=cfg.val_per_class, seed=cfg.seed)
    result = {mode: {"last": [], "best": []} for mode in MODES}
    for mode in MODES:
        for split in ("train", "val"):
            extract(demo_extract_config(videos[split], root / mode / split, cfg, store=mode))
        for seed in seeds:
            if progress:
                print(f"demo task: {mode} store, seed {seed}", file=sys.stderr, flush=True)
            arch = TrainConfig().arch  # the default branch: the storage modes are what is compared
            summary = train(demo_train_config(root / mode / "train", root / mode / "val", arch,
                                              root / "runs" / f"{mode}-{seed}", cfg, seed=seed), quiet=True)
            result[mode]["last"].append(summary["last/val/acc/top1"])
            result[mode]["best"].append(summary["val/acc/top1"])
    result["seeds"] = seeds
    result["compact_minus_full_last"] = [c - f for c, f in zip(result["compact"]["last"], result["full"]["last"])]
    return result


def bench_storage(videos: str, model: str = "ViT-B-16", layers: str = "4,8,12", frames: int = 8,
                  limit: int | None = 16, batch_size: int = 8, epochs: int = 2, workers: int = 2,
                  device: str = "auto", precision: str = "bf16", seeds: str = "0,1,2", demo_epochs: int = 30,
                  out: str | None = None, progress: bool = True) -> dict:
    from mad.cache.store import Store
    from mad.extract.run import ExtractConfig, extract

    check_counts(frames=frames, limit=limit, batch_size=batch_size, epochs=epochs, demo_epochs=demo_epochs)
    check_number("workers", workers, at_least(0))
    device = resolve_device(device)
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise MadError(f"--seeds {seeds!r}: give integers, e.g. 0,1,2") from None
    report = {"benchmark": "storage", "command": shlex.join(["mad", *sys.argv[1:]]),
              "date": datetime.date.today().isoformat(), "machine": machine_info(device),
              "settings": {"videos": videos, "limit": limit, "model": model, "weights": "random", "layers": layers,
                           "frames": frames, "batch_size": batch_size, "epochs": epochs, "workers": workers,
                           "precision": precision, "device": str(device)}, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="mad-bench-storage-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        root = _link_subset(videos, limit, Path(tmp) / "videos")
        for mode in MODES:
            if progress:
                print(f"{mode}: extracting {model} ...", file=sys.stderr, flush=True)
            location = str(Path(tmp) / mode)
            started = time.perf_counter()
            summary = extract(ExtractConfig(videos=str(root), out=location, model=model, pretrained="none",
                                            layers=layers, frames=frames, precision=precision, device=str(device),
                                            store=mode, progress=False))
            seconds = time.perf_counter() - started
            store = Store.open(location)
            views_done = store.counts()["done"] * store.manifest.views
            row = {"bytes_per_video_view": sum(store.bytes_on_disk().values()) / views_done,
                   "extract_clips_per_s": summary["done_now"] / seconds}
            if progress:
                print(f"{mode}: reading and training ...", file=sys.stderr, flush=True)
            row["read_clips_per_s"] = _spread(read_clips_per_second(location, batch_size))
            row["step_seconds"] = step_seconds(location, batch_size, epochs, workers, device)
            report["modes"][mode] = row
        full, small = report["modes"]["full"], report["modes"]["compact"]
        report["compact_over_full"] = {
            "bytes": small["bytes_per_video_view"] / full["bytes_per_video_view"],
            "read_clips_per_s": small["read_clips_per_s"]["median"] / full["read_clips_per_s"]["median"],
            "extract_clips_per_s": small["extract_clips_per_s"] / full["extract_clips_per_s"]}
        if seed_list:
            report["demo_accuracy"] = demo_accuracy(Path(tmp) / "demo", seed_list, demo_epochs, progress)
    _print(report)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        path = Path(out) / f"storage_{device.type.replace('cuda', 'gpu')}_{Path(model).stem}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return report


def _print(r: dict) -> None:
    from rich.table import Table

    from mad.progress import make_console
    from mad.tables import print_table

    s = r["settings"]
    table = Table(title=f"mad bench storage: {s['model']} ({s['precision']}, random weights), layers {s['layers']}, "
                        f"T={s['frames']}, {s['device']}")
    for column in ("storage", "per video-view", "extract clips/s", "read clips/s (1 reader)", "step RAM s",
                   "step streamed s", "streamed / RAM"):
        table.add_column(column, justify="left" if column == "storage" else "right")
    for mode, row in r["modes"].items():
        read, steps = row["read_clips_per_s"], row["step_seconds"]
        table.add_row(mode, f"{row['bytes_per_video_view'] / 1e6:.3f} MB", f"{row['extract_clips_per_s']:.2f}",
                      f"{read['median']:.0f} ({read['min']:.0f}-{read['max']:.0f})",
                      f"{steps['ram']['median']:.3f}", f"{steps['streamed']['median']:.3f}",
                      f"{steps['streamed_over_ram']:.2f}x")
    console = make_console()
    print_table(table, console)
    ratio = r["compact_over_full"]
    console.print(f"compact / full: bytes {ratio['bytes']:.3f} (1/{1 / ratio['bytes']:.1f}), read clips/s "
                  f"{ratio['read_clips_per_s']:.1f}x, extraction {ratio['extract_clips_per_s']:.2f}x")
    if "demo_accuracy" in r:
        a = r["demo_accuracy"]
        for mode in MODES:
            console.print(f"demo task val top-1, {mode} store, seeds {a['seeds']}: last "
                          f"{', '.join(f'{v:.3f}' for v in a[mode]['last'])}; best "
                          f"{', '.join(f'{v:.3f}' for v in a[mode]['best'])}")
        console.print(f"compact - full (last epoch) per seed: "
                      f"{', '.join(f'{d:+.3f}' for d in a['compact_minus_full_last'])} (target within 0.02)")

