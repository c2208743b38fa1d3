"""Saving and loading what training produces: the branch (safetensors) and a run's resumable state (last.pt)."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from mad.adapt.branch import BranchConfig
from mad.adapt.families import build_model
from mad.errors import CheckpointError, MadError


def save_model(model: nn.Module, path, branch: BranchConfig, info: dict | None = None) -> None:
    """Weights as safetensors, with the branch's config (and `info`) in its metadata."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    metadata = {"format": 1, "model_args": branch.to_dict(), **(info or {})}
    with replacing(path) as partial:
        save_file(state, str(partial), metadata={"mad": json.dumps(metadata)})


@contextmanager
def replacing(path):
    """Write `path` as a whole or not at all: into a file beside it, renamed over it when complete (a process
    killed while writing, e.g. a sweep under SIGKILL, leaves the previous file intact)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def load_model(path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, metadata) from a file written by `save_model`; metadata["branch"] is its BranchConfig."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such model file") from None
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None
    if "mad" not in metadata:
        raise CheckpointError(f"{path}: not a mad model (no 'mad' metadata)")
    info = json.loads(metadata["mad"])
    try:
        info["branch"] = BranchConfig.from_dict(info["model_args"], f"{path}: model_args")
        model = build_model(info["branch"])
    except (TypeError, ValueError, MadError) as e:
        raise CheckpointError(f"{path}: cannot rebuild the model ({e})") from None
    load_state(model, load_file(str(path)), path)
    return model.to(device).eval(), info


def load_state(model: nn.Module, state: dict, path) -> None:
    """`model.load_state_dict(state)`, refusing (with names and shapes) a state that does not fit."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = ([f"shapes differ: {', '.join(wrong[:3])}"] if wrong else []) + \
               ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
               ([f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model ({'; '.join(problems)})")
    model.load_state_dict(state)


def save_training_state(path: Path, epoch: int, model, optimizer, scheduler) -> None:
    """Everything `restore_training_state` needs to continue after `epoch` exactly as if never stopped."""
    with replacing(path) as partial:
        torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, partial)


def restore_training_state(path: Path, model, optimizer, scheduler, device) -> int:
    """Load `path` (last.pt) into the model, optimizer, scheduler and RNGs; return its epoch."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise CheckpointError(f"{path}: cannot be read ({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    load_state(model, state["model"], path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    return int(state["epoch"])
