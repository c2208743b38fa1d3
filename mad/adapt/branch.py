"""What every branch family shares: its config (`BranchConfig`), its registry entry (`Family`), the registry.

A branch family is one file under mad/adapt/ that defines its model and registers one
`Family` (timm's `register_model`, open_clip's preset configs): its preset, what it reads
from a store, what extraction must store for it, its check, its builder and its
description. `mad.adapt.families` imports every family file, so the registry is full;
nothing else in mad names a family. Adding one: README, "Adding a branch family".
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from mad.cache.manifest import TRAINING_KEYS, Manifest, StoreNeed
from mad.errors import MadError


class ConfigError(MadError):
    """A setting that cannot be served (the message names the option and says why)."""


# Old names of settings, in checkpoints, run configs and sweep grids written before mad 0.2: the one table.
RENAMED = {"grid_pool": "cell_size"}


def known_settings(cls, values: dict, what: str, also=()) -> dict:
    """`values` under today's names; a key that is no field of `cls` (nor in `also`) is refused in one line (the
    one policy for every config)."""
    values = {RENAMED.get(k, k): v for k, v in values.items()}
    unknown = sorted(set(values) - {f.name for f in fields(cls)} - set(also))
    if unknown:
        raise ConfigError(f"{what}: unknown settings {', '.join(unknown)} (written by a newer mad?)")
    return values


@dataclass(frozen=True)
class BranchConfig:
    """Everything that defines a branch; saved in every checkpoint (`model_args`) and run (config.json).

    The first six fields describe the cached tokens (the store's manifest fixes them);
    the rest are the branch's own settings. 0 in width, heads or depth: the family's
    value from the store (EVL's q/k/v width D, D / 64 heads, one layer per cached block).
    """

    arch: str = "madapter"       # a registered family (mad.adapt.families.names())
    num_levels: int = 3          # K cached levels
    in_width: int = 768          # D of the cached tokens
    num_tokens: int = 197        # N = 1 + H*W
    num_frames: int = 8          # T
    num_classes: int = 400
    width: int = 384             # d, the branch's width
    depth: int = 1               # blocks
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.1         # in the blocks (attention output, MLP) and before the head
    temporal: str = "conv"       # conv (over T per token), conv3d (over T and neighbouring patches), attn, none
    kernel_size: int = 3
    motion: bool = True          # add the frame-to-frame change of every token
    correlation: int = 1         # radius in patches of the match to the previous frame; 0: off
    correlation_groups: int = 4  # channel groups matched separately
    cell_size: int | str = "auto"  # average the patch grid in n x n cells; auto: see `resolve_cell_size`
    qk_heads: int = 12           # the backbone attention's heads and ln_1 eps (EVL recomputes its q, k)
    qk_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: dict, what: str = "branch settings") -> "BranchConfig":
        return cls(**known_settings(cls, values, what))

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **changes) -> "BranchConfig":
        return dataclasses.replace(self, **changes)


class Family:
    """One registry entry. The defaults serve a family that reads the store's `--layers` tokens as they are;
    a family overrides what differs (`mad.adapt.evl.EVLFamily` reads its own levels and frozen weights).
    Its model also takes the list of full float16 levels [B, T, N, D] of `levels` (what `mad predict` feeds)."""

    name: str = ""                 # the --arch value
    description: str = ""          # one line, for --help and the README
    label: str = ""                # its name in tables and charts (e.g. "M-adapter"; "": `name`)
    trains: str = "branch"         # what its training step trains, as `mad bench memory` reports it
    benchmarked: bool = False      # in `mad bench memory`'s default modes (<name>-online, <name>-cached)
    model: type[nn.Module]         # built from a resolved BranchConfig
    preset: dict = {}              # settings it trains with where the user gave none (TrainConfig/BranchConfig names)
    stored_as: str = "madapter"    # the --branches entry whose stored inputs it reads (the manifest's `branches` key)
    pair_keys: tuple[str, ...] = TRAINING_KEYS  # manifest fields on which two caches it reads must agree
    starts_from_file: bool = False  # `start_from` reads a checkpoint format of its own (mad train --init)
    start_help: str = ""           # what `start_from` reads, for --init's help
    stores: str = "--layers only"  # what extraction stores for `--branches <name>`, for --branches' help
    blocks_option: str = ""        # its own `mad extract` option: how many of the model's last blocks it reads
    blocks_help: str = ""          # (`store_need`'s last_blocks), e.g. "--evl-layers"; "": none
    commands: dict = {}            # `mad` commands of its own: name -> "module:function" (a typer command)

    def store_need(self, last_blocks: int | None = None) -> StoreNeed:
        """What extraction must store for `--branches <stored_as>` beyond --layers (asked of the family named
        `stored_as`); `last_blocks`: its `blocks_option`, for a family that reads the model's last blocks
        (None: its default)."""
        return StoreNeed()

    def check(self, cfg: BranchConfig) -> BranchConfig:
        """`cfg` resolved (no "auto", no 0 left), or a ValueError whose message starts with the setting's name."""
        return cfg

    def from_store(self, manifest: Manifest) -> dict:
        """BranchConfig fields the store fixes."""
        return dict(num_levels=len(self.levels(manifest)), in_width=manifest.width, num_tokens=manifest.tokens,
                    num_frames=manifest.frames)

    def fit(self, cfg: BranchConfig, manifest: Manifest, location: str) -> BranchConfig:
        """`cfg` as the store can serve it, or a MadError naming the option and the store."""
        return cfg

    def levels(self, manifest: Manifest) -> list[int]:
        """The levels it reads as tokens, shallow to deep (`mad predict` taps them on the backbone)."""
        return list(manifest.layers)

    def reads(self, manifest: Manifest) -> list[str]:
        """The data arrays of the store it reads."""
        return [f"layers/{n}" for n in self.levels(manifest)]

    def inputs(self, arrays: dict[str, torch.Tensor], manifest: Manifest) -> Any:
        """A batch's arrays (`reads`, on the training device) as the model takes them."""
        return [arrays[name] for name in self.reads(manifest)]  # float16 as cached: the branch upcasts

    def build(self, cfg: BranchConfig, frozen: dict | None = None) -> nn.Module:
        """The model of a checked `cfg`; `frozen`: the store's frozen weights (saved with the model after)."""
        return self.model(cfg)

    def start_from(self, model: nn.Module, path) -> None:
        """Load checkpoint `path` (a format of the family's own, e.g. its authors') into a freshly built `model`."""
        raise ConfigError(f"--init {path}: --arch {self.name} starts from no checkpoint file")

    def describe(self, cfg: BranchConfig, parameters: int) -> str:
        """The line `mad train` prints about the branch it built."""
        return f"{self.name}: {parameters:,} trainable parameters"


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` to the registry under its name (a family file's one registration line)."""
    if family.name in FAMILIES and type(FAMILIES[family.name]) is not type(family):
        raise ValueError(f"a branch family named {family.name!r} is registered already")
    FAMILIES[family.name] = family
    return family


def check_positive(cfg: BranchConfig, names=("width", "heads", "depth"), zero_ok: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < (0 if zero_ok else 1):
            raise ValueError(f"{name} must be at least 1{', or 0 for the store' if zero_ok else ''} (got {value})")


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
