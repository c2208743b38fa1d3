"""Scoring a trained branch on a cache: top-1, top-5, mean class accuracy, single- and multi-view.

Keys follow MMAction2: `acc/top1`, `acc/top5`, `acc/mean1` (mean of per-class
recall over the classes present). Single view = the first cached view of each
video; multi-view = softmax averaged over every cached view (clips x crops).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mad.adapt.checkpoint import load_model
from mad.cache.dataset import CachedTokens, open_tokens
from mad.cache.manifest import Manifest, training_keys
from mad.cache.store import Store
from mad.errors import MadError
from mad.runtime import resolve_device


class EvalError(MadError):
    """An evaluation request that cannot be served (message names the file and says why)."""


@torch.no_grad()
def predict_probs(model: torch.nn.Module, data: CachedTokens, batch_size: int, device: torch.device,
                  all_views: bool = False, arch: str = "madapter") -> torch.Tensor:
    """Softmax probabilities of branch `model` (of `arch`), float32 [V, views, C] (views = 1 unless `all_views`)."""
    model.eval()
    views_used = data.num_views if all_views else 1
    probs = None
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for arrays, _, positions, views in data.eval_batches(batch_size, all_views):
        inputs = data.to_model(arrays, device, arch)
        with autocast:
            logits = model(inputs)
        p = logits.float().softmax(dim=-1).cpu()
        if probs is None:
            probs = torch.zeros(data.num_videos, views_used, p.shape[1])
        probs[positions, views] = p
    return probs


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc/top1, acc/top5 (top-k with k = min(5, classes)), acc/mean1 from [V, C] probabilities."""
    k = min(5, probs.shape[1])
    topk = probs.topk(k, dim=1).indices  # [V, k]
    correct = topk == labels[:, None]
    top1 = correct[:, 0].float()
    per_class = [top1[labels == c].mean().item() for c in labels.unique()]
    return {"acc/top1": top1.mean().item(), "acc/top5": correct.any(dim=1).float().mean().item(),
            "acc/mean1": float(np.mean(per_class))}


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """int64 [C, C]: rows are true classes, columns predicted ones."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels.numpy(), predictions.numpy()), 1)
    return matrix


def evaluate(run_dir, cache, batch_size: int = 64, device: str = "auto", in_ram: str = "auto",
             workers: int = 2, progress: bool = True) -> dict:
    """Score `run_dir/model.safetensors` on `cache`; write eval-<cache>.json and confusion-<cache>.png there."""
    run_dir = Path(run_dir)
    model_path = run_dir / "model.safetensors" if run_dir.is_dir() else run_dir
    run_dir = model_path.parent
    device = resolve_device(device)
    model, info = load_model(model_path, device)
    store = Store.open(cache)
    trained_on = Manifest.from_dict(info["manifest"], str(model_path)) if info.get("manifest") else store.manifest
    arch = info["branch"].arch
    trained_on.check_pair(store.manifest, str(cache), f"the training cache of {model_path}", training_keys([arch]))
    if info.get("class_names") and store.class_names and info["class_names"] != store.class_names:
        raise EvalError(f"{cache}: class names differ from those {model_path} was trained with")
    data = open_tokens(store, in_ram, workers, progress=progress, archs=(arch,))
    try:
        num_classes = info["branch"].num_classes
        if int(data.labels.max()) >= num_classes:
            raise EvalError(f"{cache}: label {int(data.labels.max())} is outside the model's {num_classes} classes")
        probs = predict_probs(model, data, batch_size, device, all_views=True, arch=arch)  # [V, views, C]
    finally:
        data.close()
    labels = data.labels
    multi = probs.mean(dim=1)
    matrix = confusion_matrix(multi.argmax(dim=1), labels, num_classes)
    result = {
        "model": str(model_path), "cache": str(cache), "videos": data.num_videos, "views": data.num_views,
        "single_view": accuracy(probs[:, 0], labels),
        "multi_view": accuracy(multi, labels),
        "confusion": matrix.tolist(),
        "class_names": info.get("class_names") or store.class_names,
    }
    name = Path(str(cache).rstrip("/")).name or "cache"
    (run_dir / f"eval-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    from mad.adapt.plots import plot_confusion

    plot_confusion(matrix, result["class_names"], run_dir / f"confusion-{name}.png",
                   f"{name}: multi-view top-1 {result['multi_view']['acc/top1']:.3f}")
    return result
