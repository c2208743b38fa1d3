"""What a run of `mad bench memory` is: its modes, its settings, and the settings checked once by the parent.

Imported by the mode processes too, so only torch, the standard library and the family registry (torch
modules) at the top.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from mad.adapt.families import family, names
from mad.errors import MadError
from mad.options import at_least, check_number
from mad.runtime import DTYPES

IN_BACKBONE_MODES = ("full-finetune", "in-backbone-adapter")
WHERE = {"online": "backbone no_grad", "cached": "no backbone"}  # a branch family's two modes: <arch>-<where>


def branch_modes(benchmarked: bool) -> tuple[str, ...]:
    """<arch>-online and <arch>-cached of every registered family that is (or is not) `benchmarked`."""
    return tuple(f"{name}-{where}" for name in names() if family(name).benchmarked == benchmarked for where in WHERE)


MODES = IN_BACKBONE_MODES + branch_modes(True)
# the other families (the static baselines), for the demo comparison; not in `mad bench memory`'s run
BASELINE_MODES = branch_modes(False)
REFERENCE_MODE = "in-backbone-adapter"  # ratios are to this: the family M-adapter is an alternative to
TRAINS = {"full-finetune": "backbone + head", "in-backbone-adapter": "adapters in the blocks + head",
          **{f"{name}-{where}": f"{family(name).trains} ({what})" for name in names() for where, what in WHERE.items()}}
GIB = 2**30
# every mode's optimizer: `mad.adapt.step.make_optimizer` with `mad train`'s defaults (the values do
# not change memory or time; they are here so the step is the one `mad train` runs)
LR = 1e-3
WEIGHT_DECAY = 0.05


class BenchError(MadError):
    """A benchmark that cannot run (message says why)."""


@dataclass
class BenchConfig:
    """Everything a mode's process needs; the shapes are resolved once, by the parent."""

    model: str  # open_clip name or model-config .json path
    frames: int  # T
    batch: int  # clips per step (B); the backbone sees B*T images
    layers: list[int]  # 1-based blocks tapped for the branch (the deepest one feeds the heads)
    device: str  # cpu, cuda, cuda:N (resolved, never "auto")
    precision: str  # backbone weights: fp32, bf16, fp16
    steps: int  # timed steps, after one warm-up step
    classes: int
    branch_width: int  # the branch's width d
    in_width: int  # backbone width D
    num_tokens: int  # N = 1 + H*W
    image_size: int
    threads: int = 0  # torch CPU threads in each mode's process (0: torch's default)
    cell_size: int = 1  # the branch's cells of n x n patches ("auto" resolved as `mad train` does)
    depth: int = 12  # the backbone's blocks: a family may read the last `last_blocks` and the one before them
    heads: int = 12  # of the backbone's attention (a family may recompute its q, k per head)
    last_blocks: int = 4
    # True: the blocks' own nn.MultiheadAttention in the modes that backpropagate through the
    # backbone, instead of `workloads.SelfAttention`; only to measure the artefact that avoids
    open_clip_attention: bool = False


def on_cuda(cfg: BenchConfig) -> bool:
    return cfg.device.startswith("cuda")


def resolve_config(model: str, frames: int, batch: int, layers: str, device: str, precision: str, steps: int,
                   classes: int, branch_width: int, threads: int = 0, cell_size: str | int = "auto") -> BenchConfig:
    """Check the options and read the backbone's shapes from its open_clip config (no model is built)."""
    from mad._compat import import_open_clip
    from mad.adapt.config import TrainConfig, resolve
    from mad.cache.manifest import Manifest
    from mad.extract.backbone import parse_layers, register_model_config
    from mad.runtime import resolve_device

    if precision not in DTYPES:
        raise BenchError(f"--precision {precision!r}: use one of {', '.join(DTYPES)}")
    for name, value in (("--frames", frames), ("--batch", batch), ("--steps", steps), ("--classes", classes)):
        if value < 1:
            raise BenchError(f"{name} must be at least 1 (got {value})")
    check_number("threads", threads, at_least(0, "0: torch's default"))
    try:
        device = str(resolve_device(device))
        name = register_model_config(model)
        open_clip = import_open_clip()
        vision = open_clip.get_model_config(name)["vision_cfg"]
        blocks = parse_layers(layers, vision["layers"])
    except MadError as e:
        raise BenchError(str(e)) from None
    if not device.startswith("cuda") and precision == "fp16":
        warnings.warn("fp16 training on CPU is slow and unusual; bf16 is the CPU default", stacklevel=2)
    size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    patch = vision["patch_size"] if isinstance(vision["patch_size"], int) else vision["patch_size"][0]
    num_tokens = 1 + (size // patch) ** 2
    side = size // patch
    manifest = Manifest(model=model, layers=blocks, frames=frames, tokens=num_tokens, width=vision["width"],
                        grid=[side, side], storage="full")
    try:  # the branch's settings, checked here (as `mad train` resolves them) rather than in every mode's process
        _, branch = resolve(TrainConfig(width=branch_width, cell_size=str(cell_size)), manifest, classes, model)
    except MadError as e:
        raise BenchError(f"{family(TrainConfig().arch).label} branch: {e}") from None
    heads = vision["width"] // vision.get("head_width", 64)
    return BenchConfig(model=model, frames=frames, batch=batch, layers=blocks, device=device, precision=precision,
                       steps=steps, classes=classes, branch_width=branch_width, in_width=vision["width"],
                       num_tokens=num_tokens, image_size=size, threads=threads, cell_size=branch.cell_size,
                       depth=vision["layers"], heads=heads, last_blocks=min(4, vision["layers"]))
