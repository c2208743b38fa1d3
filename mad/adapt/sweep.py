"""Train every configuration of a grid from one read of the cache; rank them.

    sweep("cache/train", "cache/val", "lr=1e-3,3e-4 width=256,384 arch=madapter,linear", "runs/sweep")

reads both caches once (into RAM when they fit), trains the 8 combinations into
runs/sweep/<NN>-<setting>=<value>-..., prints a leaderboard and writes
runs/sweep/leaderboard.csv (best val top-1 first). With `base.log` set (`mad sweep --log tensorboard`)
each run logs to its own folder, so `tensorboard --logdir runs/sweep` compares them.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
from pathlib import Path

from rich.table import Table

from mad.adapt.branch import RENAMED
from mad.adapt.config import TrainConfig, TrainError, resolve, with_preset
from mad.adapt.families import family, pair_keys, reads
from mad.adapt.lockstep import train_lockstep
from mad.adapt.train import check_run_dir, count_classes, summary_line
from mad.cache.dataset import open_tokens
from mad.cache.store import Store
from mad.errors import MadError
from mad.options import at_least, check_number
from mad.progress import make_console
from mad.tables import print_table

# Settings a grid may not vary: they name the data, the run and its logs, not the training.
FIXED = ("cache", "val", "out", "resume", "overwrite", "log")


def parse_grid(grid: str) -> dict[str, list]:
    """'lr=1e-3,3e-4 arch=madapter,linear' -> {'lr': [0.001, 0.0003], 'arch': ['madapter', 'linear']}."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    defaults = TrainConfig()
    parsed = {}
    for item in grid.split():
        name, sep, values = item.partition("=")
        name = RENAMED.get(name.replace("-", "_"), name.replace("-", "_"))
        if not sep or not values:
            raise TrainError(f"--grid item {item!r}: write setting=value1,value2")
        if name not in fields or name in FIXED:
            allowed = ", ".join(n for n in fields if n not in FIXED)
            raise TrainError(f"--grid item {item!r}: {name!r} is not a setting a sweep can vary ({allowed})")
        kind = type(getattr(defaults, name)) if getattr(defaults, name) is not None else str
        try:
            parsed[name] = [_cast(value, kind) for value in values.split(",")]
        except ValueError:
            raise TrainError(f"--grid item {item!r}: {name} takes {kind.__name__} values") from None
    if not parsed:
        raise TrainError(f"--grid {grid!r}: no setting; write e.g. 'lr=1e-3,3e-4 arch=madapter,linear'")
    return parsed


def _cast(value: str, kind: type):
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("true", "1", "yes")
    return kind(value)


def sweep(cache: str, val: str | None, grid: str, out: str, base: TrainConfig | None = None,
          quiet: bool = False, max_stack: int | None = None) -> list[dict]:
    """Train every combination of `grid` (on top of `base`); return the summaries, best val top-1 first.
    `max_stack`: at most this many same-shape configurations step as one stacked model (None: free memory)."""
    check_number("max_stack", max_stack, at_least(1))
    options = parse_grid(grid)
    base = base or TrainConfig()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: a file, not a folder for the sweep's runs; choose another --out")
    combinations = [dict(zip(options, values)) for values in itertools.product(*options.values())]
    configs = [run_config(base, setting, cache, val, out / run_name(i, setting))  # every one checked, before reading
               for i, setting in enumerate(combinations, 1)]
    for cfg in configs:
        check_run_dir(cfg)
    console = make_console(quiet)
    train_store = Store.open(cache)
    val_store = Store.open(val) if val else None
    archs = sorted({setting.get("arch", base.arch) for setting in combinations})  # read what they all need, once
    if val_store is not None:
        train_store.manifest.check_pair(val_store.manifest, val, f"the training cache {cache}", pair_keys(archs))
    num_classes = count_classes(train_store, val_store)
    runs = []  # every configuration resolved against the stores (and refused) before any data is read
    for setting, cfg in zip(combinations, configs):
        try:
            if val_store is not None:
                resolve(cfg, val_store.manifest, num_classes, val)
            runs.append((setting, *resolve(cfg, train_store.manifest, num_classes, cache)))
        except MadError as e:
            point = " ".join(f"{k}={v}" for k, v in setting.items())
            raise TrainError(f"--grid {point!r}: {e}") from None
    train_data = val_data = None
    results = []
    try:
        train_data = open_tokens(train_store, base.in_ram, base.workers, progress=not quiet,
                                 arrays=reads(archs, train_store.manifest, cache))
        val_data = (open_tokens(val_store, base.in_ram, base.workers, progress=not quiet,
                                arrays=reads(archs, val_store.manifest, val)) if val_store else None)
        console.print(f"{len(runs)} configurations in lockstep: each batch is read once per reading group")
        summaries = train_lockstep([(cfg, branch) for _, cfg, branch in runs], train_data, val_data,
                                   max_stack=max_stack, quiet=quiet)
        for i, ((setting, cfg, _), summary) in enumerate(zip(runs, summaries), 1):
            console.print(f"[bold]{i}/{len(combinations)}[/] {Path(cfg.out).name}  " + _brief(summary))
            results.append({**setting, **summary})
    finally:
        for data in (train_data, val_data):
            if data is not None:
                data.close()

    key = "val/acc/top1" if val else "train/acc"
    results.sort(key=lambda row: -row[key])
    write_leaderboard(results, list(options), out / "leaderboard.csv")
    print_table(leaderboard_table(results, list(options), key), console)
    return results


def run_name(i: int, setting: dict) -> str:
    return f"{i:02d}-" + "-".join(f"{k}={v}" for k, v in setting.items())


def run_config(base: TrainConfig, setting: dict, cache: str, val: str | None, out: Path) -> TrainConfig:
    """One grid point's config: `base` with `setting`, and the arch's preset (EVL's lr, dropout, ...) for what
    neither the grid nor `base` set; a value it refuses names the grid point."""
    defaults = TrainConfig()
    arch = setting.get("arch", base.arch)
    try:
        given = set(setting) | {k for k in family(arch).preset if getattr(base, k) != getattr(defaults, k)}
        values = {**dataclasses.asdict(base), "cache": cache, "val": val, "out": str(out), "resume": False, **setting}
        return with_preset(TrainConfig(**values), given)
    except MadError as e:
        point = " ".join(f"{k}={v}" for k, v in setting.items())
        raise TrainError(f"--grid {point!r}: {e}") from None


def _brief(summary: dict) -> str:
    return f"{summary_line(summary)}; {summary['seconds']:.1f}s"


COLUMNS = ("val/acc/top1", "val/acc/top5", "val/acc/mean1", "train/acc", "train/loss", "best_epoch", "parameters",
           "seconds", "run")


def write_leaderboard(results: list[dict], settings: list[str], path: Path) -> None:
    columns = settings + [c for c in COLUMNS if c in results[0]]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


# val figures are the best epoch's (the model kept), train figures the last epoch's
TABLE = {"val/acc/top1": "best top1", "val/acc/top5": "best top5", "val/acc/mean1": "best mean1",
         "train/acc": "last train acc", "train/loss": "last train loss", "parameters": "params", "seconds": "s"}


def leaderboard_table(results: list[dict], settings: list[str], key: str) -> Table:
    columns = [c for c in TABLE if c in results[0]]
    table = Table(title=f"sweep leaderboard (by {'best' if key.startswith('val/') else 'last'} {key})")
    table.add_column("#", justify="right")
    for name in settings + [TABLE[c] for c in columns]:
        table.add_column(name, justify="right")
    for rank, row in enumerate(results, 1):
        cells = [str(row[name]) for name in settings]
        for c in columns:
            cells.append(f"{row[c]:,}" if c == "parameters" else f"{row[c]:.1f}" if c == "seconds" else f"{row[c]:.3f}")
        table.add_row(str(rank), *cells)
    return table
