"""Sweep configurations from one read of the cache; rank them.

    sweep("cache/train", "cache/val", "lr=1e-3,3e-4; width=256,384; arch=madapter,linear", "runs/sweep")
    sweep("cache/train", "cache/val", None, "runs/sweep",
          search=SearchConfig(space="lr=loguniform:1e-4:1e-2; dropout=uniform:0:0.3", trials=20, pruner="halving"))

A `--grid` trains every combination, `--trials N --space ...` N drawn configurations
(`mad.adapt.search`: Optuna proposes them and prunes them). Each batch of trials taken from the
study trains in lockstep (`mad.adapt.lockstep.train_lockstep`: each training batch read once)
into runs/sweep/<NN>-<setting>=<value>-...; the leaderboard (best val top-1 first, pruned runs
saying at which epoch and why) is printed and written to runs/sweep/leaderboard.csv. The same
command re-run (after a kill, or in several processes sharing `--storage`) continues the study.
With `base.log` set each run logs to its own folder (`tensorboard --logdir runs/sweep`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from pathlib import Path

import torch
from rich.table import Table

from mad.adapt.config import TrainConfig, TrainError, resolve, with_preset
from mad.adapt.families import family, pair_keys, reads
from mad.adapt.lockstep import train_lockstep
from mad.adapt.search import SearchConfig, Study
from mad.adapt.space import corners, grid_points, parse_space, run_name
from mad.adapt.train import RESUMABLE_KEYS, check_run_dir, count_classes, summary_line
from mad.cache.dataset import open_tokens
from mad.cache.store import Store
from mad.errors import MadError
from mad.progress import make_console
from mad.runtime import resolve_device
from mad.tables import print_table

POLL = 5.0  # seconds between looks at the study while other processes train its last trials
TPE_AT_ONCE = 4  # TPE learns from finished trials: ask a few at a time


def sweep(cache: str, val: str | None, grid: str | None, out: str, base: TrainConfig | None = None,
          quiet: bool = False, search: SearchConfig | None = None) -> list[dict]:
    """Train the sweep's configurations (on top of `base`); return the leaderboard's rows, best val top-1
    first. `grid`: every combination; or `search` (`mad.adapt.search.SearchConfig`)."""
    search = search or SearchConfig(grid=grid)
    space = search.check()
    base = own_device(base or TrainConfig())
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: a file, not a folder for the sweep's runs; choose another --out")
    kind = search.kind(space)
    flag = "--grid" if kind == "grid" else "--space"
    # every grid point (a drawn sweep: every listed value and range end) is checked before anything is read
    probes = grid_points(space) if kind == "grid" else corners(space)
    configs = [run_config(base, p, cache, val, out / run_name(i, p), flag) for i, p in enumerate(probes, 1)]
    console = make_console(quiet)
    train_store = Store.open(cache)
    val_store = Store.open(val) if val else None
    archs = sorted({cfg.arch for cfg in configs})  # read what they all need, once
    if val_store is not None:
        train_store.manifest.check_pair(val_store.manifest, val, f"the training cache {cache}", pair_keys(archs))
    num_classes = count_classes(train_store, val_store)
    for setting, cfg in zip(probes, configs):
        for store, location in ((val_store, val), (train_store, cache)):
            if store is not None:
                resolved, _ = _resolve(cfg, store.manifest, num_classes, location, setting, flag)
        if kind == "grid":  # a run folder holds its resolved config: a sweep run again resumes it
            check_run_dir(resolved)
    shared = {k: v for k, v in base.flat().items() if k not in (*RESUMABLE_KEYS, *space)}
    study = Study(search, space, {**shared, "cache": cache, "val": val}, out)  # the first thing written
    at_once = search.at_once or (TPE_AT_ONCE if kind == "tpe" else study.limit)
    train_data = val_data = None
    try:
        pin = resolve_device(base.device).type == "cuda"  # streamed batches cross to the GPU asynchronously
        train_data = open_tokens(train_store, base.in_ram, base.workers, progress=not quiet,
                                 arrays=reads(archs, train_store.manifest, cache), pin_memory=pin)
        val_data = (open_tokens(val_store, base.in_ram, base.workers, progress=not quiet,
                                arrays=reads(archs, val_store.manifest, val), pin_memory=pin) if val_store else None)
        console.print(f"study {study.name!r} ({kind}, {study.limit} configurations, pruner {search.pruner}) in "
                      f"{search.storage or out / 'study.journal'}")
        Sweep(study, base, cache, val, out, train_data, val_data, num_classes, console, quiet,
              search.max_stack).run(at_once)
    finally:
        study.close()
        for data in (train_data, val_data):
            if data is not None:
                data.close()
    key = "val/acc/top1" if val else "train/acc"
    results = leaderboard(study, key)
    write_leaderboard(results, list(space), out / "leaderboard.csv")
    print_table(leaderboard_table(results, list(space), key), console)
    return results


class Sweep:
    """Takes trials from the study and trains each batch of them in lockstep, until none is left."""

    def __init__(self, study: Study, base, cache, val, out, train_data, val_data, num_classes, console, quiet,
                 max_stack: int | None = None):
        self.study, self.base, self.cache, self.val, self.out = study, base, cache, val, out
        self.max_stack = max_stack  # same-shape trials stepping as one stacked model (None: free memory)
        self.train_data, self.val_data, self.num_classes = train_data, val_data, num_classes
        self.console, self.quiet = console, quiet
        self.key = "val/acc/top1" if val_data is not None else "train/acc"  # reported each epoch, told at the end
        self.grid = grid_points(study.space) if study.kind == "grid" else None

    def run(self, at_once: int) -> None:
        waiting = False
        while True:
            back = self.study.reclaim()
            if back:
                self.console.print(f"trials {', '.join(map(str, back))}: their process is gone; taken up again "
                                   f"from their last finished epoch")
            trials = self.study.take(at_once)
            if trials:
                self.train(trials)
                waiting = False
                continue
            left = self.study.pending()
            if left == 0:
                return
            if not waiting:
                self.console.print(f"waiting for {left} configuration(s) that other processes train")
                waiting = True
            time.sleep(POLL)

    def train(self, trials) -> None:
        members, runs = [], []
        named = list(trials)
        if self.grid:  # members in the grid's order (trial n is GridSampler's point n, in its own order)
            named.sort(key=lambda pair: self.grid.index(pair[1]))
        for trial, setting in named:
            number = self.grid.index(setting) + 1 if self.grid else trial.number + 1
            name = run_name(number, setting, short=self.grid is None)
            trial.set_user_attr("run", name)
            try:
                cfg = run_config(self.base, setting, self.cache, self.val, self.out / name,
                                 "--grid" if self.grid else "--space")
                cfg, branch = _resolve(cfg, self.train_data.manifest, self.num_classes, self.cache, setting,
                                       "--grid" if self.grid else "--space")
            except MadError as e:  # a drawn value the branch refuses (e.g. a width its heads do not divide)
                self.console.print(f"trial {trial.number} {name}: not trained: {e}")
                self.study.fail(trial, str(e))
                continue
            run = Run(trial, Path(cfg.out), cfg.epochs, finished_rows(Path(cfg.out)))
            if not self.catch_up(run):
                members.append((cfg, branch))
                runs.append(run)
        if not members:
            return
        self.console.print(f"trials {', '.join(str(r.trial.number) for r in runs)} in lockstep")
        summaries = train_lockstep(members, self.train_data, self.val_data, quiet=self.quiet, max_stack=self.max_stack,
                                   on_epoch_end=lambda i, row: self.epoch_end(runs[i], row))
        for run, summary in zip(runs, summaries):
            if run.pruned is None:
                self.study.tell(run.trial, summary, summary[self.key])
            self.console.print(f"trial {run.trial.number} {run.path.name}  " + _brief(summary))
        self.console.print(f"{self.study.limit - self.study.pending()}/{self.study.limit} configurations done")

    def catch_up(self, run: "Run") -> bool:
        """Report the epochs a killed process finished but did not report; whether the pruner stops it there
        (as it would have then)."""
        for i, row in enumerate(run.history):
            if self.prune(run, row, run.history[:i + 1]):
                return True
        return False

    def epoch_end(self, run: "Run", row: dict) -> bool:
        run.history.append(row)
        return self.prune(run, row, run.history)

    def prune(self, run: "Run", row: dict, history: list[dict]) -> bool:
        why = self.study.report(run.trial, row[self.key], row["epoch"], prune=row["epoch"] < run.epochs)
        if why is None:
            return False
        run.pruned = row["epoch"]
        self.console.print(f"trial {run.trial.number} {run.path.name}: pruned at epoch {row['epoch']} ({why})")
        self.study.tell(run.trial, pruned_summary(run.path, history, self.val_data is not None, why), 0.0,
                        pruned=True)
        return True


@dataclasses.dataclass
class Run:
    trial: object
    path: Path
    epochs: int
    history: list[dict]
    pruned: int | None = None


def finished_rows(run: Path) -> list[dict]:
    """The epochs a run folder holds (each line was written after its last.pt)."""
    metrics = run / "metrics.jsonl"
    if not (run / "last.pt").exists() or not metrics.exists():
        return []
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


def pruned_summary(run: Path, history: list[dict], has_val: bool, why: str) -> dict:
    """A pruned run's summary (as `mad.adapt.train.finish` writes one) from its epochs so far."""
    config = json.loads((run / "config.json").read_text())
    best = max(history, key=lambda row: row["val/acc/top1"]) if has_val else history[-1]
    last = history[-1]
    return {"run": str(run), "arch": config["model"]["arch"], "parameters": config["parameters"],
            "epochs": last["epoch"], "best_epoch": best["epoch"],
            "seconds": sum(row["epoch_seconds"] for row in history),
            "train/loss": last["train/loss"], "train/acc": last["train/acc"],
            **{k: v for k, v in best.items() if k.startswith("val/")},
            **{f"last/{k}": v for k, v in last.items() if k.startswith("val/")},
            "pruned_at_epoch": last["epoch"], "pruned_why": why}


def parse_grid(grid: str) -> dict[str, list]:
    """'lr=1e-3,3e-4 arch=madapter,linear' -> {'lr': [0.001, 0.0003], 'arch': ['madapter', 'linear']}."""
    return {name: list(d.choices) for name, d in parse_space(grid, grid=True).items()}


def own_device(base: TrainConfig) -> TrainConfig:
    """Under torchrun each rank is a sweep process of its own (it takes its own trials, no DDP): on its
    LOCAL_RANK's GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return base
    local = int(os.environ.get("LOCAL_RANK", "0"))
    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        os.environ.pop(name, None)
    if base.device in ("auto", "cuda") and torch.cuda.is_available():
        return dataclasses.replace(base, device=f"cuda:{local % torch.cuda.device_count()}")
    return base


def run_config(base: TrainConfig, setting: dict, cache: str, val: str | None, out: Path,
               flag: str = "--grid") -> TrainConfig:
    """One configuration: `base` with `setting`, and the arch's preset (EVL's lr, dropout, ...) for what
    neither the setting nor `base` set; resumed when its run folder holds its epochs. A value it refuses
    names the point."""
    defaults = TrainConfig()
    arch = setting.get("arch", base.arch)
    try:
        given = set(setting) | {k for k in family(arch).preset if getattr(base, k) != getattr(defaults, k)}
        values = {**dataclasses.asdict(base), "cache": cache, "val": val, "out": str(out), "resume": True,
                  "overwrite": False, **setting}
        return with_preset(TrainConfig(**values), given)
    except MadError as e:
        raise TrainError(f"{flag} {_point(setting)!r}: {e}") from None


def _resolve(cfg, manifest, num_classes, location, setting, flag):
    try:
        return resolve(cfg, manifest, num_classes, location)
    except MadError as e:
        raise TrainError(f"{flag} {_point(setting)!r}: {e}") from None


def _point(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def _brief(summary: dict) -> str:
    pruned = f"; pruned at epoch {summary['pruned_at_epoch']}" if "pruned_at_epoch" in summary else ""
    return f"{summary_line(summary)}; {summary['seconds']:.1f}s{pruned}"


def leaderboard(study: Study, key: str) -> list[dict]:
    """One row per finished configuration of the study (whichever process trained it), best first."""
    rows = []
    for trial in study.finished():
        summary = trial.user_attrs.get("summary")
        if summary is None:  # failed: said when it happened
            continue
        row = {**{name: trial.params[name] for name in study.space}, **summary}
        if "pruned_why" in summary:
            row["pruned"] = f"pruned at epoch {summary['pruned_at_epoch']} ({summary['pruned_why']})"
        rows.append(row)
    return sorted(rows, key=lambda row: (-row[key], row["run"]))


COLUMNS = ("val/acc/top1", "val/acc/top5", "val/acc/mean1", "train/acc", "train/loss", "best_epoch", "parameters",
           "seconds", "run", "pruned")


def write_leaderboard(results: list[dict], settings: list[str], path: Path) -> None:
    columns = settings + [c for c in COLUMNS if any(c in row for row in results)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(results)


# val figures are the best epoch's (the model kept), train figures the last epoch's
TABLE = {"val/acc/top1": "best top1", "val/acc/top5": "best top5", "val/acc/mean1": "best mean1",
         "train/acc": "last train acc", "train/loss": "last train loss", "parameters": "params", "seconds": "s",
         "pruned": "pruned"}


def leaderboard_table(results: list[dict], settings: list[str], key: str) -> Table:
    columns = [c for c in TABLE if any(c in row for row in results)]
    table = Table(title=f"sweep leaderboard (by {'best' if key.startswith('val/') else 'last'} {key})")
    table.add_column("#", justify="right")
    for name in settings + [TABLE[c] for c in columns]:
        table.add_column(name, justify="left" if name == "pruned" else "right")
    for rank, row in enumerate(results, 1):
        cells = [str(row[name]) for name in settings]
        for c in columns:
            value = row.get(c, "")
            cells.append(value if isinstance(value, str) else f"{value:,}" if c == "parameters"
                         else f"{value:.1f}" if c == "seconds" else f"{value:.3f}")
        table.add_row(str(rank), *cells)
    return table
