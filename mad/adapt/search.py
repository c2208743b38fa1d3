"""The study behind `mad sweep`: Optuna (ask-and-tell) proposes the configurations and prunes them.

A `--grid` is sampled by Optuna's GridSampler (trial n is grid point n while n < the grid's size);
`--trials N --space ...` by its RandomSampler or TPESampler, reseeded from (`--seed`, trial number)
before each trial is asked, so trial n's values do not depend on how many processes asked or when.
Trial n is configuration n: its run folder (`NN-setting=value-...`) is a user attribute, its
metrics are reported each epoch, and it ends COMPLETE (value: best val top-1) or PRUNED.

The study is the sweep's memory. It lives in a journal file in the sweep folder (or `--storage`:
another journal file, on a shared disk, or an RDB URL), so a sweep re-run with the same command,
or several processes started with it, share it:
- each running trial names its owner (host, pid, process start) and gets a heartbeat every minute;
- a process takes trials with `study.ask()`: first a WAITING one (Optuna hands each to one process
  only), else a new one while fewer than N exist (one asked beyond N in a race is marked FAIL, never
  trained);
- a RUNNING trial whose owner is gone (its process ended on this host, or no heartbeat from
  another host for `GRACE` seconds) is put back to WAITING, and whoever takes it continues its run
  folder from the last finished epoch: the same trial, its reports and pruning rungs kept.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mad.adapt.config import TrainError, same_setting
from mad.adapt.space import grid_points, is_grid, parse_space, suggest

optuna.logging.set_verbosity(optuna.logging.WARNING)  # a study's "created" lines are not the sweep's log

SAMPLERS = ("random", "tpe")
PRUNERS = ("none", "halving", "hyperband")
REDUCTION = 3  # halving and hyperband keep the best third at each rung
BEAT = 60.0  # seconds between heartbeats of a running trial
GRACE = 300.0  # a trial owned on another host, without a heartbeat for this long, is taken up again
UNNAMED = 60.0  # a trial still without an owner this long after it was asked: its process died in between
OWNER, HEARTBEAT, SEARCH, RUN, SUMMARY = "mad:owner", "mad:heartbeat", "mad:search", "run", "summary"


@dataclass
class SearchConfig:
    grid: str | None = None  # every combination, e.g. "lr=1e-3,1e-4; weight_decay=0,0.05"
    space: str | None = None  # ranges and lists, e.g. "lr=loguniform:1e-4:1e-2; arch=madapter,evl"
    trials: int | None = None  # how many configurations a --space sweep draws
    sampler: str | None = None  # random or tpe (default); a grid is GridSampler's
    pruner: str = "none"  # none, halving (successive halving) or hyperband, on val top-1 each epoch
    at_once: int | None = None  # trials trained together (one read of each batch); default: all, tpe 4
    study_name: str | None = None  # default: the sweep folder's name
    storage: str | None = None  # a journal file path or an RDB URL; default: <out>/study.journal
    max_stack: int | None = None  # same-shape trials stepping as one stacked model; default: free memory

    def check(self) -> dict[str, BaseDistribution]:
        """The search space; refuses, in one line naming the option, what cannot be searched."""
        if self.trials is not None and self.trials < 1:
            raise TrainError(f"--trials {self.trials}: must be an integer >= 1")
        if self.sampler is not None and self.sampler not in SAMPLERS:
            raise TrainError(f"--sampler {self.sampler!r}: use {' or '.join(SAMPLERS)}")
        if self.pruner not in PRUNERS:
            raise TrainError(f"--pruner {self.pruner!r}: use {', '.join(PRUNERS)}")
        if self.at_once is not None and self.at_once < 1:
            raise TrainError(f"--at-once {self.at_once}: must be an integer >= 1")
        if self.max_stack is not None and self.max_stack < 1:
            raise TrainError(f"--max-stack {self.max_stack}: must be an integer >= 1")
        if self.study_name is not None and not self.study_name.strip():
            raise TrainError(f"--study-name {self.study_name!r}: give a name")
        grid = parse_space(self.grid, grid=True) if self.grid is not None else None
        space = parse_space(self.space) if self.space is not None else None
        if grid is not None and space is not None:
            raise TrainError("--space: give --grid (every combination) or --space with --trials, not both")
        if grid is None and space is None:
            raise TrainError("--grid or --space: say what the sweep varies")
        if grid is not None and self.trials is not None:
            raise TrainError("--trials: a --grid trains every combination; --trials goes with --space")
        if grid is not None and self.sampler is not None:
            raise TrainError(f"--sampler {self.sampler}: a --grid is sampled by Optuna's GridSampler; "
                             f"--sampler goes with --space")
        if space is not None and self.trials is None:
            raise TrainError("--space needs --trials N: how many configurations to draw")
        return grid if grid is not None else space

    def signature(self, space: dict, training: dict) -> dict:
        """What the study must have been started with to be continued by this command (`training`: the
        settings every configuration shares, seed and epochs among them)."""
        return {"space": {name: d.__class__.__name__ + repr(vars(d)) for name, d in space.items()},
                "trials": self.trials, "sampler": self.kind(space), "pruner": self.pruner, **training}

    def kind(self, space: dict) -> str:
        return "grid" if self.grid is not None and is_grid(space) else self.sampler or "tpe"


def open_storage(url: str | None, out: Path):
    """The study's storage: a journal file (default <out>/study.journal) or an Optuna RDB URL."""
    flag = f"--storage {url}" if url else f"{out / 'study.journal'}"
    try:
        if url is not None and "://" in url:
            return optuna.storages.RDBStorage(url)
        path = Path(url) if url else out / "study.journal"
        if url is None:
            out.mkdir(parents=True, exist_ok=True)
        elif not path.parent.is_dir():
            raise TrainError(f"{flag}: the folder {path.parent} does not exist")
        if path.is_dir():
            raise TrainError(f"{flag}: a folder, not a journal file")
        from optuna.storages.journal import JournalFileBackend
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except TrainError:
        raise
    except Exception as e:  # a driver not installed, a database that refuses, a path the system refuses
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"{flag}: cannot open the study's storage ({reason})") from None


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=REDUCTION)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=REDUCTION)
    return optuna.pruners.NopPruner()


def make_sampler(kind: str, space: dict, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "grid":
        return _AskAndTellGrid({name: list(d.choices) for name, d in space.items()}, seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)  # trials asked together spread out


class _AskAndTellGrid(optuna.samplers.GridSampler):
    """GridSampler whose `after_trial` does not call `study.stop()` (allowed only inside `optimize`): the
    sweep stops by itself when every grid point is done."""

    def after_trial(self, study, trial, state, values) -> None:
        pass


class Study:
    """One sweep's study: take trials, keep them alive, put back those whose owner is gone."""

    def __init__(self, cfg: SearchConfig, space: dict, training: dict, out: Path):
        seed, epochs = training["seed"], training["epochs"]
        self.cfg, self.space, self.seed, self.kind = cfg, space, seed, cfg.kind(space)
        self.name = cfg.study_name or out.resolve().name
        self.storage = open_storage(cfg.storage, out)
        self.study = optuna.create_study(storage=self.storage, study_name=self.name, direction="maximize",
                                         sampler=make_sampler(self.kind, space, seed),
                                         pruner=make_pruner(cfg.pruner, epochs), load_if_exists=True)
        signature, saved = cfg.signature(space, training), self.study.user_attrs.get(SEARCH)
        if saved is None:
            self.study.set_user_attr(SEARCH, signature)
        elif saved.keys() != signature.keys() or not all(same_setting(k, saved[k], v) for k, v in signature.items()):
            changed = ", ".join(f"{k} {saved.get(k)!r} -> {v!r}" for k, v in signature.items()
                                if not same_setting(k, saved.get(k), v))
            raise TrainError(f"--study-name {self.name}: the study in {cfg.storage or out / 'study.journal'} holds "
                             f"another sweep ({changed}); use another --out or --study-name")
        self.limit = len(grid_points(space)) if self.kind == "grid" else cfg.trials
        self.owned: dict[int, optuna.Trial] = {}
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    def close(self) -> None:
        self._stop.set()

    # ---- taking trials
    def take(self, at_once: int) -> list[tuple[optuna.Trial, dict]]:
        """Up to `at_once` (trial, setting) for this process: taken up again (WAITING) first, then new ones."""
        taken = []
        while len(taken) < at_once:
            trials = self.study.get_trials(deepcopy=False)
            waiting = any(t.state == TrialState.WAITING for t in trials)
            if not waiting and len(trials) >= self.limit:
                break
            if not waiting and self.kind != "grid":  # trial n's values depend on (seed, n) only
                self.study.sampler = make_sampler(self.kind, self.space, self.seed + len(trials))
            trial = self.study.ask()
            if trial.number >= self.limit:  # asked by a race beyond the last configuration: never trained
                self.study.tell(trial, state=TrialState.FAIL)
                break
            self.storage.set_trial_system_attr(trial._trial_id, OWNER, owner())
            self.storage.set_trial_system_attr(trial._trial_id, HEARTBEAT, time.time())
            self.owned[trial._trial_id] = trial
            taken.append((trial, suggest(trial, self.space)))  # now: drawn by the sampler seeded for this trial
        return taken

    def tell(self, trial: optuna.Trial, summary: dict, value: float, pruned: bool = False) -> None:
        trial.set_user_attr(SUMMARY, summary)
        if pruned:
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, value)
        self.owned.pop(trial._trial_id, None)

    def fail(self, trial: optuna.Trial, why: str) -> None:
        trial.set_user_attr("error", why)
        self.study.tell(trial, state=TrialState.FAIL)
        self.owned.pop(trial._trial_id, None)

    def reclaim(self) -> list[int]:
        """Put back to WAITING every RUNNING trial whose owner is gone; their numbers."""
        back = []
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id not in self.owned and not alive(trial):
                self.storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
                back.append(trial.number)
        return back

    def finished(self) -> list[FrozenTrial]:
        """The study's configurations that ended: COMPLETE, PRUNED or FAIL (a value the branch refused)."""
        return [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished() and t.number < self.limit]

    def pending(self) -> int:
        """Configurations not finished yet (running elsewhere, waiting, or not asked)."""
        return self.limit - len(self.finished())

    def _heartbeat(self) -> None:
        while not self._stop.wait(BEAT):
            for trial_id in list(self.owned):
                try:
                    self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
                except Exception:  # told meanwhile, or the storage is briefly unreachable: the next beat
                    pass

    # ---- pruning
    def report(self, trial: optuna.Trial, value: float, epoch: int, prune: bool) -> str | None:
        """Report `value` at `epoch`; the reason when the pruner stops the trial here, else None."""
        if epoch not in self.storage.get_trial(trial._trial_id).intermediate_values:  # not reported before a kill
            trial.report(value, epoch)
        if not prune or not trial.should_prune():
            return None
        values = [t.intermediate_values[epoch] for t in self.study.get_trials(deepcopy=False)
                  if epoch in t.intermediate_values]
        rank = 1 + sum(v > value for v in values)
        return f"{self.cfg.pruner}: {value:.3f}, rank {rank} of {len(values)} at epoch {epoch}"


def owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (with the pid: which process it is), None when no
    such process is running (a zombie counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def alive(trial: FrozenTrial) -> bool:
    """Whether a RUNNING trial's owner may still be training it."""
    who = trial.system_attrs.get(OWNER)
    if who is None:  # asked, its owner not named yet (that takes milliseconds)
        return trial.datetime_start is None or (datetime.now() - trial.datetime_start).total_seconds() < UNNAMED
    if who["host"] == socket.gethostname() and who["start"] is not None and Path("/proc/self/stat").exists():
        return process_start(who["pid"]) == who["start"]
    return time.time() - trial.system_attrs.get(HEARTBEAT, 0) < GRACE
