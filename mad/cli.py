"""The `mad` command line: parse options, call one function per command."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="M-adapter video action recognition from a cached frozen open_clip ViT.")
bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks (print figures and ratios).")
app.add_typer(bench_app, name="bench")
# Warnings meant for users (random weights, ...) as one plain line, not a source excerpt.
warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"


def fail(message: str, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def extract(
    videos: Path = typer.Option(..., "--videos", help="Folder of videos (searched recursively)."),
    out: str = typer.Option("cache", "--out", help="Cache store to create or resume (a folder or fsspec URL)."),
    layers: str = typer.Option("4,8,12", help="1-based block numbers, negatives from the end, or 'all'."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name or a model-config .json path."),
    pretrained: str = typer.Option("openai", help="Pretrained tag, local checkpoint file, or 'none' (random)."),
    frames: int = typer.Option(8, help="Frames per clip (T)."),
    clips: int = typer.Option(1, help="Temporal views per video."),
    crops: int = typer.Option(1, help="Spatial views per clip: 1 (centre) or 3."),
    labels: Optional[Path] = typer.Option(None, help="'path label' list (with label_map.txt beside it) or CSV path,label."),
    pool: int = typer.Option(1, help="Average the patch grid by this factor before writing."),
    batch_size: int = typer.Option(4, help="Videos per forward pass."),
    workers: int = typer.Option(-1, help="Decoding worker processes (-1: automatic)."),
    device: str = typer.Option("auto", help="cpu, cuda, cuda:N or auto."),
    precision: str = typer.Option("bf16", help="bf16, fp16 or fp32 backbone weights."),
    shard_size: int = typer.Option(32, help="Videos per Zarr shard (one writer per shard)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Retry videos that failed before."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete an existing store and start over."),
    limit: Optional[int] = typer.Option(None, help="Process at most this many pending videos (then stop)."),
):
    """Run the frozen model over every video and cache per-layer tokens (resumable)."""
    from mad.extract.run import ExtractConfig, ExtractError, extract as run_extract

    cfg = ExtractConfig(
        videos=str(videos), out=out, layers=layers, model=model, pretrained=pretrained, frames=frames,
        clips=clips, crops=crops, labels=str(labels) if labels else None, pool=pool, batch_size=batch_size,
        workers=workers, device=device, precision=precision, shard_size=shard_size,
        retry_failed=retry_failed, overwrite=overwrite, limit=limit,
    )
    try:
        summary = run_extract(cfg)
    except ExtractError as e:
        fail(str(e))
    if summary["done_now"] == 0 and summary["failed_now"] > 0 and summary["done_total"] == 0:
        fail(f"no video could be extracted; reasons in {summary['errors']}", code=1)


@app.command()
def info(
    cache: str = typer.Argument(..., help="Cache store (folder or URL)."),
    verify: bool = typer.Option(False, "--verify", help="Read every chunk and check its checksum."),
):
    """Print a cache's manifest, counts, per-layer shapes and bytes on disk."""
    from mad.cache.info import InfoError, show_info

    try:
        ok = show_info(cache, verify=verify)
    except InfoError as e:
        fail(str(e))
    if not ok:
        raise typer.Exit(1)


@bench_app.command("extract")
def bench_extract(
    videos: Path = typer.Option(..., "--videos", help="Folder of videos (e.g. ../shared/data/k2/train)."),
    model: str = typer.Option("ViT-B-16", help="open_clip model name (random weights)."),
    layers: str = typer.Option("4,8,12"),
    frames: int = typer.Option(8),
    limit: int = typer.Option(24, help="Number of clips to use."),
    batch_size: int = typer.Option(4),
    workers: int = typer.Option(-1),
    device: str = typer.Option("auto"),
    precision: str = typer.Option("bf16"),
    long_clip: Optional[Path] = typer.Option(None, help="Clip for the short-vs-long decode test (default: longest)."),
    out: Optional[Path] = typer.Option(None, help="Write the figures as JSON into this folder."),
):
    """Decode-only, model-only and full extraction throughput, and the ratios between them."""
    from mad.bench.extract import bench_extract as run

    run(str(videos), model, layers, frames, limit, batch_size, workers, device, precision,
        str(long_clip) if long_clip else None, str(out) if out else None)


def main() -> None:  # `python -m mad`
    app(prog_name="mad")


if __name__ == "__main__":
    sys.exit(main())
