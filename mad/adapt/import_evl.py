"""`mad import-evl FILE.pth --cache STORE --out RUN`: a run folder (model.safetensors) from an official EVL
checkpoint, for mad eval and mad predict (the checkpoint format itself: `mad.adapt.evl_checkpoint`)."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from mad.adapt.checkpoint import save_model
from mad.adapt.config import TrainConfig, resolve
from mad.adapt.evl_checkpoint import load_official, read_official
from mad.adapt.families import family
from mad.cache.store import Store
from mad.errors import CheckpointError, MadError
from mad.runtime import sha256_file


def import_official(checkpoint, cache: str, out) -> Path:
    """Write `out`/model.safetensors: the official checkpoint's decoder and head over `cache`'s EVL levels, the q/k
    weights from `cache`. Its shape settings come from the checkpoint (layers, q/k/v width, classes; 64-wide heads
    as in every official config); the cache's manifest and class names are recorded as a trained run's are."""
    out = Path(out)
    if (out / "model.safetensors").exists():
        raise CheckpointError(f"{out}: already holds a model.safetensors; pass another --out")
    state = read_official(checkpoint)
    store = Store.open(cache)
    try:
        classes = state["proj.2.weight"].shape[0]
        width = state["decoder.decoder_layers.0.attn.q_proj.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{checkpoint}: not an EVL checkpoint (no {e.args[0]})") from None
    depth = len({k.split(".")[2] for k in state if k.startswith("decoder.decoder_layers.")})
    names = store.class_names
    if names and len(names) != classes:
        raise CheckpointError(f"{checkpoint}: its head has {classes} classes, {cache} has {len(names)} class names")
    settings = TrainConfig(arch="evl", cache=str(cache), width=width, heads=max(1, width // 64), depth=depth)
    try:
        _, branch = resolve(settings, store.manifest, classes, str(cache), given={"cache", "width", "heads", "depth"})
    except MadError as e:
        raise CheckpointError(f"{checkpoint} over {cache}: {e}") from None
    model = family("evl").build(branch, {name: torch.from_numpy(value) for name, value in store.frozen().items()})
    load_official(model, checkpoint, state)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.safetensors", branch,
               {"class_names": names, "manifest": store.manifest.to_dict(), "arch": "evl",
                "imported_from": {"file": Path(checkpoint).name, "sha256": sha256_file(checkpoint)}})
    return out / "model.safetensors"


def import_evl_command(
    checkpoint: Path = typer.Argument(..., help="An official EVL checkpoint (.pth of "
                                      "OpenGVLab/efficient-video-recognition)."),
    cache: str = typer.Option(..., "--cache", help="A store extracted with --branches evl from the checkpoint's "
                              "backbone (its q/k weights, frames and classes are taken from it)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write model.safetensors into."),
):
    """Make a run folder from an official EVL checkpoint, for mad eval and mad predict."""
    typer.echo(f"wrote {import_official(checkpoint, cache, out)}")
