"""`mad extract`'s options, declared once and taken by `mad extract` and `mad plan` (replacing `extract` by
`plan` in a command line plans that extraction); a branch family's own options (e.g. --evl-layers) come from
its registry entry (`Family.blocks_option`)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer

from mad.adapt.families import blocks_options, family, names, store_needs, stored_names
from mad.extract.run import ExtractConfig

EXTRACT = ExtractConfig(videos="")


def branches_help() -> str:
    """What extraction stores for each --branches name, and the families reading it (from the registry)."""
    readers = {name: [f for f in names() if family(f).stored_as == name and f != name] for name in stored_names()}
    return "; ".join(f"{name} ({family(name).stores}" + (f"; also read by {', '.join(readers[name])})"
                                                         if readers[name] else ")") for name in stored_names())


def _extract_options(
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
    branches: str = typer.Option(stored_names()[0], help=f"Branch families to serve: {branches_help()}."),
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
    """`mad extract`'s options but --videos, declared once: `mad plan` takes every one, so replacing `extract` by
    `plan` in a command line plans that extraction."""


def _family_options() -> list[inspect.Parameter]:
    """Each branch family's own `mad extract` option (e.g. --evl-layers), declared in its file."""
    return [inspect.Parameter(_parameter(option), inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
                              default=typer.Option(None, option, help=family(name).blocks_help))
            for name, option in blocks_options().items()]


def _parameter(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def with_extract_options(command):
    """`command` taking every `mad extract` option (after its own), handed to it in `**options`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    shared = list(inspect.signature(_extract_options, eval_str=True).parameters.values())
    command.__signature__ = inspect.Signature(own + shared + _family_options())
    return command


def extraction(videos: Path | None, options: dict):
    """(the ExtractConfig of `mad extract`'s options, what its --branches store beyond --layers)."""
    options = dict(options)
    blocks = {name: options.pop(_parameter(option)) for name, option in blocks_options().items()}
    needs = store_needs(options.pop("branches"), blocks, options["grid_downsample"])
    labels = options.pop("labels")
    return ExtractConfig(videos=str(videos) if videos else "", labels=str(labels) if labels else None,
                         **options), needs
