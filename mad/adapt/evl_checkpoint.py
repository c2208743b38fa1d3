"""Official EVL checkpoints (OpenGVLab/efficient-video-recognition) in mad.

    mad train --arch evl --init FILE.pth ...             fine-tune from one (`EVLFamily.start_from`)
    mad import-evl FILE.pth --cache STORE --out RUN      a run folder for mad eval / predict (`mad.adapt.import_evl`)

The official main.py saves `{"model": DDP(model).state_dict(), "optimizer": ..., ...}` with torch.save, so every
key starts with `module.`, and only the decoder and the head are in it: the frozen backbone is kept out of the
module tree. Our parameter names are the official ones (mad.adapt.evl), so the decoder and head load strictly,
name for name and shape for shape. The backbone's q/k projections (our `qk.*` buffers) come from the store
(`frozen/evl_*`), never from the checkpoint: the store must be extracted from the backbone the checkpoint was
trained on (the official K400 weights: CLIP ViT-B/16 or L/14, `--pretrained openai`), and the head's class i is
the store's class i (the official K400 heads: the classes in alphabetical order).
"""

from __future__ import annotations


import torch
import torch.nn as nn

from mad.errors import CheckpointError

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
