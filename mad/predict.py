"""`mad predict`: end to end on new videos (decode -> frozen backbone -> trained branch).

Sits above both stages: it rebuilds the backbone that made the run's training
cache from that cache's manifest, so tokens are produced exactly as they were for
training (model, weights, layers, frames, views, grid downsampling).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from mad.adapt.checkpoint import load_model
from mad.adapt.families import family
from mad.cache.manifest import Manifest
from mad.errors import MadError
from mad.extract.backbone import load_backbone
from mad.extract.decode import DecodeError, decode_clip
from mad.options import at_least, check_number
from mad.runtime import resolve_device, sha256_file


class PredictError(MadError):
    """Videos cannot be classified with this run (message says why)."""


def _weights_for(manifest: Manifest, pretrained: str | None) -> str:
    """The `pretrained` argument that reproduces the cache's backbone, checked against its sha256."""
    recorded, sha = manifest.pretrained, manifest.pretrained_sha256
    if sha is None:
        if pretrained and pretrained != recorded:
            raise PredictError(f"the run was trained on {recorded!r} features; --pretrained {pretrained} differs")
        return recorded
    if not pretrained:
        raise PredictError(f"the run's backbone weights came from a local file ({recorded}, sha256 {sha[:12]}...): "
                           "pass it with --pretrained FILE")
    if not os.path.isfile(pretrained):
        raise PredictError(f"{pretrained}: checkpoint file not found")
    if sha256_file(pretrained) != sha:
        raise PredictError(f"{pretrained}: sha256 differs from the weights the run's cache was made with")
    return pretrained


@torch.no_grad()
def predict_videos(videos: list[str], run: str, top: int = 5, pretrained: str | None = None,
                   device: str = "auto", precision: str | None = None) -> list[dict]:
    """[{path, top: [(class name, probability)...]} or {path, error}] for each video."""
    check_number("top", top, at_least(1))
    model_file = Path(run) / "model.safetensors" if Path(run).is_dir() else Path(run)
    branch, info = load_model(model_file)
    manifest = Manifest.from_dict(info["manifest"], str(model_file))
    class_names = info.get("class_names") or [str(i) for i in range(info["branch"].num_classes)]
    device = resolve_device(device)
    levels_read = family(info["branch"].arch).levels(manifest)  # the levels its family reads as tokens
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        backbone = load_backbone(manifest.model, _weights_for(manifest, pretrained), manifest.layers, device,
                                 precision or manifest.precision, manifest.grid_downsample,
                                 model_config=manifest.model_config, extra_levels=levels_read)
    branch = branch.to(device)
    results = []
    for path in videos:
        try:
            clip = decode_clip(path, manifest.frames, manifest.clips, manifest.crops, manifest.image_size)
        except DecodeError as e:
            results.append({"path": path, "error": str(e)})
            continue
        frames = torch.from_numpy(clip.frames)  # [views, T, 3, S, S]
        views, T = frames.shape[:2]
        tapped = dict(zip(backbone.levels, backbone(frames.flatten(0, 1).to(device))))  # level -> [views * T, N, D]
        # As in the cache: float16 tokens, then float for the branch.
        levels = [tapped[n].to(torch.float16).view(views, T, *tapped[n].shape[1:]) for n in levels_read]
        probs = branch(levels).float().softmax(dim=-1).mean(dim=0)  # averaged over views: [C]
        values, indices = probs.topk(min(top, probs.numel()))
        results.append({"path": path, "top": [(class_names[i], float(p)) for p, i in zip(values, indices)]})
    return results
