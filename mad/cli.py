"""The `mad` command line: parse options, call one function per command.

Every error a user can cause is a `MadError`; `main` prints it as one line and exits 2.
Option defaults come from the config dataclasses (ExtractConfig, TrainConfig), so they are stated once.
"""

from __future__ import annotations

import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import typer
import typer.core

# Before torch loads its OpenMP runtime (it reads this once): threads that finish a parallel region early sleep
# instead of spinning. Spinning threads of two processes on the same cores wait for each other's time slices:
# beside one other torch process on 2 cores a demo epoch took 21.6 s spinning, 10.2 s sleeping (idle: 5.2, 5.7 s;
# with more load beside, 114-218 s spinning).
# A user's own OMP_WAIT_POLICY wins (ACTIVE on a machine that runs nothing else).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mad.adapt.config import TrainConfig  # noqa: E402 (after the OpenMP setting above)
from mad.adapt.families import names, presets  # noqa: E402
from mad.bench.commands import bench_app  # noqa: E402
from mad.errors import MadError  # noqa: E402
from mad.demo import DemoConfig  # noqa: E402
from mad.extract.run import ExtractConfig  # noqa: E402
from mad.plan_sweep import SweepPlanConfig  # noqa: E402
from mad.sweep_cli import sweep_command  # noqa: E402



# click's UsageError (typer >= 0.22 vendors click as typer._click): the base of the BadParameter typer exports.
_UsageError = typer.BadParameter.__bases__[0]


class _CatchMadErrors(typer.core.TyperGroup):
    """Every command (and `mad bench ...`) runs inside this: a MadError, and click's own usage errors (an
    option's value of the wrong type, a missing or unknown option), are one line on stderr, exit status 2."""

    def make_context(self, *args, **kwargs):
        try:
            return super().make_context(*args, **kwargs)
        except _UsageError as e:
            _usage_error(e)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MadError as e:
            typer.echo(f"error: {error_line(e)}", err=True)
            raise typer.Exit(2) from None
        except _UsageError as e:
            _usage_error(e)
        except OSError as e:  # a path the system refuses (an --out under a file, no permission, a full disk)
            if e.errno == errno.EPIPE or e.filename is None:  # a closed pipe: typer's own handling
                raise
            typer.echo(f"error: {e.filename}: {e.strerror}", err=True)
            raise typer.Exit(2) from None


def _usage_error(e: Exception):
    """click's message in one line (not its usage block and framed panel); `mad` with no command shows help."""
    if type(e).__name__ == "NoArgsIsHelpError":
        raise e
    message = " ".join(e.format_message().split()).rstrip(".")
    where = f"; see {e.ctx.command_path} --help" if e.ctx is not None else ""
    typer.echo(f"error: {message}{where}", err=True)
    raise typer.Exit(2) from None


app = typer.Typer(cls=_CatchMadErrors, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="M-adapter video action recognition from a cached frozen open_clip ViT.")
app.add_typer(bench_app, name="bench")
# Warnings meant for users (random weights, ...) as one plain line, not a source excerpt.
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
EXTRACT, TRAIN, DEMO, SWEEP_PLAN = ExtractConfig(videos=""), TrainConfig(), DemoConfig(), SweepPlanConfig()


def error_line(error: BaseException) -> str:
    """The one line to show for an error (one re-raised from a DataLoader worker keeps its own last line)."""
    message = str(error)
    if "Original Traceback" in message:
        message = message.strip().splitlines()[-1].split(": ", 1)[-1]
    return message


@app.command()
def extract(
    videos: Path = typer.Option(..., "--videos", help="Folder of videos (searched recursively)."),
    out: str = typer.Option(EXTRACT.out, "--out", help="Cache store to create or resume (a folder or fsspec URL)."),
    layers: str = typer.Option(EXTRACT.layers, help="1-based block numbers, negatives from the end, or 'all'."),
    model: str = typer.Option(EXTRACT.model, help="open_clip model name or a model-config .json path."),
    pretrained: str = typer.Option(EXTRACT.pretrained, help="Pretrained tag, local checkpoint file, or 'none' (random)."),
    frames: int = typer.Option(EXTRACT.frames, help="Frames per clip (T)."),
    clips: int = typer.Option(EXTRACT.clips, help="Temporal views per video."),
    crops: int = typer.Option(EXTRACT.crops, help="Spatial views per clip: 1 (centre) or 3."),
    labels: Optional[Path] = typer.Option(None, help="Annotations: an MMAction2 list (label_map.txt beside it), a "
                                          "path,label CSV, a Kinetics CSV, an SSv2 train/validation JSON, a UCF101 "
                                          "trainlist/testlist, or a folder of HMDB51 (or UCF101) split files."),
    labels_format: str = typer.Option(EXTRACT.labels_format, "--labels-format", help="auto (from the file), "
                                      "mmaction, csv, kinetics, ssv2, ucf101 or hmdb51."),
    labels_split: Optional[str] = typer.Option(None, "--labels-split", help="With a folder of split files: "
                                               "train1, train2, train3, test1, test2 or test3."),
    grid_downsample: int = typer.Option(EXTRACT.grid_downsample, "--grid-downsample", "--pool",
                                        help="Average the patch grid in NxN cells before writing (N^2 x smaller)."),
    store: str = typer.Option(EXTRACT.store, "--store", help="compact: what the branch reads (cells, patch matches, "
                              "CLS, token means), 8-bit, 1/6 of the bytes, fixes --cell-size and --correlation for "
                              "training; full: every token, float16 (to sweep those settings)."),
    cell_size: str = typer.Option(EXTRACT.cell_size, "--cell-size", help="--store compact: the branch's cells "
                                  "(auto: no fewer than 7x7)."),
    correlation: int = typer.Option(EXTRACT.correlation, help="--store compact: radius of the stored patch matches "
                                    "(0: none)."),
    branches: str = typer.Option("madapter", help="Branch families to serve: madapter (reads --layers; also "
                                 "meanpool, linear), evl (adds the last --evl-layers blocks and the one before, "
                                 "float16, and the frozen weights of their q/k)."),
    evl_layers: Optional[int] = typer.Option(None, "--evl-layers", help="--branches evl: the model's last "
                                             "blocks EVL's decoder reads (default 4, the official)."),
    batch_size: int = typer.Option(EXTRACT.batch_size, help="Videos per forward pass."),
    workers: int = typer.Option(EXTRACT.workers, help="Decoding worker processes (-1: automatic)."),
    device: str = typer.Option(EXTRACT.device, help="cpu, cuda, cuda:N or auto."),
    precision: str = typer.Option(EXTRACT.precision, help="bf16, fp16 or fp32 backbone weights."),
    shard_size: int = typer.Option(EXTRACT.shard_size, help="Videos per Zarr shard (one writer per shard)."),
    shard: Optional[str] = typer.Option(None, help="I/N: extract only slice I of N of the store's shard blocks "
                                        "(Slurm arrays; under torchrun each rank takes its own slice)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry videos that failed before."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing store and start over."),
    limit: Optional[int] = typer.Option(None, help="Process at most this many pending videos (then stop)."),
    progress: bool = typer.Option(EXTRACT.progress, "--progress/--no-progress", help="Progress and summary: a bar "
                                  "on a terminal, plain lines (every 10%) in a log file or pipe."),
    train_views: Optional[int] = typer.Option(None, "--train-views", help="K augmented views per video (random "
                                              "frames within the TSN segments, random resized crop, flip) in place "
                                              "of --clips x --crops: `mad train` draws one per epoch."),
    crop_scale: str = typer.Option(EXTRACT.crop_scale, "--crop-scale", help="--train-views: crop area range, "
                                   "fractions of the frame in (0, 1]."),
    crop_ratio: str = typer.Option(EXTRACT.crop_ratio, "--crop-ratio", help="--train-views: crop width/height range."),
    flip: str = typer.Option(EXTRACT.flip, "--flip", help="--train-views: random horizontal flips, yes or no (no "
                             "when labels name a direction, e.g. Something-Something)."),
    view_seed: int = typer.Option(EXTRACT.view_seed, "--view-seed", help="--train-views: seeds each video's views "
                                  "(with its path)."),
):
    """Run the frozen model over every video and cache per-layer tokens (resumable)."""
    from mad.adapt.families import store_needs
    from mad.extract.run import extract as run_extract

    needs = store_needs(branches, evl_layers, grid_downsample)  # what the named branch families read
    summary = run_extract(ExtractConfig(
        videos=str(videos), out=out, layers=layers, model=model, pretrained=pretrained, frames=frames,
        clips=clips, crops=crops, labels=str(labels) if labels else None,
        labels_format=labels_format, labels_split=labels_split, grid_downsample=grid_downsample,
        store=store, cell_size=cell_size, correlation=correlation,
        batch_size=batch_size, workers=workers, device=device, precision=precision, shard_size=shard_size,
        shard=shard, retry_failed=retry_failed, overwrite=overwrite, limit=limit, progress=progress,
        train_views=train_views, crop_scale=crop_scale, crop_ratio=crop_ratio, flip=flip, view_seed=view_seed,
    ), needs)
    if summary["done_now"] == 0 and summary["failed_now"] > 0 and summary["done_total"] == 0:
        typer.echo(f"error: no video could be extracted; reasons in {summary['errors']}", err=True)
        raise typer.Exit(1)


@app.command()
def info(
    cache: str = typer.Argument(..., help="Cache store (folder or URL)."),
    verify: bool = typer.Option(False, "--verify", help="Read every chunk and check its checksum."),
):
    """Print a cache's manifest, counts, per-layer shapes and bytes on disk."""
    from mad.cache.info import show_info

    if not show_info(cache, verify=verify):
        raise typer.Exit(1)


@app.command()
def train(
    ctx: typer.Context,
    cache: str = typer.Option(TRAIN.cache, "--cache", help="Training cache (made by `mad extract`)."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation cache (same model, layers and frames)."),
    arch: str = typer.Option(TRAIN.arch, help=f"A registered branch family: {', '.join(names())} (options not "
                             f"given take its preset: {presets()}; 0: from the cache)."),
    width: int = typer.Option(TRAIN.width, help="Branch width."),
    depth: int = typer.Option(TRAIN.depth, help="Fusion/temporal blocks."),
    heads: int = typer.Option(TRAIN.heads, help="Attention heads."),
    temporal: str = typer.Option(TRAIN.temporal, help="Temporal module: conv (over T per token), conv3d (over T and neighbouring patches), attn or none."),
    motion: bool = typer.Option(TRAIN.motion, "--motion/--no-motion", help="Feed the blocks frame-to-frame token changes."),
    precision: str = typer.Option(TRAIN.precision, help="bf16 autocast for the branch: auto (on CUDA only), bf16 (also on CPU) or fp32."),
    correlation: int = typer.Option(TRAIN.correlation, help="Radius in patches of each patch's match to the previous frame (0: off; needs a square patch grid)."),
    cell_size: str = typer.Option(TRAIN.cell_size, "--cell-size", "--grid-pool", help="The branch averages the patch grid in NxN cells (its motion matches stay on the full grid): auto (no fewer than 7x7 cells), 1 (every patch), 2, ..."),
    epochs: int = typer.Option(TRAIN.epochs),
    lr: float = typer.Option(TRAIN.lr, help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(TRAIN.weight_decay),
    warmup_epochs: float = typer.Option(TRAIN.warmup_epochs),
    batch_size: int = typer.Option(TRAIN.batch_size),
    label_smoothing: float = typer.Option(TRAIN.label_smoothing),
    clip_grad: float = typer.Option(TRAIN.clip_grad, help="Max gradient norm (0: off)."),
    dropout: float = typer.Option(TRAIN.dropout, help="Dropout in the branch's blocks and before its head."),
    seed: int = typer.Option(TRAIN.seed),
    out: Optional[str] = typer.Option(None, "--out", help="Run folder (default runs/<arch>, numbered if taken)."),
    device: str = typer.Option(TRAIN.device, help="cpu, cuda, cuda:N or auto."),
    workers: int = typer.Option(TRAIN.workers, help="Reader processes when the cache is streamed."),
    in_ram: str = typer.Option(TRAIN.in_ram, "--in-ram", help="Hold the cache in RAM: auto, yes or no."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last epoch."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out."),
    log: str = typer.Option(TRAIN.log, "--log", help="Also log metrics.jsonl's numbers to: none or tensorboard "
                            "(<run>/tensorboard; pip install tensorboard)."),
    init: Optional[str] = typer.Option(None, "--init", help="--arch evl: start from an official EVL checkpoint "
                                       "(.pth; its decoder and head, the q/k weights from the cache)."),
):
    """Train the M-adapter branch (or a baseline) from cached tokens; no image model is loaded."""
    import dataclasses

    from mad.adapt.train import config_from_run, train as run_train

    options = dict(ctx.params)
    given = {k: v for k, v in options.items() if ctx.get_parameter_source(k).name == "COMMANDLINE"}
    cfg = TrainConfig(**options)  # every value checked, before any file is read
    if resume and out:
        # Resume with the run's own settings (its preset applied already); options given here override them.
        run_train(dataclasses.replace(config_from_run(out), **given))
    else:
        run_train(cfg, given=set(given))


@app.command("eval")
def evaluate_command(
    run: Path = typer.Option(..., "--run", help="Run folder (or its model.safetensors)."),
    cache: str = typer.Option(..., "--cache", help="Cache to score (e.g. the test split's)."),
    batch_size: int = typer.Option(64),
    device: str = typer.Option("auto"),
    in_ram: str = typer.Option("auto", "--in-ram", help="auto, yes or no."),
    workers: int = typer.Option(2),
):
    """Top-1, top-5 and mean class accuracy, single view and all views; writes eval-<cache>.json and
    predictions-<cache>.csv (one row per video: true class, top-5 with probabilities) in the run."""
    from mad.adapt.evaluate import evaluate

    result = evaluate(run, cache, batch_size, device, in_ram, workers)
    typer.echo(f"{result['videos']} videos, {result['views']} views each")
    for view in ("single_view", "multi_view"):
        typer.echo(f"{view:11s} " + "  ".join(f"{k} {v:.4f}" for k, v in result[view].items()))
    typer.echo(f"per-video predictions: {result['predictions']}")


@app.command("import-evl")
def import_evl(
    checkpoint: Path = typer.Argument(..., help="An official EVL checkpoint (.pth of "
                                      "OpenGVLab/efficient-video-recognition)."),
    cache: str = typer.Option(..., "--cache", help="A store extracted with --branches evl from the checkpoint's "
                              "backbone (its q/k weights, frames and classes are taken from it)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write model.safetensors into."),
):
    """Make a run folder from an official EVL checkpoint, for mad eval and mad predict."""
    from mad.adapt.import_evl import import_official

    typer.echo(f"wrote {import_official(checkpoint, cache, out)}")


app.command("sweep")(sweep_command)  # its options: mad/sweep_cli.py


@app.command()
def predict(
    videos: list[Path] = typer.Argument(..., help="Video files."),
    run: Path = typer.Option(..., "--run", help="A training run folder (or its model.safetensors)."),
    top: int = typer.Option(5, help="How many classes to print per video."),
    pretrained: Optional[str] = typer.Option(None, help="Backbone checkpoint file, when the cache was made from one."),
    device: str = typer.Option("auto"),
):
    """Classify new videos end to end: decode, frozen backbone (as in the run's cache), trained branch."""
    from mad.predict import predict_videos

    results = predict_videos([str(v) for v in videos], str(run), top, pretrained, device)
    for result in results:
        if "error" in result:
            typer.echo(f"{result['path']}: error: {result['error']}", err=True)
            continue
        typer.echo(f"{result['path']}: " + ", ".join(f"{name} {p:.3f}" for name, p in result["top"]))
    if all("error" in r for r in results):
        raise typer.Exit(1)


@app.command()
def plan(
    videos: Optional[Path] = typer.Option(None, "--videos", help="Folder of videos to count and probe."),
    num_videos: Optional[int] = typer.Option(None, "--num-videos", help="Or a number of videos."),
    val_videos: Optional[int] = typer.Option(None, "--val-videos", help="Videos of a val split, planned too."),
    val_views: Optional[int] = typer.Option(None, "--val-views", help="Views per val video (default: as train)."),
    model: str = typer.Option(EXTRACT.model, help="open_clip model name or a model-config .json path."),
    layers: str = typer.Option(EXTRACT.layers),
    frames: int = typer.Option(EXTRACT.frames),
    clips: int = typer.Option(EXTRACT.clips),
    crops: int = typer.Option(EXTRACT.crops),
    views: Optional[int] = typer.Option(None, help="Views per video (clips x crops), e.g. 9 for 3 x 3."),
    train_views: Optional[int] = typer.Option(None, "--train-views", help="The train split's augmented views per "
                                              "video (mad extract --train-views); val keeps --views."),
    grid_downsample: int = typer.Option(EXTRACT.grid_downsample, "--grid-downsample"),
    cell_size: str = typer.Option(EXTRACT.cell_size, "--cell-size", help="Compact stores' cells."),
    correlation: int = typer.Option(EXTRACT.correlation, help="Compact stores' correlation radius."),
    device: str = typer.Option(EXTRACT.device),
    precision: str = typer.Option(EXTRACT.precision),
    batch_size: int = typer.Option(EXTRACT.batch_size),
    workers: int = typer.Option(EXTRACT.workers, help="Decoding processes of the extraction (-1: its default)."),
    probe: int = typer.Option(4, help="Videos to decode and model batches to time (0: no probe, bytes only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    sweep: Optional[int] = typer.Option(None, help="Instead: predict a sweep of K configurations (docs/plan-sweep.md)."),
    epochs: int = typer.Option(SWEEP_PLAN.epochs, help="--sweep: epochs of each configuration."),
    arch: str = typer.Option(SWEEP_PLAN.arch, help="--sweep: the branch family whose FLOPs are counted."),
    store: str = typer.Option(SWEEP_PLAN.store, help="--sweep: the storage mode the sweep reads."),
    classes: int = typer.Option(SWEEP_PLAN.classes, help="--sweep: classes of the branch's head."),
    device_tflops: float = typer.Option(SWEEP_PLAN.device_tflops, help="--sweep: peak TFLOP/s (H100 SXM, bf16)."),
    utilisation: float = typer.Option(SWEEP_PLAN.utilisation, help="--sweep: share of the peak reached (assumed)."),
    disk_gbps: float = typer.Option(SWEEP_PLAN.disk_gbps, help="--sweep: store GB/s (one PCIe 4.0 NVMe drive)."),
    cpu_cores: int = typer.Option(SWEEP_PLAN.cpu_cores, help="--sweep: cores decoding videos in extraction."),
    decode_seconds: float = typer.Option(SWEEP_PLAN.decode_seconds, help="--sweep: CPU-seconds to decode a clip."),
):
    """Before any work: bytes per storage mode, extraction time here, reads; --sweep K: a sweep's predicted time."""
    from mad.plan import PlanConfig
    from mad.plan_sweep import plan_command
    plan_command(PlanConfig(
        videos=str(videos) if videos else None, num_videos=num_videos, val_videos=val_videos, val_views=val_views,
        model=model, layers=layers, frames=frames, clips=clips, crops=crops, views=views, train_views=train_views,
        grid_downsample=grid_downsample, cell_size=cell_size, correlation=correlation, device=device,
        precision=precision, batch_size=batch_size, workers=workers, probe=probe),
        SweepPlanConfig(sweep=sweep, epochs=epochs, arch=arch, store=store, classes=classes,
                        device_tflops=device_tflops, utilisation=utilisation, disk_gbps=disk_gbps,
                        cpu_cores=cpu_cores, decode_seconds=decode_seconds), as_json)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo's videos, caches and runs."),
    epochs: int = typer.Option(DEMO.epochs, help="Epochs of each arch's training."),
    seed: int = typer.Option(DEMO.seed),
    archs: Optional[str] = typer.Option(None, help="Archs to train, e.g. madapter,evl (default: the demo's)."),
):
    """The embedded default: synthetic temporal-order videos -> extract -> train madapter and the baselines."""
    from mad.demo import run_demo

    chosen = {"archs": tuple(a.strip() for a in archs.split(",") if a.strip())} if archs else {}
    run_demo(DemoConfig(out=str(out), epochs=epochs, seed=seed, **chosen))


@app.command()
def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (mad train) and sweep folders (mad sweep: all its runs)."),
    out: Path = typer.Option(Path("report.html"), "--out", help="The HTML file to write."),
    worst: int = typer.Option(8, help="Worst-scored val videos to show per run (with their sampled frames)."),
    device: str = typer.Option("auto", help="Where to score the runs' models on their val caches."),
):
    """One self-contained HTML page: leaderboard, curves, confusion matrices, per-class accuracy, worst videos."""
    from mad.report import write_report

    typer.echo(f"wrote {write_report(runs, out, device=device, worst=worst)}")


def main(argv: list[str] | None = None) -> None:
    """`python -m mad` and the benchmark scripts."""
    app(args=argv, prog_name="mad")


if __name__ == "__main__":
    sys.exit(main())
