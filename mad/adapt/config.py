"""A run's configuration, resolved once: `resolve(settings, manifest, classes)`.

`TrainConfig` is what a user sets (`mad train`'s options, a sweep's grid, the demo), its branch's
settings nested in `model` (a `BranchConfig`); `resolve` applies the arch's preset to what the
user did not give, then what the store fixes, runs every check once and returns the config with
its `model` frozen and complete, before any data is read or any model exists. `mad train`, `mad sweep`, `mad demo` and the
benchmarks build through it; `mad eval` and `mad predict` rebuild a saved branch through the
registry (`mad.adapt.families.build_model`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

from mad.adapt.branch import BranchConfig, ConfigError, known_settings
from mad.adapt.families import Registered, check_served, family, names
from mad.adapt.madapter import TEMPORAL
from mad.adapt.step import CLIP_GRAD, LABEL_SMOOTHING
from mad.adapt.tracking import check_log
from mad.cache.manifest import Manifest
from mad.options import (FRACTION, NON_NEGATIVE, SEED, Range, at_least, check_choices, check_device,
                         check_ranges, nest, path_or_name)

_BRANCH = BranchConfig()
# The branch's settings a run sets, by the names the command line (--width) and a sweep's grid (width=) use.
# They live in `TrainConfig.model` only: TrainConfig(width=256) sets model.width and cfg.width reads it.
# Settings naming a file or folder: a relative and an absolute spelling of one are the same setting on resume.
PATH_SETTINGS = ("cache", "val", "init")
BRANCH_SETTINGS = ("arch", "width", "depth", "heads", "temporal", "motion", "correlation", "cell_size", "dropout")


class TrainError(ConfigError):
    """A training request that cannot be served (message names the option or file and says why)."""


@dataclass
class TrainConfig:
    """A run's settings, its branch's nested in `model` (nanoGPT's one config, passed whole): what the user set
    until `resolve` completes `model` against the store. Saved whole next to every run (config.json: "train"
    holds the fields but `model`, "model" the resolved branch)."""

    cache: str = "cache"  # training cache (store folder or URL)
    val: str | None = None  # validation cache; without one the last epoch is kept
    model: BranchConfig = field(default_factory=BranchConfig)  # the branch: arch (a registered family), width, ...
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
        """Settings by name, the branch's flat (`width`) or nested (`model`); older names read too, an unknown
        key is refused."""
        return cls(**known_settings(cls, values, what, also=BRANCH_SETTINGS))

    @classmethod
    def from_saved(cls, saved: dict, what: str) -> "TrainConfig":
        """The config of a run's config.json. Runs written before the branch nested in TrainConfig (mad < 0.3)
        also hold its settings flat in "train", unresolved: the resolved "model" beside them is what trained."""
        values = known_settings(cls, saved["train"], what, also=BRANCH_SETTINGS)
        if "model" in saved:
            values = {k: v for k, v in values.items() if k not in BRANCH_SETTINGS}
            values["model"] = BranchConfig.from_dict(saved["model"], f"{what}: model")
        return cls(**values)

    def saved(self) -> dict:
        """What config.json holds of it: {"train": every field but `model`, "model": the branch's}."""
        train = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {"train": train, "model": self.model.to_dict()}

    def flat(self) -> dict:
        """Every setting by the name an option gives it, the branch's flat (what a sweep's study records)."""
        return {name: getattr(self, name) for name in self.setting_names()}

    @classmethod
    def setting_names(cls) -> list[str]:
        """Every setting by the name an option or a grid gives it (the branch's flat, `model` not)."""
        return [f.name for f in fields(cls) if f.name != "model"] + list(BRANCH_SETTINGS)


nest(TrainConfig, "model", BRANCH_SETTINGS, default=lambda: _BRANCH,
     read=lambda values: BranchConfig.from_dict(values, "model"))


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
    """(the run's config with its `model` complete, that model) for tokens described by `manifest`: the arch's
    preset where `given` lacks a setting, then the user's settings, then what the store fixes; every check once,
    each refusal one line naming the option."""
    cfg = with_preset(cfg, given)
    check_options(cfg)
    entry = family(cfg.arch)
    check_served(cfg.arch, manifest, location)
    branch = cfg.model.replace(num_classes=num_classes, **entry.from_store(manifest))
    branch = entry.fit(branch, manifest, location)
    try:
        branch = entry.check(branch)
    except ValueError as e:  # a message that starts with the setting's name: make it the option's
        name, _, rest = str(e).partition(" ")
        if name in BRANCH_SETTINGS:
            raise TrainError(f"--{name.replace('_', '-')} {rest}") from None
        raise TrainError(f"{location}: {e}") from None
    return dataclasses.replace(cfg, model=branch), branch


def same_setting(name: str, saved, given) -> bool:
    """Whether a resumed run's (or sweep's) setting `name` is the saved one: PATH_SETTINGS as resolved paths."""
    if name in PATH_SETTINGS:
        return path_or_name(saved) == path_or_name(given)
    return saved == given


def config_from_run(run) -> TrainConfig:
    """The TrainConfig saved in a run's config.json (to resume it with the same settings)."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise TrainError(f"{path}: no run to resume here")
    return TrainConfig.from_saved(json.loads(path.read_text()), str(path))
