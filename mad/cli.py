"""The `mad` command line: parse options, call one function per command.

Every error a user can cause is a `MadError`; `main` prints it as one line and exits 2.
Option defaults come from the config dataclasses (ExtractConfig, TrainConfig), so they are stated once.
"""

from __future__ import annotations

import errno
import importlib
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
from mad.adapt.families import family, names, presets  # noqa: E402
from mad.bench.commands import bench_app  # noqa: E402
from mad.errors import MadError  # noqa: E402
from mad.demo import DemoConfig  # noqa: E402
from mad.extract.run import ExtractConfig  # noqa: E402
from mad.extract_cli import extraction, with_extract_options  # noqa: E402
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
@with_extract_options
def extract(videos: Path = typer.Option(..., "--videos", help="Folder of videos (searched recursively)."),
            **options):
    """Run the frozen model over every video and cache per-layer tokens (resumable)."""
    from mad.extract.run import extract as run_extract

    summary = run_extract(*extraction(videos, options))
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
    init: Optional[str] = typer.Option(None, "--init", help="A checkpoint to start from: " + "; ".join(
        f"--arch {f}: {family(f).start_help}" for f in names() if family(f).starts_from_file) + "."),
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


for _entry in map(family, names()):  # the commands a branch family's own file defines (e.g. import-evl)
    for _name, _target in _entry.commands.items():
        _module, _, _function = _target.partition(":")
        app.command(_name)(getattr(importlib.import_module(_module), _function))


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
@with_extract_options
def plan(
    videos: Optional[Path] = typer.Option(None, "--videos", help="Folder of videos to count and probe."),
    num_videos: Optional[int] = typer.Option(None, "--num-videos", help="Or a number of videos."),
    val_videos: Optional[int] = typer.Option(None, "--val-videos", help="Videos of a val split, planned too."),
    val_views: Optional[int] = typer.Option(None, "--val-views", help="Views per val video (default: as train)."),
    views: Optional[int] = typer.Option(None, help="Views per video (clips x crops), e.g. 9 for 3 x 3."),
    probe: int = typer.Option(4, help="Videos to decode and model batches to time (0: no probe, bytes only)."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as one JSON object."),
    sweep: Optional[int] = typer.Option(None, help="Instead: predict a sweep of K configurations (docs/plan-sweep.md)."),
    epochs: int = typer.Option(SWEEP_PLAN.epochs, help="--sweep: epochs of each configuration."),
    arch: str = typer.Option(SWEEP_PLAN.arch, help="--sweep: the branch family whose FLOPs are counted."),
    classes: int = typer.Option(SWEEP_PLAN.classes, help="--sweep: classes of the branch's head."),
    device_tflops: float = typer.Option(SWEEP_PLAN.device_tflops, help="--sweep: peak TFLOP/s (H100 SXM, bf16)."),
    utilisation: float = typer.Option(SWEEP_PLAN.utilisation, help="--sweep: share of the peak reached (assumed)."),
    disk_gbps: float = typer.Option(SWEEP_PLAN.disk_gbps, help="--sweep: store GB/s (one PCIe 4.0 NVMe drive)."),
    cpu_cores: int = typer.Option(SWEEP_PLAN.cpu_cores, help="--sweep: cores decoding videos in extraction."),
    decode_seconds: float = typer.Option(SWEEP_PLAN.decode_seconds, help="--sweep: CPU-seconds to decode a clip."),
    **options,
):
    """Before any work: bytes per storage mode, extraction time here, reads; --sweep K: a sweep's predicted time
    (reading --store). Takes every `mad extract` option: replace `extract` by `plan` in a command line."""
    from mad.plan import PlanConfig
    from mad.plan_sweep import plan_command

    cfg, needs = extraction(videos, options)
    plan_command(PlanConfig(extract=cfg, num_videos=num_videos, val_videos=val_videos, val_views=val_views,
                            views=views, probe=probe),
                 SweepPlanConfig(sweep=sweep, epochs=epochs, arch=arch, store=cfg.store, classes=classes,
                                 device_tflops=device_tflops, utilisation=utilisation, disk_gbps=disk_gbps,
                                 cpu_cores=cpu_cores, decode_seconds=decode_seconds), as_json, needs)


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
