"""mad sweep on Optuna: grid and drawn spaces, pruning, the study as the sweep's memory (resume, shared studies),
and bad input refused in one line. The study logic runs on a stand-in for train_lockstep (fast); tests marked
slow train for real, kill a sweep with SIGKILL and run two sweep processes on one study."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

import mad.adapt.sweep as sweep_module
from mad.adapt.config import TrainConfig
from mad.adapt.search import OWNER, SearchConfig, alive
from mad.adapt.space import corners, grid_points, parse_space, run_name
from mad.cache.store import Store, VideoResult
from mad.cli import app
from mad.errors import MadError
from tests.helpers.cache import make_cache, synthetic_manifest

BASE = dict(width=32, heads=2, batch_size=16, lr=3e-3, warmup_epochs=1, workers=0, epochs=3, in_ram="yes")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    make_cache(root / "train", videos_per_class=8, seed=0)
    make_cache(root / "val", videos_per_class=4, seed=1)
    return {name: str(root / name) for name in ("train", "val")}


# ---- the search space ------------------------------------------------------------------------


def test_space_parses_lists_and_ranges_in_the_order_written():
    space = parse_space("lr=loguniform:1e-4:1e-2; dropout=uniform:0:0.3 arch=madapter,evl; width=uniform:64:128")
    assert list(space) == ["lr", "dropout", "arch", "width"]
    assert isinstance(space["lr"], optuna.distributions.FloatDistribution) and space["lr"].log
    assert isinstance(space["width"], optuna.distributions.IntDistribution) and space["width"].low == 64
    assert space["arch"].choices == ("madapter", "evl")
    assert corners(space)[0] == {"lr": 1e-4, "dropout": 0.0, "arch": "madapter", "width": 64}
    grid = parse_space("lr=1e-3,1e-4;weight_decay=0,0.05", grid=True)
    assert grid_points(grid) == [{"lr": 1e-3, "weight_decay": 0.0}, {"lr": 1e-3, "weight_decay": 0.05},
                                 {"lr": 1e-4, "weight_decay": 0.0}, {"lr": 1e-4, "weight_decay": 0.05}]
    assert run_name(2, grid_points(grid)[1]) == "02-lr=0.001-weight_decay=0.05"  # today's names
    assert run_name(7, {"lr": 0.001234567, "arch": "evl"}, short=True) == "07-lr=0.00123-arch=evl"


@pytest.mark.parametrize("text,grid,message", [
    ("colour=red", True, "'colour' is not a setting a sweep can vary"),
    ("out=x", True, "'out' is not a setting a sweep can vary"),
    ("lr=uniform:0.3:0.1", False, "empty range"),
    ("lr=uniform:0.1:0.1", False, "empty range"),
    ("lr=loguniform:0:1", False, "needs low > 0"),
    ("lr=loguniform:1e-4:1e-2", True, "a grid lists its values"),
    ("dropout=uniform:0:2", False, "--dropout 2.0"),
    ("width=uniform:1.5:9", False, "int bounds"),
    ("arch=uniform:0:1", False, "not a number"),
    ("lr=", True, "write setting=value1,value2"),
    ("lr=1e-3 lr=1e-4", True, "given twice"),
    ("  ", False, "no setting"),
])
def test_a_bad_space_names_its_option_and_item(text, grid, message):
    with pytest.raises(MadError, match=message) as e:
        parse_space(text, grid=grid)
    assert str(e.value).startswith("--grid" if grid else "--space")


@pytest.mark.parametrize("options,flag", [
    (dict(space="lr=uniform:0.1:0.2", trials=0), "--trials 0"),
    (dict(space="lr=uniform:0.1:0.2", trials=2, sampler="grid"), "--sampler 'grid'"),
    (dict(grid="lr=1e-3", pruner="median"), "--pruner 'median'"),
    (dict(grid="lr=1e-3", at_once=0), "--at-once 0"),
    (dict(grid="lr=1e-3", space="lr=uniform:0.1:0.2", trials=2), "--space: give --grid"),
    (dict(grid="lr=1e-3", trials=2), "--trials: a --grid"),
    (dict(grid="lr=1e-3", sampler="tpe"), "--sampler tpe: a --grid"),
    (dict(space="lr=uniform:0.1:0.2"), "--space needs --trials"),
    (dict(), "--grid or --space"),
])
def test_search_options_are_checked_before_anything(options, flag):
    with pytest.raises(MadError) as e:
        SearchConfig(**options).check()
    assert str(e.value).startswith(flag)


# ---- the study logic, on a stand-in for train_lockstep -----------------------------------------


class FakeLockstep:
    """Writes each member's run folder as train_lockstep does (config.json, a metrics line after last.pt),
    val top-1 = `score(cfg) + epoch / 100`, resumes from the lines there, stops a member when on_epoch_end says
    so, and can crash after `crash_after` member-epochs of the sweep (between two members of an epoch too)."""

    def __init__(self, crash_after: int | None = None):
        self.crash_after, self.calls, self.epochs_run = crash_after, [], 0

    def __call__(self, members, train_data, val_data=None, *, on_epoch_end=None, quiet=False, max_stack=None):
        self.calls.append([Path(cfg.out).name for cfg, _ in members])
        runs = []
        for cfg, _ in members:
            run = Path(cfg.out)
            run.mkdir(parents=True, exist_ok=True)
            if not (run / "config.json").exists():
                (run / "config.json").write_text(json.dumps({**cfg.saved(), "parameters": 7}))
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
                if (run / "last.pt").exists() else []
            runs.append({"cfg": cfg, "run": run, "rows": rows, "stopped": False})
        for epoch in range(1, max(cfg.epochs for cfg, _ in members) + 1):
            for i, r in enumerate(runs):
                if r["stopped"] or epoch <= len(r["rows"]) or epoch > r["cfg"].epochs:
                    continue
                if self.epochs_run == self.crash_after:
                    raise KeyboardInterrupt  # the process dies here (a real kill leaves no chance to clean up)
                self.epochs_run += 1
                row = {"epoch": epoch, "lr": r["cfg"].lr, "train/loss": 1 - epoch / 10, "train/acc": epoch / 10,
                       "val/acc/top1": round(r["cfg"].lr * 100 + epoch / 100, 6), "val/acc/top5": 1.0,
                       "val/acc/mean1": 0.5, "epoch_seconds": 1.0}
                (r["run"] / "last.pt").write_text(str(epoch))
                with open(r["run"] / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                r["rows"].append(row)
                if on_epoch_end(i, row) and epoch < r["cfg"].epochs:
                    r["stopped"] = True
        return [{"run": str(r["run"]), "arch": r["cfg"].arch, "parameters": 7, "epochs": r["rows"][-1]["epoch"],
                 "best_epoch": r["rows"][-1]["epoch"], "seconds": 1.0, "train/loss": r["rows"][-1]["train/loss"],
                 "train/acc": r["rows"][-1]["train/acc"], "val/acc/top1": r["rows"][-1]["val/acc/top1"],
                 "val/acc/top5": 1.0, "val/acc/mean1": 0.5, "last/val/acc/top1": r["rows"][-1]["val/acc/top1"]}
                for r in runs]


def board(folder: Path) -> list[dict]:
    with open(folder / "leaderboard.csv") as f:
        return [{k: v for k, v in row.items() if k not in ("seconds", "run")} for row in csv.DictReader(f)]


def same_board(a: list[dict], b: list[dict]) -> bool:
    """Equal leaderboards; losses to 1e-5 relative (#22's bar is 1e-3): a member resumed without its
    stack-mates steps in a stack of another size, and summation order moves the last digits."""
    def parsed(rows):
        return [{k: (float(v) if k.endswith("loss") else v) for k, v in row.items()} for row in rows]
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == (pytest.approx(y[k], rel=1e-5) if k.endswith("loss") else y[k]) for k in x)
        for x, y in zip(parsed(a), parsed(b)))


def study_trials(folder: Path, name: str | None = None):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "study.journal")))
    return optuna.load_study(study_name=name or folder.name, storage=storage).get_trials()


def fake_sweep(caches, out, monkeypatch, fake, search, **base):
    monkeypatch.setattr(sweep_module, "train_lockstep", fake)
    return sweep_module.sweep(caches["train"], caches["val"], None, str(out),
                              TrainConfig(**{**BASE, **base}), quiet=True, search=search)


def test_halving_prunes_weak_grid_points_and_the_leaderboard_says_when_and_why(caches, tmp_path, monkeypatch):
    fake = FakeLockstep()
    search = SearchConfig(grid="lr=4e-3,3e-3,2e-3,1e-3", pruner="halving")
    results = fake_sweep(caches, tmp_path / "sweep", monkeypatch, fake, search)
    assert fake.calls == [["01-lr=0.004", "02-lr=0.003", "03-lr=0.002", "04-lr=0.001"]]  # one lockstep, grid order
    lines = {p.name: len((p / "metrics.jsonl").read_text().splitlines()) for p in (tmp_path / "sweep").iterdir()
             if p.is_dir()}
    assert lines == {"01-lr=0.004": 3, "02-lr=0.003": 1, "03-lr=0.002": 1, "04-lr=0.001": 1}
    assert [r.get("pruned", "") for r in results] == [
        "", "pruned at epoch 1 (halving: 0.310, rank 2 of 2 at epoch 1)",
        "pruned at epoch 1 (halving: 0.210, rank 3 of 3 at epoch 1)",
        "pruned at epoch 1 (halving: 0.110, rank 4 of 4 at epoch 1)"]
    rows = board(tmp_path / "sweep")
    assert [r["lr"] for r in rows] == ["0.004", "0.003", "0.002", "0.001"]
    assert rows[1]["pruned"].startswith("pruned at epoch 1 (halving") and rows[0]["pruned"] == ""
    states = [t.state for t in study_trials(tmp_path / "sweep")]
    assert states.count(optuna.trial.TrialState.PRUNED) == 3 and states.count(optuna.trial.TrialState.COMPLETE) == 1


def test_without_a_pruner_every_point_trains_every_epoch_and_a_rerun_trains_nothing(caches, tmp_path, monkeypatch):
    search = SearchConfig(grid="lr=1e-3,2e-3 weight_decay=0,0.05")
    fake_sweep(caches, tmp_path / "sweep", monkeypatch, FakeLockstep(), search)
    rows = board(tmp_path / "sweep")
    assert len(rows) == 4 and "pruned" not in rows[0]
    again = FakeLockstep()
    fake_sweep(caches, tmp_path / "sweep", monkeypatch, again, search)
    assert again.calls == [] and board(tmp_path / "sweep") == rows


def test_a_sweep_resumed_with_relative_cache_paths_goes_on_and_another_cache_is_refused(caches, tmp_path,
                                                                                         monkeypatch):
    """The study and each run folder hold --cache and --val as first given (absolute here): the same folders
    spelled relative are the same sweep; another folder is refused in one line naming --cache."""
    search = SearchConfig(grid="lr=1e-3,2e-3")
    fake_sweep(caches, tmp_path / "sweep", monkeypatch, FakeLockstep(), search)
    rows = board(tmp_path / "sweep")
    monkeypatch.chdir(Path(caches["train"]).parent)
    again = FakeLockstep()
    fake_sweep({"train": "train", "val": "./val"}, tmp_path / "sweep", monkeypatch, again, search)
    assert again.calls == [] and board(tmp_path / "sweep") == rows
    with pytest.raises(MadError) as error:
        fake_sweep({"train": "val", "val": "./val"}, tmp_path / "sweep", monkeypatch, FakeLockstep(), search)
    assert "\n" not in str(error.value)
    assert f"cannot resume with different settings (--cache '{caches['train']}' -> 'val')" in str(error.value)


def test_an_rdb_storage_holds_the_study_and_optuna_opens_it(caches, tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    search = SearchConfig(grid="lr=1e-3,2e-3", storage=url, study_name="lrs")
    fake_sweep(caches, tmp_path / "sweep", monkeypatch, FakeLockstep(), search)
    assert not (tmp_path / "sweep" / "study.journal").exists()
    study = optuna.load_study(study_name="lrs", storage=url)
    assert sorted(t.user_attrs["run"] for t in study.trials) == ["01-lr=0.001", "02-lr=0.002"]
    assert study.best_trial.params == {"lr": 2e-3} and study.direction.name == "MAXIMIZE"


def dead_owner() -> dict:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    return {"host": socket.gethostname(), "pid": ended.pid, "start": "1"}


@pytest.mark.parametrize("search,crash_after", [
    (SearchConfig(grid="lr=4e-3,3e-3,2e-3,1e-3", pruner="halving"), 2),
    (SearchConfig(grid="lr=4e-3,3e-3,2e-3,1e-3", pruner="halving"), 5),
    (SearchConfig(space="lr=loguniform:1e-3:1e-2", trials=5, sampler="random", at_once=2), 7),
    (SearchConfig(space="lr=loguniform:1e-3:1e-2", trials=5, sampler="tpe", at_once=2, pruner="hyperband"), 7),
], ids=["grid-halving-epoch-1", "grid-halving-epoch-3", "random", "tpe-hyperband"])
def test_a_crashed_sweep_rerun_ends_with_the_uninterrupted_leaderboard(caches, tmp_path, monkeypatch, search,
                                                                      crash_after):
    fake_sweep(caches, tmp_path / "whole" / "sweep", monkeypatch, FakeLockstep(), search)
    crash = FakeLockstep(crash_after=crash_after)
    with pytest.raises(KeyboardInterrupt):
        fake_sweep(caches, tmp_path / "crashed" / "sweep", monkeypatch, crash, search)
    running = [t for t in study_trials(tmp_path / "crashed" / "sweep") if t.state.name == "RUNNING"]
    assert running and all(alive(t) for t in running)  # this process still owns them
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(tmp_path / "crashed" / "sweep" / "study.journal")))
    for trial in running:  # as a process killed on this host leaves them
        storage.set_trial_system_attr(trial._trial_id, OWNER, dead_owner())
    assert not any(alive(t) for t in study_trials(tmp_path / "crashed" / "sweep") if t.state.name == "RUNNING")
    resumed = FakeLockstep()
    fake_sweep(caches, tmp_path / "crashed" / "sweep", monkeypatch, resumed, search)
    assert board(tmp_path / "crashed" / "sweep") == board(tmp_path / "whole" / "sweep")
    trials = study_trials(tmp_path / "crashed" / "sweep")
    assert len(trials) == len(study_trials(tmp_path / "whole" / "sweep"))  # the same trials went on: none added
    for run in (tmp_path / "crashed" / "sweep").iterdir():  # no epoch trained twice
        if run.is_dir():
            epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert epochs == list(range(1, len(epochs) + 1))


def test_drawn_values_depend_on_the_seed_and_trial_number_only(caches, tmp_path, monkeypatch):
    space = "lr=loguniform:1e-3:1e-2; weight_decay=uniform:0:0.1"
    one = fake_sweep(caches, tmp_path / "a", monkeypatch, FakeLockstep(),
                     SearchConfig(space=space, trials=4, sampler="random", at_once=1))
    four = fake_sweep(caches, tmp_path / "b", monkeypatch, FakeLockstep(),
                      SearchConfig(space=space, trials=4, sampler="random"))
    other = fake_sweep(caches, tmp_path / "c", monkeypatch, FakeLockstep(),
                       SearchConfig(space=space, trials=4, sampler="random"), seed=1)
    def drawn(rows):
        return sorted((Path(r["run"]).name, r["lr"], r["weight_decay"]) for r in rows)
    assert drawn(one) == drawn(four) and drawn(one) != drawn(other)
    assert sorted(Path(r["run"]).name[:3] for r in one) == ["01-", "02-", "03-", "04-"]


def test_a_drawn_value_the_branch_refuses_fails_that_trial_only(caches, tmp_path, monkeypatch):
    """width 32..34 with 2 heads: both ends are served (checked before reading), 33 is not (heads must divide)."""
    fake = FakeLockstep()
    results = fake_sweep(caches, tmp_path / "sweep", monkeypatch, fake,
                         SearchConfig(space="width=uniform:32:34", trials=6, sampler="random"))
    states = [t.state.name for t in study_trials(tmp_path / "sweep")]
    widths = [t.params["width"] for t in study_trials(tmp_path / "sweep")]
    assert 33 in widths and states.count("FAIL") == widths.count(33)  # the test can fail: 33 was drawn
    assert sorted(r["width"] for r in results) == sorted(w for w in widths if w != 33)
    assert [t.user_attrs["error"] for t in study_trials(tmp_path / "sweep") if t.state.name == "FAIL"][0] \
        .startswith("--space 'width=33': --width 33")


def test_a_study_started_by_another_sweep_is_refused(caches, tmp_path, monkeypatch):
    fake_sweep(caches, tmp_path / "sweep", monkeypatch, FakeLockstep(), SearchConfig(grid="lr=1e-3,2e-3"))
    with pytest.raises(MadError, match="holds another sweep .*pruner 'none' -> 'halving'"):
        fake_sweep(caches, tmp_path / "sweep", monkeypatch, FakeLockstep(),
                   SearchConfig(grid="lr=1e-3,2e-3", pruner="halving"))
    drawn = SearchConfig(space="lr=uniform:1e-3:2e-3", trials=2, sampler="random")
    fake_sweep(caches, tmp_path / "drawn", monkeypatch, FakeLockstep(), drawn)
    with pytest.raises(MadError, match="holds another sweep .*batch_size 16 -> 8"):
        fake_sweep(caches, tmp_path / "drawn", monkeypatch, FakeLockstep(), drawn, batch_size=8)


# ---- bad input on the command line: one line naming the option, exit 2, nothing written --------------


def compact_store(path) -> str:
    """A compact store (cells of 2, no correlation) of 4 videos: enough to be refused before reading."""
    manifest = synthetic_manifest()
    manifest.storage = "compact"
    manifest.compact = {"cell_size": 2, "correlation": 0, "correlation_groups": 1, "record_bytes": 16}
    paths = [f"a/v{i}.mp4" for i in range(4)]
    store = Store.create(path, manifest, paths, [0, 1, 0, 1])
    frames = np.arange(8, dtype=np.int32)[None]
    store.write_block(0, [VideoResult(i, p, {"records": np.zeros((1, 16), np.uint8)}, frames, num_frames=8)
                          for i, p in enumerate(paths)])
    return str(path)


@pytest.mark.parametrize("args,flag", [
    (["--grid", "colour=red,blue"], "--grid"),
    (["--space", "lr=uniform:0.3:0.1", "--trials", "4"], "--space"),
    (["--space", "lr=uniform:0.1:0.3", "--trials", "0"], "--trials"),
    (["--grid", "lr=1e-3", "--pruner", "median"], "--pruner"),
    (["--space", "lr=uniform:0.1:0.3", "--trials", "2", "--sampler", "cmaes"], "--sampler"),
    (["--grid", "lr=1e-3", "--storage", "sqlite:////nonexistent-folder/study.db"], "--storage"),
    (["--grid", "lr=1e-3", "--storage", "nosuchdb://host/study"], "--storage"),
    (["--grid", "lr=1e-3", "--storage", "/nonexistent-folder/study.journal"], "--storage"),
    (["--grid", "cell_size=1,2", "COMPACT"], "--grid"),
])
def test_bad_sweep_input_is_one_line_exit_2_nothing_written(caches, tmp_path, args, flag):
    cache = caches["train"]
    if args[-1] == "COMPACT":
        args, cache = args[:-1], compact_store(tmp_path / "compact")
    work = tmp_path / "work"
    work.mkdir()
    cwd = os.getcwd()
    os.chdir(work)
    try:
        result = CliRunner().invoke(app, ["sweep", *args, "--cache", cache, "--out", "sweep"])
    finally:
        os.chdir(cwd)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.output)
    assert lines[0].startswith("error: ") and flag in lines[0], lines
    assert os.listdir(work) == []


# ---- for real: SIGKILL mid-epoch and resume; two processes on one study -------------------------------


def sweep_command(caches, out, *search) -> list[str]:
    return [sys.executable, "-m", "mad", "sweep", *search, "--cache", caches["train"], "--val", caches["val"],
            "--out", str(out), "--epochs", "3", "--batch-size", "8", "--in-ram", "yes", "--device", "cpu"]


def run_to_end(command, log: Path) -> str:
    with open(log, "w") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert done.returncode == 0, log.read_text()[-3000:]
    return log.read_text()


def epochs_of(sweep: Path) -> dict[str, list[int]]:
    return {run.name: [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in sorted(sweep.iterdir()) if run.is_dir()}


@pytest.fixture(scope="module")
def small_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    make_cache(root / "train", videos_per_class=6, seed=0)
    make_cache(root / "val", videos_per_class=3, seed=1)
    return {name: str(root / name) for name in ("train", "val")}


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("search", [
    ["--grid", "lr=3e-3,1e-3", "--pruner", "halving"],
    ["--space", "lr=loguniform:1e-3:1e-2; dropout=uniform:0:0.3", "--trials", "2", "--sampler", "random"],
], ids=["grid", "random"])
def test_a_sweep_killed_mid_epoch_and_rerun_ends_as_if_never_killed(small_caches, tmp_path, search):
    run_to_end(sweep_command(small_caches, tmp_path / "whole", *search), tmp_path / "whole.log")
    killed = tmp_path / "killed"
    command = sweep_command(small_caches, killed, *search)
    with open(tmp_path / "killed.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not any(run.is_dir() and (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text()
                      for run in (killed.iterdir() if killed.exists() else [])):
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # in epoch 2 of some runs, maybe between two runs' epoch ends
        process.wait()
    assert not (killed / "leaderboard.csv").exists()
    before = epochs_of(killed)
    assert any(len(epochs) < 3 for epochs in before.values()), before  # it was killed before the end
    output = run_to_end(command, tmp_path / "resumed.log")
    assert "taken up again" in output
    assert same_board(board(killed), board(tmp_path / "whole")), (board(killed), board(tmp_path / "whole"))
    assert epochs_of(killed) == epochs_of(tmp_path / "whole")  # each epoch once: none trained twice


@pytest.mark.slow
@pytest.mark.e2e
def test_two_sweep_processes_share_one_study_and_train_each_trial_once(small_caches, tmp_path):
    grid = ["--grid", "lr=4e-3,3e-3,2e-3,1e-3", "--at-once", "1", "--storage", str(tmp_path / "shared.journal"),
            "--study-name", "shared"]
    command = sweep_command(small_caches, tmp_path / "sweep", *grid)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    files = [open(log, "w") for log in logs]
    workers = [subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT) for f in files]
    for worker, f in zip(workers, files):
        assert worker.wait(timeout=600) == 0, [log.read_text()[-2000:] for log in logs]
        f.close()
    outputs = [log.read_text() for log in logs]
    trained = [line.split()[2] for out in outputs for line in out.splitlines()
               if line.startswith("trial ") and "(kept" in line]
    names = [run_name(i, {"lr": lr}) for i, lr in enumerate((4e-3, 3e-3, 2e-3, 1e-3), 1)]
    assert sorted(trained) == names  # every trial trained, none twice
    assert all(" in lockstep" in out for out in outputs)  # both took some
    assert all(epochs == [1, 2, 3] for epochs in epochs_of(tmp_path / "sweep").values())
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(tmp_path / "shared.journal")))
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)
    boards = [out[out.index("sweep leaderboard"):] for out in outputs]
    assert boards[0] == boards[1] and len(board(tmp_path / "sweep")) == 4  # one leaderboard, whoever wrote it


def test_a_checkpoint_is_replaced_whole_or_not_at_all(tmp_path):
    """A sweep killed while a member writes last.pt or model.safetensors keeps the previous file."""
    from mad.adapt.checkpoint import replacing

    path = tmp_path / "last.pt"
    path.write_text("epoch 1")
    with pytest.raises(KeyboardInterrupt):
        with replacing(path) as partial:
            partial.write_text("epoch 2, half writ")
            raise KeyboardInterrupt
    assert path.read_text() == "epoch 1" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    with replacing(path) as partial:
        partial.write_text("epoch 2")
    assert path.read_text() == "epoch 2" and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.slow
@pytest.mark.e2e
def test_under_torchrun_each_rank_takes_its_own_trials(small_caches, tmp_path):
    """`torchrun --nproc-per-node 2 -m mad sweep ...`: two sweep processes on the sweep folder's study, no DDP."""
    command = sweep_command(small_caches, tmp_path / "sweep", "--grid", "lr=4e-3,3e-3,2e-3,1e-3", "--at-once", "1")
    command[1:3] = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "mad"]
    output = run_to_end(command, tmp_path / "torchrun.log")
    trained = [line.split()[2] for line in output.splitlines() if line.startswith("trial ") and "(kept" in line]
    assert sorted(trained) == [run_name(i, {"lr": lr}) for i, lr in enumerate((4e-3, 3e-3, 2e-3, 1e-3), 1)]
    assert output.count("sweep leaderboard") == 2 and len(board(tmp_path / "sweep")) == 4
    assert all(epochs == [1, 2, 3] for epochs in epochs_of(tmp_path / "sweep").values())


def test_whether_a_running_trials_owner_is_alive():
    from datetime import datetime, timedelta

    from mad.adapt.search import GRACE, HEARTBEAT, UNNAMED, owner

    def trial(started_ago: float, **attrs):
        return optuna.trial.FrozenTrial(
            number=0, state=optuna.trial.TrialState.RUNNING, value=None, values=None,
            datetime_start=datetime.now() - timedelta(seconds=started_ago), datetime_complete=None, params={},
            distributions={}, user_attrs={}, system_attrs=attrs, intermediate_values={}, trial_id=0)
    assert alive(trial(0, **{OWNER: owner()})) and not alive(trial(0, **{OWNER: dead_owner()}))
    assert alive(trial(1)) and not alive(trial(UNNAMED + 1))  # killed between ask and naming its owner
    elsewhere = {**owner(), "host": "another-node"}
    assert alive(trial(0, **{OWNER: elsewhere, HEARTBEAT: time.time() - GRACE + 10}))
    assert not alive(trial(0, **{OWNER: elsewhere, HEARTBEAT: time.time() - GRACE - 10}))
