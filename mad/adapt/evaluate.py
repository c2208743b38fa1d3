"""Scoring a trained branch on a cache: top-1, top-5, mean class accuracy, single- and multi-view.

Keys follow MMAction2: `acc/top1`, `acc/top5`, `acc/mean1` (mean of per-class
recall over the classes present). Single view = the first cached view of each
video; multi-view = softmax averaged over every cached view (clips x crops).

`evaluate` also writes one row per video to predictions-<cache>.csv (`write_predictions`),
so a user can find the videos the model gets wrong.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from mad.adapt.checkpoint import load_model
from mad.cache.dataset import CachedTokens, open_tokens, usable_videos
from mad.adapt.families import family, pair_keys, reads
from mad.cache.manifest import Manifest
from mad.cache.store import DONE, Store
from mad.errors import MadError
from mad.options import at_least, check_choice, check_number
from mad.runtime import resolve_device


class EvalError(MadError):
    """An evaluation request that cannot be served (message names the file and says why)."""


def predict_probs(model: torch.nn.Module, data: CachedTokens, batch_size: int, device: torch.device,
                  all_views: bool = False, *, arch: str) -> torch.Tensor:
    """Softmax probabilities of branch `model` (of `arch`: its family says how it takes a batch), float32
    [V, views, C] (views = 1 unless `all_views`)."""
    return predict_probs_together([model], data, batch_size, device, all_views, archs=[arch])[0]


@torch.no_grad()
def predict_probs_together(models: list[torch.nn.Module], data: CachedTokens, batch_size: int,
                           device: torch.device, all_views: bool = False, *, archs: list[str]) -> list[torch.Tensor]:
    """`predict_probs` of every model in `models` (of `archs`) on one read of `data`: each batch is read,
    moved and turned into each family's inputs once (a lockstep sweep validates its members so)."""
    entries = [family(arch) for arch in archs]
    for model in models:
        model.eval()
    views_used = data.num_views if all_views else 1
    probs: list[torch.Tensor | None] = [None] * len(models)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    for arrays, _, positions, views in data.eval_batches(batch_size, all_views):
        arrays, inputs = data.to_device(arrays, device), {}
        for i, (model, entry) in enumerate(zip(models, entries)):
            if entry.name not in inputs:
                inputs[entry.name] = entry.inputs(arrays, data.manifest)
            with autocast:
                logits = model(inputs[entry.name])
            p = logits.float().softmax(dim=-1).cpu()
            if probs[i] is None:
                probs[i] = torch.zeros(data.num_videos, views_used, p.shape[1])
            probs[i][positions, views] = p
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
    """Score `run_dir/model.safetensors` on `cache`; write eval-<cache>.json, confusion-<cache>.png and
    predictions-<cache>.csv there. Unlabelled videos get predictions but no score."""
    check_number("batch_size", batch_size, at_least(1))
    check_number("workers", workers, at_least(0, "0: read in this process"))
    check_choice("in_ram", in_ram, ("auto", "yes", "no"))
    run_dir = Path(run_dir)
    model_path = run_dir / "model.safetensors" if run_dir.is_dir() else run_dir
    run_dir = model_path.parent
    device = resolve_device(device)
    model, info = load_model(model_path, device)
    store = Store.open(cache)
    trained_on = Manifest.from_dict(info["manifest"], str(model_path)) if info.get("manifest") else store.manifest
    arch = info["branch"].arch
    trained_on.check_pair(store.manifest, str(cache), f"the training cache of {model_path}", pair_keys([arch]))
    if info.get("class_names") and store.class_names and info["class_names"] != store.class_names:
        raise EvalError(f"{cache}: class names differ from those {model_path} was trained with")
    usable_videos(store)  # refuses a cache with no extracted, labelled video to score
    data = open_tokens(store, in_ram, workers, progress=progress, videos=np.flatnonzero(store.status() == DONE),
                       arrays=reads([arch], store.manifest, str(cache)))
    try:
        num_classes = info["branch"].num_classes
        if int(data.labels.max()) >= num_classes:
            raise EvalError(f"{cache}: label {int(data.labels.max())} is outside the model's {num_classes} classes")
        probs = predict_probs(model, data, batch_size, device, all_views=True, arch=arch)  # [V, views, C]
    finally:
        data.close()
    labelled = data.labels >= 0
    labels, scored = data.labels[labelled], probs[labelled]
    multi = scored.mean(dim=1)
    matrix = confusion_matrix(multi.argmax(dim=1), labels, num_classes)
    name = Path(str(cache).rstrip("/")).name or "cache"
    result = {
        "model": str(model_path), "cache": str(cache), "videos": len(labels), "views": data.num_views,
        "unlabelled": int((~labelled).sum()),
        "single_view": accuracy(scored[:, 0], labels),
        "multi_view": accuracy(multi, labels),
        "confusion": matrix.tolist(),
        "class_names": info.get("class_names") or store.class_names,
        "predictions": str(run_dir / f"predictions-{name}.csv"),
    }
    (run_dir / f"eval-{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_predictions(run_dir / f"predictions-{name}.csv", data, probs, result["class_names"])
    from mad.adapt.plots import plot_confusion

    plot_confusion(matrix, result["class_names"], run_dir / f"confusion-{name}.png",
                   f"{name}: multi-view top-1 {result['multi_view']['acc/top1']:.3f}")
    return result


def write_predictions(path: Path, data: CachedTokens, probs: torch.Tensor, class_names: list[str]) -> None:
    """One CSV row per video of `data`, from its probabilities [V, views, C]:

        video, path, true_class                       store index, path in the cache, "" when unlabelled
        single_class1, single_prob1, ... 5            top-5 of the first view, most probable first
        single_true_prob, single_correct              probability of the true class, 1 if top-1 is right
        multi_class1, multi_prob1, ... 5, multi_true_prob, multi_correct    the same, mean over all views

    (top-k with k = min(5, classes), as `accuracy` scores it.)
    """
    names = class_names or [str(c) for c in range(probs.shape[-1])]
    k = min(5, probs.shape[-1])
    views = {"single": probs[:, 0], "multi": probs.mean(dim=1)}
    top = {view: p.topk(k, dim=1) for view, p in views.items()}  # the same ranking `accuracy` scores
    columns = ["video", "path", "true_class"]
    for view in views:
        columns += [f"{view}_{kind}{i}" for i in range(1, k + 1) for kind in ("class", "prob")]
        columns += [f"{view}_true_prob", f"{view}_correct"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, (video, video_path, label) in enumerate(zip(data.videos.tolist(), data.paths, data.labels.tolist())):
            row = [video, video_path, names[label] if label >= 0 else ""]
            for view, p in views.items():
                values, indices = top[view].values[i].tolist(), top[view].indices[i].tolist()
                for c, value in zip(indices, values):
                    row += [names[c], f"{value:.6f}"]
                row += [f"{p[i, label].item():.6f}", int(indices[0] == label)] if label >= 0 else ["", ""]
            writer.writerow(row)
