"""`mad bench ...`: the benchmark commands (the `mad` CLI adds them as a group). Each parses its options and
calls its benchmark with keyword arguments; branches are built through the registry and `resolve`, as
`mad train` builds them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mad.adapt.config import TrainConfig
from mad.bench.memory.config import MODES

bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks (print figures and ratios).")
TRAIN = TrainConfig()


@bench_app.command("extract")
def bench_extract(
    videos: Path = typer.Option(..., "--videos", help="Folder of videos (e.g. ../shared/data/k2/train)."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name (random weights)."),
    layers: str = typer.Option("4,8,12"),
    frames: int = typer.Option(8),
    limit: int = typer.Option(48, help="Clips to use (the folder's list repeats past its end)."),
    repeats: int = typer.Option(3, help="Run the side-by-side measurement this many times (min / median / max)."),
    batch_size: int = typer.Option(4),
    workers: int = typer.Option(-1),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("bf16"),
    long_clip: Optional[Path] = typer.Option(None, help="Clip for the short-vs-long decode test (default: longest)."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON into this folder."),
):
    """Decode-only, model-only and full extraction throughput, and the ratios between them."""
    from mad.bench.extract import bench_extract as run

    run(videos=str(videos), model=model, layers=layers, frames=frames, limit=limit, batch_size=batch_size,
        workers=workers, device=device, precision=precision, long_clip=str(long_clip) if long_clip else None,
        out=str(out) if out else None, repeats=repeats)


@bench_app.command("memory")
def bench_memory(
    model: str = typer.Option("ViT-B-16", help="open_clip model name or config .json (random weights)."),
    frames: int = typer.Option(8, help="Frames per clip (T)."),
    batch: int = typer.Option(8, help="Clips per training step."),
    layers: str = typer.Option("4,8,12", help="Blocks tapped for the branch (1-based)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    precision: str = typer.Option("bf16", help="Backbone weight dtype (every mode); on CUDA also the autocast "
                                  "dtype: bf16, fp16, fp32."),
    steps: int = typer.Option(5, help="Timed training steps per mode (after one warm-up step)."),
    budget_gb: Optional[float] = typer.Option(None, "--budget-gb",
                                              help="Also find each mode's largest batch within this many GiB."),
    out: Path = typer.Option(Path("benchmarks/results"), help="Folder for the JSON and PNG."),
    classes: int = typer.Option(174, help="Classes of the linear heads (174: SSv2)."),
    branch_width: int = typer.Option(384, help="Branch width (d)."),
    threads: int = typer.Option(0, help="torch CPU threads per mode process (0: torch's default)."),
    cell_size: str = typer.Option(TRAIN.cell_size, "--cell-size", "--grid-pool",
                                  help="The branch's cells, as `mad train --cell-size`: auto, 1, 2, ..."),
    modes: str = typer.Option(",".join(MODES), help="Modes to run, comma-separated (default: all)."),
):
    """Peak training memory and step time: full fine-tuning, in-backbone adapter, M-adapter and EVL online and
    cached."""
    from mad.bench.memory import BenchError, run_benchmark

    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    unknown = [m for m in chosen if m not in MODES]
    if unknown or not chosen:
        raise BenchError(f"--modes {modes!r}: choose from {', '.join(MODES)}")
    run_benchmark(model=model, frames=frames, batch=batch, layers=layers, device=device, precision=precision,
                  steps=steps, budget_gb=budget_gb, out=out, classes=classes, branch_width=branch_width,
                  threads=threads, command=" ".join(["mad", *sys.argv[1:]]), cell_size=cell_size, modes=chosen)


@bench_app.command("train")
def bench_train(
    videos: Path = typer.Option(Path("../shared/data/k2/train"), "--videos", help="Folder of videos (class folders)."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name or config .json (random weights)."),
    layers: str = typer.Option("4,8,12"),
    frames: int = typer.Option(8),
    batch_size: int = typer.Option(8, help="Clips per training step (every mode)."),
    epochs: int = typer.Option(2, help="Cached epochs to time (the first warms up when there are more)."),
    width: int = typer.Option(384, help="Branch width (d)."),
    online_steps: int = typer.Option(3, help="Online steps to time (after one warm-up), extrapolated to an epoch."),
    workers: int = typer.Option(2, help="Reader processes for the streamed mode."),
    decode_workers: int = typer.Option(2, help="DataLoader processes decoding videos in the online mode."),
    repeats: int = typer.Option(3, help="Run the whole comparison this many times (min / median / max)."),
    limit: Optional[int] = typer.Option(None, help="Use N videos: the first N, or the list repeated up to N."),
    cache: Optional[str] = typer.Option(None, help="Existing cache of --videos (default: extract one now, timed)."),
    store: str = typer.Option("compact", help="Store to extract: compact (the default of mad extract) or full."),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("bf16", help="Backbone precision for extraction and online mode."),
    grid_downsample: int = typer.Option(1, "--grid-downsample", "--pool",
                                        help="Average the patch grid in NxN cells at extraction (cache and online alike)."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON into this folder."),
    branch_precision: str = typer.Option(TRAIN.precision, help="Branch autocast, as `mad train --precision`: auto, bf16 or fp32."),
    cell_size: str = typer.Option(TRAIN.cell_size, "--cell-size", "--grid-pool",
                                  help="Branch cells, as `mad train --cell-size`: auto, 1, 2, ..."),
):
    """Epoch time training from the cache vs online (frozen ViT every step); streamed vs in-RAM cache."""
    from mad.bench.train import bench_train as run

    run(videos=str(videos), model=model, layers=layers, frames=frames, batch_size=batch_size, epochs=epochs,
        width=width, online_steps=online_steps, workers=workers, limit=limit, device=device, precision=precision,
        cache=cache, grid_downsample=grid_downsample, out=str(out) if out else None,
        branch_precision=branch_precision, cell_size=cell_size, store=store, repeats=repeats,
        decode_workers=decode_workers)


@bench_app.command("storage")
def bench_storage(
    videos: Path = typer.Option(Path("../shared/data/k2/train"), "--videos", help="Folder of videos."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name or config .json (random weights)."),
    layers: str = typer.Option("4,8,12"),
    frames: int = typer.Option(8),
    limit: Optional[int] = typer.Option(16, help="Use only the first N videos."),
    batch_size: int = typer.Option(8, help="Clips per training step and per read batch."),
    epochs: int = typer.Option(2, help="Timed epochs per source (after one warm-up epoch)."),
    workers: int = typer.Option(2, help="Reader processes for the streamed source."),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("bf16", help="Backbone precision for extraction."),
    seeds: str = typer.Option("0,1,2", help="Seeds of the demo-task accuracy runs ('' to skip them)."),
    demo_epochs: int = typer.Option(30, help="Epochs of each demo-task run."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON into this folder."),
):
    """Storage modes side by side: bytes per video-view, extraction, reading, step time, demo accuracy."""
    from mad.bench.storage import bench_storage as run

    run(videos=str(videos), model=model, layers=layers, frames=frames, limit=limit, batch_size=batch_size,
        epochs=epochs, workers=workers, device=device, precision=precision, seeds=seeds, demo_epochs=demo_epochs,
        out=str(out) if out else None)


@bench_app.command("scaling")
def bench_scaling(
    videos: Path = typer.Option(..., "--videos", help="Folder of videos."),
    model: str = typer.Option("ViT-B-16"),
    layers: str = typer.Option("4,8,12"),
    frames: int = typer.Option(8),
    limit: int = typer.Option(16, help="Number of clips."),
    processes: int = typer.Option(2, help="Slices run side by side (--shard I/N)."),
    precision: str = typer.Option("bf16"),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON into this folder."),
):
    """Extraction throughput with one process vs N --shard slices side by side on this machine."""
    from mad.bench.extract import bench_scaling as run

    run(videos=str(videos), model=model, layers=layers, frames=frames, limit=limit, processes=processes,
        precision=precision, out=str(out) if out else None)


@bench_app.command("sweep")
def bench_sweep(
    ks: str = typer.Option("1,2,4,8", help="Configuration counts K to measure (lr x weight decay points)."),
    repeats: int = typer.Option(3, help="Measure both sides this many times (min / median / max)."),
    epochs: int = typer.Option(2, help="Epochs of every run."),
    cache: Optional[str] = typer.Option(None, help="A compact training store (default: build a small one now)."),
    val: Optional[str] = typer.Option(None, help="Its val store (with --cache)."),
    out: Path = typer.Option(Path("benchmarks/results"), help="Folder for bench_sweep_<cpu|gpu>.json and .md."),
    smoke: bool = typer.Option(False, "--smoke", help="K 1,2, one repeat, one epoch, a tiny store: the harness "
                               "end to end, not figures to quote."),
    videos_per_class: int = typer.Option(8, help="Built store: training videos per class (6 classes)."),
    val_per_class: int = typer.Option(2, help="Built store: val videos per class."),
    width: int = typer.Option(128, help="Branch width of every run."),
    heads: int = typer.Option(4, help="Branch heads of every run."),
    batch_size: int = typer.Option(16),
    workers: int = typer.Option(2, help="Reader processes of every run."),
    device: str = typer.Option("cpu"),
):
    """K configurations in one `mad sweep` vs the same K `mad train` runs: bytes read, clips x configs / s, memory."""
    from mad.bench.sweep import bench_sweep as run

    run(ks=ks, repeats=repeats, epochs=epochs, cache=cache, val=val, out=str(out), smoke=smoke,
        videos_per_class=videos_per_class, val_per_class=val_per_class, width=width, heads=heads, batch_size=batch_size, workers=workers,
        device=device, command=" ".join(["mad", *sys.argv[1:]]))
