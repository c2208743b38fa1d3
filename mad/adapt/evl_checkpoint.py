"""Official EVL checkpoints (OpenGVLab/efficient-video-recognition) in mad.

    mad train --arch evl --init FILE.pth ...             fine-tune from one (`TrainConfig.init`)
    mad import-evl FILE.pth --cache STORE --out RUN      a run folder (model.safetensors) for mad eval / predict

The official main.py saves `{"model": DDP(model).state_dict(), "optimizer": ..., ...}` with torch.save, so every
key starts with `module.`, and only the decoder and the head are in it: the frozen backbone is kept out of the
module tree. Our parameter names are the official ones (mad.adapt.evl), so the decoder and head load strictly,
name for name and shape for shape. The backbone's q/k projections (our `qk.*` buffers) come from the store
(`frozen/evl_*`), never from the checkpoint: the store must be extracted from the backbone the checkpoint was
trained on (the official K400 weights: CLIP ViT-B/16 or L/14, `--pretrained openai`), and the head's class i is
the store's class i (the official K400 heads: the classes in alphabetical order).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mad.adapt.checkpoint import CheckpointError

FROZEN = "qk."  # our buffers that the store fills, not the checkpoint


def read_official(path) -> dict[str, torch.Tensor]:
    """The state dict of an official checkpoint file, `module.` (DDP) prefixes removed."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"{path}: cannot be read as a torch checkpoint ({str(e).splitlines()[0]})") from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not state or not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not an EVL checkpoint (no 'model' state dict of tensors in it)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_official(model: nn.Module, path, state: dict[str, torch.Tensor] | None = None) -> None:
    """The decoder and head of official checkpoint `path` into EVL `model`, strictly; its `qk.*` stay as they are
    (the store's, loaded by `model.load_frozen`)."""
    state = read_official(path) if state is None else state
    backbone = sorted(k for k in state if k.startswith("backbone."))
    if backbone:
        raise CheckpointError(f"{path}: holds backbone weights ({backbone[0]}, ...): it was trained with the backbone "
                              "fine-tuned, and mad recomputes EVL's q/k from the frozen backbone in the store")
    ours = model.state_dict()
    expected = {k: v for k, v in ours.items() if not k.startswith(FROZEN)}
    wrong = [f"{k} is {tuple(state[k].shape)} in the checkpoint, {tuple(v.shape)} here"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = (wrong[:2] + ([f"missing {', '.join(missing[:3])}"] if missing else [])
                + ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []))
    if problems:
        raise CheckpointError(f"{path}: does not fit the EVL decoder made for this store (its frames, patch grid, "
                              f"width, blocks and classes; q/k weights from the store): {'; '.join(problems)}")
    model.load_state_dict({**state, **{k: v for k, v in ours.items() if k.startswith(FROZEN)}}, strict=True)


def import_official(checkpoint, cache: str, out) -> Path:
    """Write `out`/model.safetensors: the official checkpoint's decoder and head over `cache`'s EVL levels, the q/k
    weights from `cache`. Its shape settings come from the checkpoint (layers, q/k/v width, classes; 64-wide heads
    as in every official config); the cache's manifest and class names are recorded as a trained run's are."""
    from mad.adapt.checkpoint import save_model
    from mad.adapt.madapter import build_model, check_branch
    from mad.adapt.train import TrainConfig
    from mad.cache.store import Store
    from mad.extract.backbone import sha256_file

    out = Path(out)
    if (out / "model.safetensors").exists():
        raise CheckpointError(f"{out}: already holds a model.safetensors; pass another --out")
    state = read_official(checkpoint)
    store = Store.open(cache)
    store.manifest.check_serves("evl", str(cache))
    try:
        classes = state["proj.2.weight"].shape[0]
        width = state["decoder.decoder_layers.0.attn.q_proj.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"{checkpoint}: not an EVL checkpoint (no {e.args[0]})") from None
    depth = len({k.split(".")[2] for k in state if k.startswith("decoder.decoder_layers.")})
    names = store.class_names
    if names and len(names) != classes:
        raise CheckpointError(f"{checkpoint}: its head has {classes} classes, {cache} has {len(names)} class names")
    settings = TrainConfig.for_arch("evl", cache=str(cache), width=width, heads=max(1, width // 64), depth=depth)
    try:
        branch = check_branch(settings.branch(store.manifest, classes))
    except ValueError as e:
        raise CheckpointError(f"{checkpoint} over {cache}: {e}") from None
    model = build_model(branch)
    model.load_frozen({name: torch.from_numpy(value) for name, value in store.frozen().items()})
    load_official(model, checkpoint, state)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.safetensors", branch,
               {"class_names": names, "manifest": store.manifest.to_dict(), "arch": "evl",
                "imported_from": {"file": Path(checkpoint).name, "sha256": sha256_file(checkpoint)}})
    return out / "model.safetensors"
