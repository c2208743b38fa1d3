"""Checks of option values, shared by the config dataclasses (TrainConfig, ExtractConfig, PlanConfig, ...).

Each config's `check()` runs in its `__post_init__`, so the CLI, a sweep's grid, the demo and the
benchmarks all refuse a bad value before any work and before any folder is made, in one line that
names the command-line option and what it accepts:

    --lr -1.0: must be a number > 0
    --crops 2: use 1 or 3
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mad.errors import MadError

SEED_MAX = 2**32 - 1  # the data order seeds torch with seed * 100003 + epoch: a signed 64-bit integer


def option(name: str) -> str:
    """'batch_size' -> '--batch-size'."""
    return "--" + name.replace("_", "-")


def path_or_name(value):
    """A setting that names a file or folder (or a hub name, a URL) as a resumed run compares it with the saved
    one: an existing file or folder by its resolved path, so a relative and an absolute spelling of it agree;
    anything else as given (ViT-B-16, hf-hub:..., s3://...)."""
    if isinstance(value, str) and value and os.path.exists(value):
        return str(Path(value).resolve())
    return value


@dataclass(frozen=True)
class Range:
    """The numbers an option accepts: `low`/`high` (None: unbounded), each bound excluded when `*_open`.
    Always finite (nan and inf are refused); `integer` options refuse fractions."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    note: str = ""  # what a special value means, e.g. "0: off"

    def __contains__(self, value) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.low is not None and self.high is not None:
            if self.integer and not (self.low_open or self.high_open):
                text = f"{kind} from {self.low} to {self.high}"
            else:
                brackets = "(" if self.low_open else "[", ")" if self.high_open else "]"
                text = f"{kind} in {brackets[0]}{self.low}, {self.high}{brackets[1]}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text = f"{kind} {'<' if self.high_open else '<='} {self.high}"
        else:
            text = f"a finite {kind[2:] if self.integer else 'number'}"
        return text + (f" ({self.note})" if self.note else "")


def at_least(low: int, note: str = "") -> Range:
    return Range(low=low, integer=True, note=note)


POSITIVE = Range(low=0, low_open=True)
NON_NEGATIVE = Range(low=0)
FRACTION = Range(low=0, high=1, high_open=True)  # dropout, label smoothing: [0, 1)
SEED = Range(low=0, high=SEED_MAX, integer=True)


def check_ranges(config, ranges: dict[str, Range]) -> None:
    """Refuse the first field of `config` outside its Range (a None value is an option not given)."""
    for name, allowed in ranges.items():
        check_number(name, getattr(config, name), allowed)


def check_number(name: str, value, allowed: Range) -> None:
    """Refuse a value of option `name` that is not a number in `allowed` (None: not given)."""
    if value is None:
        return
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float)) or (
        allowed.integer and not isinstance(value, int))
    if wrong_type or value not in allowed:
        raise MadError(f"{option(name)} {value!r}: must be {allowed}")


def check_counts(**values) -> None:
    """Refuse any of these options (a benchmark's counts: frames, clips, epochs, ...) below 1."""
    for name, value in values.items():
        check_number(name, value, at_least(1))


def check_choices(config, choices: dict[str, tuple]) -> None:
    """Refuse the first field of `config` that is not one of its choices (None: not given)."""
    for name, allowed in choices.items():
        if getattr(config, name) is not None:
            check_choice(name, getattr(config, name), allowed)


def check_choice(name: str, value, choices, flag: str | None = None) -> None:
    """Refuse a value that is not one of `choices`."""
    if value not in choices:
        choices = [str(c) for c in choices]
        listed = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
        raise MadError(f"{flag or option(name)} {value!r}: use {listed}")


def check_cell_size(value, flag: str = "--cell-size") -> None:
    """auto, or a cell side of 1 (every patch) or more."""
    text = str(value)
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise MadError(f"{flag} {value!r}: use auto, 1 (every patch) or a larger cell side")


def check_layers(spec, flag: str = "--layers") -> None:
    """The syntax of a layer list ('4,8,12', '-1', 'all'); the model's depth is checked when it is loaded."""
    if isinstance(spec, list) or str(spec).strip().lower() == "all":
        return
    items = [s for s in str(spec).replace(" ", "").split(",") if s]
    if not items:
        raise MadError(f"{flag} {spec!r}: give block numbers, e.g. 4,8,12, -1 or all")
    for item in items:
        if not item.lstrip("-").isdigit() or int(item) == 0:
            raise MadError(f"{flag} {spec!r}: {item!r} is not a block number (1-based, negatives from the end, "
                           "e.g. 4,8,12, -1 or all)")


def check_device(device: str, flag: str = "--device") -> None:
    """auto, cpu, cuda, cuda:N (N a device of this machine) or mps."""
    import torch

    device = str(device)
    if device in ("auto", "cpu"):
        return
    if device == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise MadError(f"{flag} mps: MPS is not available on this machine")
        return
    kind, _, index = device.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise MadError(f"{flag} {device!r}: use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise MadError(f"{flag} {device}: CUDA is not available on this machine")
    if index and int(index) >= torch.cuda.device_count():
        raise MadError(f"{flag} {device}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")


def nest(cls, name: str, settings: tuple[str, ...], default, read=None):
    """Nest a config in `cls` as its field `name` (nanoGPT's one config, passed whole), its `settings` by the
    names options use: `cls(width=256)` sets `cfg.<name>.width` and `cfg.width` reads it, so each is kept once,
    in the nested config; `dataclasses.replace(cfg, width=...)` works too. `default()`: the nested config when
    none is given; `read(dict)`: one given as a dict (from `asdict` or a saved file)."""
    import dataclasses
    import functools

    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, **values):
        given = {k: values.pop(k) for k in settings if k in values}
        nested = values.get(name)
        nested = default() if nested is None else read(nested) if isinstance(nested, dict) else nested
        values[name] = dataclasses.replace(nested, **given) if given else nested
        init(self, **values)

    cls.__init__ = __init__
    for setting in settings:  # read-only: a change goes through replace, which checks it again
        setattr(cls, setting, property(lambda self, s=setting: getattr(getattr(self, name), s),
                                       doc=f"{name}.{setting}"))
    return cls
