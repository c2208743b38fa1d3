"""What a sweep varies: a `--grid` of listed values or a `--space` of ranges, as Optuna distributions.

    parse_space("lr=1e-3,1e-4; weight_decay=0,0.05", grid=True)
    parse_space("lr=loguniform:1e-4:1e-2; dropout=uniform:0:0.3; arch=madapter,evl")

Items are separated by `;` or spaces. `name=v1,v2,...` lists values (a grid takes only these);
`name=uniform:low:high` and `name=loguniform:low:high` are ranges (an integer setting draws
integers). A name is a TrainConfig field a sweep may vary; each value is cast to that field's
type and checked against its range before anything is read or written.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mad.adapt.branch import RENAMED
from mad.adapt.config import TrainConfig, TrainError
from mad.errors import MadError

# Settings a sweep may not vary: they name the data, the run and its logs, not the training.
FIXED = ("cache", "val", "out", "resume", "overwrite", "log")
RANGES = ("uniform", "loguniform")


def settings() -> dict[str, type]:
    """Every setting a sweep may vary -> the type of its values."""
    defaults = TrainConfig()
    return {name: (type(getattr(defaults, name)) if getattr(defaults, name) is not None else str)
            for name in TrainConfig.setting_names() if name not in FIXED}  # the branch's by their option names


def parse_space(text: str, grid: bool = False) -> dict[str, BaseDistribution]:
    """{setting: distribution}, in the order written; refuses (naming --grid or --space) an unknown setting,
    a value of the wrong type or out of the setting's range, an empty range, a range in a grid."""
    flag = "--grid" if grid else "--space"
    kinds = settings()
    parsed: dict[str, BaseDistribution] = {}
    for item in text.replace(";", " ").split():
        name, sep, values = item.partition("=")
        name = RENAMED.get(name.replace("-", "_"), name.replace("-", "_"))
        if not sep or not values:
            raise TrainError(f"{flag} item {item!r}: write setting=value1,value2"
                             + ("" if grid else " or setting=uniform:low:high"))
        if name not in kinds:
            raise TrainError(f"{flag} item {item!r}: {name!r} is not a setting a sweep can vary ({', '.join(kinds)})")
        if name in parsed:
            raise TrainError(f"{flag} item {item!r}: {name} is given twice")
        kind = kinds[name]
        how, _, bounds = values.partition(":")
        if how in RANGES and bounds:
            if grid:
                raise TrainError(f"{flag} item {item!r}: a grid lists its values; ranges go in --space with --trials")
            parsed[name] = _range(item, name, kind, how, bounds, flag)
            continue
        try:
            listed = [_cast(value, kind) for value in values.split(",")]
        except ValueError:
            raise TrainError(f"{flag} item {item!r}: {name} takes {kind.__name__} values") from None
        for value in listed:
            _check_value(item, name, value, flag)
        parsed[name] = CategoricalDistribution(list(dict.fromkeys(listed)))
    if not parsed:
        example = "'lr=1e-3,3e-4; arch=madapter,linear'" if grid else "'lr=loguniform:1e-4:1e-2; arch=madapter,evl'"
        raise TrainError(f"{flag} {text!r}: no setting; write e.g. {example}")
    return parsed


def _range(item: str, name: str, kind: type, how: str, bounds: str, flag: str) -> BaseDistribution:
    if kind not in (int, float):
        raise TrainError(f"{flag} item {item!r}: {name} is not a number; list its values instead")
    try:
        low, high = (float(b) for b in bounds.split(":"))
        if kind is int:
            if not (low.is_integer() and high.is_integer()):
                raise ValueError(bounds)
            low, high = int(low), int(high)
    except ValueError:
        raise TrainError(f"{flag} item {item!r}: write {name}={how}:low:high with {kind.__name__} bounds") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise TrainError(f"{flag} item {item!r}: empty range ({low} to {high}); write low < high")
    if how == "loguniform" and low <= 0:
        raise TrainError(f"{flag} item {item!r}: a loguniform range needs low > 0")
    for value in (low, high):
        _check_value(item, name, value, flag)
    log = how == "loguniform"
    return IntDistribution(low, high, log=log) if kind is int else FloatDistribution(low, high, log=log)


def _cast(value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("true", "1", "yes")
    return kind(value)


def _check_value(item: str, name: str, value, flag: str) -> None:
    """The setting's own check (TrainConfig's ranges and choices), named by the item."""
    try:
        TrainConfig(**{name: value})
    except MadError as e:
        raise TrainError(f"{flag} item {item!r}: {e}") from None


def grid_points(space: dict[str, BaseDistribution]) -> list[dict]:
    """Every combination of a grid, in the order written (the order of the run folders' numbers)."""
    return [dict(zip(space, values)) for values in itertools.product(*(d.choices for d in space.values()))]


def is_grid(space: dict[str, BaseDistribution]) -> bool:
    return all(isinstance(d, CategoricalDistribution) for d in space.values())


def suggest(trial: optuna.Trial, space: dict[str, BaseDistribution]) -> dict:
    """The trial's setting, in the order written (a trial taken up again returns the values it had)."""
    setting = {}
    for name, d in space.items():
        if isinstance(d, CategoricalDistribution):
            setting[name] = trial.suggest_categorical(name, d.choices)
        elif isinstance(d, IntDistribution):
            setting[name] = trial.suggest_int(name, d.low, d.high, log=d.log)
        else:
            setting[name] = trial.suggest_float(name, d.low, d.high, log=d.log)
    return setting


def corners(space: dict[str, BaseDistribution]) -> list[dict]:
    """Settings that between them hold every listed value and every range's ends: what is resolved against
    the stores before a sampled sweep reads anything (a grid resolves every point instead)."""
    values = {name: list(d.choices) if isinstance(d, CategoricalDistribution) else [d.low, d.high]
              for name, d in space.items()}
    longest = max(len(v) for v in values.values())
    return [{name: v[min(i, len(v) - 1)] for name, v in values.items()} for i in range(longest)]


def run_name(number: int, setting: dict, short: bool = False) -> str:
    """'03-lr=0.001-arch=evl': the run folder of configuration `number` (from 1); `short`: drawn numbers to
    3 significant digits (a grid's values are written as given)."""
    return f"{number:02d}-" + "-".join(f"{k}={_short(v) if short else v}" for k, v in setting.items())


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) and value != float(f"{value:.3g}") else str(value)
