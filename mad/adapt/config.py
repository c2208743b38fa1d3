"""A run's configuration, resolved once: `resolve(settings, manifest, classes)`.

`TrainConfig` is what a user sets (`mad train`'s options, a sweep's grid, the demo); `resolve`
applies the arch's preset to what the user did not give, then what the store fixes, runs every
check once and returns the run's config and its branch's (`BranchConfig`, frozen, complete),
before any data is read or any model exists. `mad train`, `mad sweep`, `mad demo` and the
benchmarks build through it; `mad eval` and `mad predict` rebuild a saved branch through the
registry (`mad.adapt.families.build_model`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from mad.adapt.branch import BranchConfig, ConfigError, known_settings
from mad.adapt.families import Registered, family, names
from mad.adapt.madapter import TEMPORAL
from mad.adapt.step import CLIP_GRAD, LABEL_SMOOTHING
from mad.adapt.tracking import check_log
from mad.cache.manifest import Manifest
from mad.options import (FRACTION, NON_NEGATIVE, SEED, Range, at_least, check_choices, check_device,
                         check_ranges)

_BRANCH = BranchConfig()
# The settings TrainConfig hands to the branch (the rest of BranchConfig is fixed by the store or the family).
BRANCH_SETTINGS = ("arch", "width", "depth", "heads", "temporal", "motion", "correlation", "cell_size", "dropout")


class TrainError(ConfigError):
    """A training request that cannot be served (message names the option or file and says why)."""


@dataclass
class TrainConfig:
    cache: str = "cache"  # training cache (store folder or URL)
    val: str | None = None  # validation cache; without one the last epoch is kept
    arch: str = _BRANCH.arch  # a registered branch family (settings not given take its preset)
    width: int = _BRANCH.width
    depth: int = _BRANCH.depth
    heads: int = _BRANCH.heads
    temporal: str = _BRANCH.temporal
    motion: bool = _BRANCH.motion
    correlation: int = _BRANCH.correlation
    cell_size: str = str(_BRANCH.cell_size)  # auto, 1 (every patch), 2, ...
    dropout: float = _BRANCH.dropout
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    batch_size: int = 32
    label_smoothing: float = LABEL_SMOOTHING
    clip_grad: float = CLIP_GRAD  # max gradient norm; 0 turns clipping off
    seed: int = 0
    out: str | None = None  # run folder; default runs/<arch>, runs/<arch>-2, ...
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast for the branch: auto = on CUDA only; bf16 = on any device; fp32 = never
    workers: int = 2  # reader processes when the cache is streamed
    in_ram: str = "auto"  # auto, yes or no
    resume: bool = False  # continue the run in `out` from its last completed epoch
    overwrite: bool = False  # replace the run in `out`
    log: str = "none"  # trackers mirroring metrics.jsonl: none or tensorboard (comma-separated)
    init: str | None = None  # a checkpoint file to start from, for a family that reads one (evl: an official EVL)

    # What each number and each named choice may be (width, depth, heads: the family's check, in `resolve`,
    # against the store; arch: the registry, live)
    RANGES: ClassVar[dict] = {"epochs": at_least(1), "batch_size": at_least(1),
                              "lr": Range(low=0, note="0: weights stay"),
                              "weight_decay": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "dropout": FRACTION,
                              "label_smoothing": FRACTION, "clip_grad": Range(low=0, note="0: off"), "seed": SEED,
                              "correlation": at_least(0, "0: off"), "workers": at_least(0, "0: read in this process")}
    CHOICES: ClassVar[dict] = {"precision": ("auto", "bf16", "fp32"), "in_ram": ("auto", "yes", "no"),
                               "temporal": TEMPORAL, "arch": Registered()}

    def __post_init__(self):
        self.check()

    def check(self) -> "TrainConfig":
        """Refuse, in one line naming the option, a run setting that cannot be served: before any data is read
        (the branch's settings are checked against the store by `resolve`)."""
        check_options(self)
        return self

    @classmethod
    def from_dict(cls, values: dict, what: str = "training settings") -> "TrainConfig":
        """A config saved in a run's config.json (older names read too; an unknown key is refused)."""
        return cls(**known_settings(cls, values, what))


def with_preset(cfg: TrainConfig, given=None) -> TrainConfig:
    """`cfg` with its arch's preset for every setting not in `given` (what a command line or a grid set;
    None: every setting was given, as in the Python API)."""
    if given is None:
        return cfg
    preset = family(cfg.arch).preset
    return dataclasses.replace(cfg, **{k: v for k, v in preset.items() if k not in given})


def check_options(cfg: TrainConfig) -> None:
    """Refuse the run's own settings (not the branch's) that cannot be served, before any data is read."""
    check_ranges(cfg, cfg.RANGES)
    check_choices(cfg, cfg.CHOICES)  # an unknown arch: the registered ones
    check_device(cfg.device)
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite contradict each other: pick one")
    if cfg.resume and not cfg.out:
        raise TrainError("--resume needs --out: the run folder to continue")
    if cfg.init and not family(cfg.arch).starts_from_file:
        those = [name for name in names() if family(name).starts_from_file]
        raise TrainError(f"--init {cfg.init}: a checkpoint to start from, for --arch {', '.join(those)} only")
    check_log(cfg.log)  # a tracker whose package is missing fails here, before any data is read


def resolve(cfg: TrainConfig, manifest: Manifest, num_classes: int, location: str = "",
            given=None) -> tuple[TrainConfig, BranchConfig]:
    """(the run's config, its branch's) for tokens described by `manifest`: the arch's preset where `given`
    lacks a setting, then the user's settings, then what the store fixes; every check once, each refusal one
    line naming the option."""
    cfg = with_preset(cfg, given)
    check_options(cfg)
    entry = family(cfg.arch)
    manifest.check_serves(entry.stored_as, cfg.arch, location)
    branch = BranchConfig(num_classes=num_classes, **{k: getattr(cfg, k) for k in BRANCH_SETTINGS},
                          **entry.from_store(manifest))
    branch = entry.fit(branch, manifest, location)
    try:
        return cfg, entry.check(branch)
    except ValueError as e:  # a message that starts with the setting's name: make it the option's
        name, _, rest = str(e).partition(" ")
        if name in BRANCH_SETTINGS:
            raise TrainError(f"--{name.replace('_', '-')} {rest}") from None
        raise TrainError(f"{location}: {e}") from None


def config_from_run(run) -> TrainConfig:
    """The TrainConfig saved in a run's config.json (to resume it with the same settings)."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise TrainError(f"{path}: no run to resume here")
    return TrainConfig.from_dict(json.loads(path.read_text())["train"], str(path))
