"""The registry, full: every branch family's file is imported here (one line each), and what the rest of mad
asks of families goes through these functions, so no other module names one.

    family("evl")                 the registered entry, or a MadError listing the registered names
    check_served(arch, manifest)  a store holding no inputs for `arch` refused, in one line
    store_needs("madapter,evl", n)  what extraction must store for a --branches list (`StoreNeed` per name)
    build_model(cfg, frozen)      the model of a resolved BranchConfig
"""

from __future__ import annotations

import torch.nn as nn

from mad.adapt import baselines, evl, madapter  # noqa: F401  (each registers its families)
from mad.adapt.branch import FAMILIES, BranchConfig, ConfigError, Family
from mad.cache.manifest import TRAINING_KEYS, Manifest, StoreNeed
from mad.options import at_least, check_number


class Registered:
    """The registered archs as a live collection of choices (an option's CHOICES): a family registered later
    is one too."""

    def __contains__(self, name) -> bool:
        return name in FAMILIES

    def __iter__(self):
        return iter(FAMILIES)


def names() -> list[str]:
    """The registered archs, in registration order."""
    return list(FAMILIES)


def presets() -> str:
    """The registered presets as options, e.g. 'evl --lr 0.0004 --dropout 0.5 ...' (for --help)."""
    return "; ".join(f"{f.name} " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in f.preset.items())
                     for f in FAMILIES.values() if f.preset) or "none"


def family(arch: str) -> Family:
    try:
        return FAMILIES[arch]
    except KeyError:
        raise ConfigError(f"--arch {arch!r}: not a registered branch family (use {', '.join(FAMILIES)})") from None


def stored_names() -> list[str]:
    """The --branches names: what a store can be extracted for."""
    return list(dict.fromkeys(f.stored_as for f in FAMILIES.values()))


def blocks_options() -> dict[str, str]:
    """--branches name -> its own `mad extract` option for the model's last blocks it reads (e.g. --evl-layers)."""
    return {name: FAMILIES[name].blocks_option for name in stored_names() if FAMILIES[name].blocks_option}


def store_needs(branches: str, last_blocks: int | dict | None = None, grid_downsample: int = 1) -> dict[str, StoreNeed]:
    """What extraction must store for a --branches list (the layers' entry always: --layers are always stored),
    or a ConfigError naming the option. `last_blocks`: the `blocks_options` given, per --branches name (one
    number: for each; None: each family's default)."""
    options = blocks_options()
    blocks = last_blocks if isinstance(last_blocks, dict) else {name: last_blocks for name in options}
    for name, value in blocks.items():  # checked when given, served or not
        if value is not None:
            check_number(options[name].lstrip("-").replace("-", "_"), value, at_least(1))
    named = [name.strip() for name in branches.split(",") if name.strip()]
    known = stored_names()
    unknown = [name for name in named if name not in known]
    if unknown:
        raise ConfigError(f"--branches: unknown branch family {', '.join(unknown)} (use {', '.join(known)})")
    chosen = [known[0]] + [name for name in named if name != known[0]]
    needs = {name: FAMILIES[name].store_need(blocks.get(name)) for name in chosen}
    for name, need in needs.items():
        if need.full_grid and grid_downsample > 1:
            raise ConfigError(f"--branches {name} reads every patch token (its q/k are recomputed from them): "
                              "extract it with --grid-downsample 1")
    return needs


def pair_keys(archs) -> tuple[str, ...]:
    """The manifest fields two caches must agree on for models of every one of `archs` to read both."""
    keys = [family(arch).pair_keys for arch in archs]
    return tuple(k for k in TRAINING_KEYS if any(k in ks for ks in keys))


def check_served(arch: str, manifest: Manifest, location: str) -> None:
    """Refuse, in one line saying what to re-extract, a store holding no inputs for `arch` (one reading --layers
    alone is served by every store, made before --branches or since)."""
    entry = family(arch)
    layers_only = family(entry.stored_as).store_need() == StoreNeed()
    manifest.check_serves(entry.stored_as, arch, location, layers_only)


def reads(archs, manifest: Manifest, location: str) -> list[str]:
    """The data arrays models of `archs` read of a store; a store that holds no inputs for one is refused."""
    arrays = []
    for arch in archs:
        check_served(arch, manifest, location)
        arrays += [name for name in family(arch).reads(manifest) if name not in arrays]
    return arrays


def build_model(cfg: BranchConfig, frozen: dict | None = None) -> nn.Module:
    """The branch of a BranchConfig (checked here: a checkpoint's config is rebuilt through this)."""
    entry = family(cfg.arch)
    return entry.build(entry.check(cfg), frozen)
