"""The frozen pre-trained image model: open_clip loading and per-layer token taps.

Layers are 1-based block numbers everywhere in mad (12 = last block of ViT-B);
open_clip's `forward_intermediates` takes 0-based indices, converted here only.
A tapped level is the block's residual-stream output before `ln_post`, CLS first:
[B, 1 + H*W, D]; level 0 (only asked for by a branch family, never by --layers) is the
input of block 1: the embeddings after `ln_pre`.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mad._compat import import_open_clip
from mad.errors import MadError
from mad.runtime import DTYPES, sha256_file


class BackboneError(MadError):
    """A model, checkpoint or layer request that cannot be served (message says why)."""


def parse_layers(spec: str | list[int], depth: int) -> list[int]:
    """'4,8,12' / '-1' / 'all' -> sorted unique 1-based block numbers within [1, depth]."""
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(range(1, depth + 1))
    items = spec if isinstance(spec, list) else [s for s in str(spec).replace(" ", "").split(",") if s]
    if not items:
        raise BackboneError("--layers: none given (use e.g. --layers 4,8,12, -1 or all)")
    layers = []
    for item in items:
        try:
            n = int(item)
        except ValueError:
            raise BackboneError(f"--layers {item!r}: not a block number (use e.g. 4,8,12, -1 or all)") from None
        block = n + depth + 1 if n < 0 else n
        if not 1 <= block <= depth or n == 0:
            raise BackboneError(f"--layers {n}: out of range, the model has blocks 1..{depth} (or -1..-{depth})")
        layers.append(block)
    return sorted(set(layers))


def register_model_config(model: str, config: dict | None = None) -> str:
    """Return an open_clip model name for `model`, registering a config JSON path or dict.

    `model` is an open_clip name (ViT-B-16, hf-hub:...) or a path to a model-config
    JSON; a config dict (from a cache manifest) re-registers a custom architecture.
    """
    open_clip = import_open_clip()
    if config is not None:
        name = Path(model).stem if model.endswith(".json") else model
        if name not in open_clip.list_models():
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(config))
                open_clip.add_model_config(path)
        return name
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise BackboneError(f"{model}: model config file not found")
        try:
            json.loads(Path(model).read_text())
        except json.JSONDecodeError as e:
            raise BackboneError(f"{model}: not a valid model-config JSON ({e})") from None
        open_clip.add_model_config(model)
        return Path(model).stem
    if not model.startswith(("hf-hub:", "local-dir:")) and model not in open_clip.list_models():
        raise BackboneError(f"unknown model {model!r}: not an open_clip model name or a config .json path")
    return model


def model_config_of(model: str) -> dict | None:
    """The architecture config to store in a manifest (None for open_clip's built-in names)."""
    if model.endswith(".json"):
        return json.loads(Path(model).read_text())
    return None


@dataclass
class BackboneInfo:
    """What a cache needs to know about the model that produced it."""

    model: str
    pretrained: str
    pretrained_sha256: str | None
    depth: int
    width: int
    image_size: int
    patch_size: int
    grid: tuple[int, int]
    heads: int                  # of each block's attention
    ln_eps: float               # of each block's ln_1
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Backbone(nn.Module):
    """open_clip's visual tower, truncated after the deepest requested block, frozen."""

    def __init__(self, visual: nn.Module, layers: list[int], info: BackboneInfo, dtype: torch.dtype,
                 grid_downsample: int = 1, levels: list[int] | None = None):
        super().__init__()
        self.visual = visual
        self.layers = layers  # the --layers blocks (1-based)
        self.levels = levels or layers  # what forward returns: `layers` and the extra levels, sorted
        self.info = info
        self.dtype = dtype
        self.grid_downsample = grid_downsample
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)

    @property
    def tokens(self) -> int:
        h, w = self.info.grid
        return 1 + (h // self.grid_downsample) * (w // self.grid_downsample)

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> list[torch.Tensor]:
        """uint8 frames [B, 3, S, S] -> one [B, N, D] tensor per level in `levels` (model dtype)."""
        x = (frames.float() / 255.0 - self.mean) / self.std
        inputs = []  # level 0: what block 1 receives, caught on its way in
        hook = (self.visual.transformer.resblocks[0].register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
                if 0 in self.levels else None)
        try:
            out = self.visual.forward_intermediates(
                x.to(self.dtype),
                indices=[level - 1 for level in self.levels if level > 0],  # open_clip is 0-based
                stop_early=True,
                intermediates_only=True,
                output_fmt="NLC",
                output_extra_tokens=True,  # else CLS is dropped
            )
        finally:
            if hook is not None:
                hook.remove()
        prefixes, grids = out["image_intermediates_prefix"], out["image_intermediates"]
        if inputs:
            if not getattr(self.visual.transformer, "batch_first", True):
                inputs[0] = inputs[0].transpose(0, 1)  # LND -> NLD
            prefixes, grids = [inputs[0][:, :1], *prefixes], [inputs[0][:, 1:], *grids]
        levels = []
        for cls, patches in zip(prefixes, grids):
            if self.grid_downsample > 1:
                B, L, D = patches.shape
                h, w = self.info.grid
                grid = patches.transpose(1, 2).reshape(B, D, h, w)
                patches = F.avg_pool2d(grid, self.grid_downsample).flatten(2).transpose(1, 2)  # [B, h*w/n^2, D]
            levels.append(torch.cat([cls, patches], dim=1))  # [B, 1 + H*W, D]
        return levels

    def frozen_qk(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """What recomputes the q and k of the attention of `blocks` (1-based) from their input, float32:
        ln_1 weight and bias [L, D], and the q and k rows of the in-projection, weight [L, 2D, D] and bias [L, 2D]."""
        D = self.info.width
        parts = {"ln_1_weight": [], "ln_1_bias": [], "qk_weight": [], "qk_bias": []}
        for block in blocks:
            resblock = self.visual.transformer.resblocks[block - 1]
            attn = resblock.attn
            if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None:
                raise BackboneError(f"{self.info.model}: block {block}'s attention has no packed in-projection; "
                                    "the q/k of its blocks cannot be recomputed from it")
            parts["ln_1_weight"].append(resblock.ln_1.weight)
            parts["ln_1_bias"].append(resblock.ln_1.bias)
            parts["qk_weight"].append(attn.in_proj_weight[: 2 * D])  # rows: q, then k, then v
            parts["qk_bias"].append(attn.in_proj_bias[: 2 * D])
        return {name: torch.stack(values).float().cpu() for name, values in parts.items()}


def load_backbone(model: str, pretrained: str = "none", layers: str | list[int] = "-1",
                  device: str | torch.device = "cpu", precision: str = "bf16", grid_downsample: int = 1,
                  model_config: dict | None = None, extra_levels=()) -> Backbone:
    """Build the frozen visual tower. `pretrained`: a tag (openai, laion2b_...), a local
    checkpoint file (its sha256 is recorded), or 'none' for random weights. `extra_levels`:
    levels a branch family reads beyond `layers` (0: the input of block 1), or a function
    of the model's depth that gives them."""
    open_clip = import_open_clip()
    name = register_model_config(model, model_config)
    if precision not in DTYPES:
        raise BackboneError(f"precision {precision!r}: use one of {', '.join(DTYPES)}")
    pretrained = pretrained or "none"
    sha = None
    if pretrained == "none":
        weights = None
    elif os.path.isfile(pretrained):
        sha = sha256_file(pretrained)
        weights = pretrained
    else:
        if pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.sep in pretrained:
            raise BackboneError(f"{pretrained}: checkpoint file not found")
        tags = open_clip.list_pretrained_tags_by_model(name) if not name.startswith("hf-hub:") else []
        if tags and pretrained not in tags:
            raise BackboneError(f"{model}: no pretrained tag {pretrained!r} (known: {', '.join(tags)})")
        weights = pretrained
    try:
        # Random weights are seeded, so a resumed extraction matches an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # open_clip logs its "initialized randomly" warning, and logs every error it then raises (an unknown
            # tag, a failed download): the raised one is printed once, as `error:`
            logging.disable(logging.ERROR)
            try:
                clip = open_clip.create_model(name, pretrained=weights, device="cpu")
            finally:
                logging.disable(logging.NOTSET)
    except RuntimeError as e:  # open_clip raises RuntimeError for bad or missing weights
        hint = ("; without network, pass the checkpoint file itself: --pretrained PATH/open_clip_pytorch_model.bin"
                if "download" in str(e).lower() else "")
        raise BackboneError(f"{model} with pretrained={pretrained}: {str(e).splitlines()[0]}{hint}") from None
    except Exception as e:  # a file that is no checkpoint: torch.load's EOFError, UnpicklingError, ...
        if weights is None or not os.path.isfile(weights):
            raise
        first = (str(e).splitlines() or [""])[0][:100]
        raise BackboneError(f"{pretrained}: not an open_clip checkpoint of {model} ({type(e).__name__}: {first})"
                            ) from None
    visual = clip.visual
    del clip  # drop the text tower
    depth = len(visual.transformer.resblocks)
    blocks = parse_layers(layers, depth)
    levels = sorted(set(blocks) | set(extra_levels(depth) if callable(extra_levels) else extra_levels))
    visual.transformer.resblocks = visual.transformer.resblocks[: max(levels)]  # nothing deeper is ever run
    pcfg = open_clip.get_model_preprocess_cfg(visual)
    image_size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
    grid = tuple(visual.grid_size)
    if grid_downsample > 1 and (grid[0] % grid_downsample or grid[1] % grid_downsample):
        raise BackboneError(f"--grid-downsample {grid_downsample} does not divide the {grid[0]}x{grid[1]} patch grid")
    first = visual.transformer.resblocks[0]
    info = BackboneInfo(
        model=model, pretrained=pretrained, pretrained_sha256=sha, depth=depth, width=visual.transformer.width,
        image_size=image_size, patch_size=patch, grid=grid, heads=getattr(first.attn, "num_heads", 0),
        ln_eps=first.ln_1.eps,
        mean=tuple(pcfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(pcfg.get("std", open_clip.OPENAI_DATASET_STD)),
    )
    if weights is None:  # said once the model is served (a refused request prints only its error)
        warnings.warn(f"{model}: random weights (--pretrained none, seed 0): the features are not pre-trained",
                      stacklevel=2)
    dtype = DTYPES[precision]
    visual = visual.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return Backbone(visual, blocks, info, dtype, grid_downsample, levels).to(device)

