"""Issue 14's tracking parts: TensorBoard scalars, per-video predictions CSV, plain-line logs without a terminal."""

from __future__ import annotations

import csv
import json
import os
import pty
import re
import select
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mad.adapt.checkpoint import load_model
from mad.adapt.evaluate import predict_probs
from mad.adapt.sweep import sweep
from mad.adapt.train import TrainConfig, train
from mad.cache.dataset import open_tokens
from mad.cli import app
from tests.helpers import TINY_MODEL
from tests.helpers.cache import make_cache

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")

TINY = dict(width=16, heads=2, batch_size=8, workers=0, in_ram="yes")
SIX_CLASSES = ["left_to_right", "right_to_left", "c2", "c3", "c4", "c5"]  # labels use the first two


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    make_cache(root / "train", videos_per_class=8, seed=0)
    make_cache(root / "val", videos_per_class=4, seed=1)
    return {name: str(root / name) for name in ("train", "val")}


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tensorboard_scalars(run) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} as TensorBoard reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(run) -> None:
    rows = metrics(run)
    expected = {tag: [(row["epoch"], float(np.float32(row[tag]))) for row in rows] for tag in rows[0] if tag != "epoch"}
    assert "val/acc/top1" in expected and "train/loss" in expected
    assert tensorboard_scalars(run) == expected  # same names, step = epoch, values to float32 (TensorBoard's type)


# ---- tensorboard ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_train_log_tensorboard_writes_the_metrics_jsonl_scalars(caches, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--cache", caches["train"], "--val", caches["val"], "--epochs", "2",
                                      "--width", "16", "--heads", "2", "--batch-size", "8", "--workers", "0",
                                      "--out", str(run), "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert len(metrics(run)) == 2
    assert_tensorboard_equals_metrics(run)

    # Resumed with --log tensorboard after running without it: the earlier epochs are logged from metrics.jsonl.
    def stop_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    cut = TrainConfig(cache=caches["train"], val=caches["val"], epochs=3, out=str(tmp_path / "cut"), **TINY)
    with pytest.raises(KeyboardInterrupt):
        train(cut, on_epoch_end=stop_after_two, quiet=True)
    assert not (tmp_path / "cut" / "tensorboard").exists()
    cut.resume, cut.log = True, "tensorboard"
    train(cut, quiet=True)
    assert [row["epoch"] for row in metrics(tmp_path / "cut")] == [1, 2, 3]
    assert_tensorboard_equals_metrics(tmp_path / "cut")


@pytest.mark.slow
def test_sweep_log_tensorboard_gives_every_run_its_scalars(caches, tmp_path):
    base = TrainConfig(epochs=1, log="tensorboard", **TINY)
    results = sweep(caches["train"], caches["val"], "lr=1e-3,3e-3", str(tmp_path / "sweep"), base=base, quiet=True)
    assert len(results) == 2
    for summary in results:
        assert_tensorboard_equals_metrics(tmp_path / "sweep" / os.path.basename(summary["run"]))


def test_log_without_tensorboard_installed_fails_at_start_in_one_line(caches, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    runner = CliRunner()
    run = tmp_path / "run"
    common = ["--cache", caches["train"], "--val", caches["val"], "--epochs", "1", "--out", str(run)]
    result = runner.invoke(app, ["train", *common, "--log", "tensorboard"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --log tensorboard needs the tensorboard package: pip install tensorboard "
        "(or pip install 'mad[tensorboard]')"]
    assert not run.exists()  # refused before the run folder was made
    result = runner.invoke(app, ["sweep", "--grid", "lr=1e-3", "--cache", caches["train"], "--log", "tensorboard"])
    assert result.exit_code == 2 and "pip install tensorboard" in result.output
    result = runner.invoke(app, ["train", *common, "--log", "tensorboard,wandb"])
    assert result.exit_code == 2
    assert "error: --log 'tensorboard,wandb': 'wandb' is not a tracker; use none or tensorboard" in result.output


# ---- predictions CSV ------------------------------------------------------------------


@pytest.mark.slow
def test_predictions_csv_reproduces_mad_eval(tmp_path):
    """Single- and multi-view top-1/top-5 from the CSV equal `mad eval`'s; probabilities are the softmax's."""
    make_cache(tmp_path / "train", videos_per_class=8, class_names=SIX_CLASSES)
    val = make_cache(tmp_path / "val", videos_per_class=6, clips=3, seed=2, unlabelled=(1, 4),
                     class_names=SIX_CLASSES)
    train(TrainConfig(cache=str(tmp_path / "train"), epochs=1, out=str(tmp_path / "run"), **TINY), quiet=True)
    result = CliRunner().invoke(app, ["eval", "--run", str(tmp_path / "run"), "--cache", str(tmp_path / "val"),
                                      "--device", "cpu", "--in-ram", "yes"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "run" / "predictions-val.csv"
    assert f"per-video predictions: {path}" in result.output
    reported = json.loads((tmp_path / "run" / "eval-val.json").read_text())  # what `mad eval` printed, unrounded
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    # One row per extracted video, unlabelled ones too (no true class, no score).
    assert [int(r["video"]) for r in rows] == list(range(12)) and [r["path"] for r in rows] == val.paths()
    assert [r["true_class"] for r in rows] == ["" if i in (1, 4) else SIX_CLASSES[i % 2] for i in range(12)]
    assert all(r["single_correct"] == r["multi_correct"] == "" for r in rows if not r["true_class"])
    labelled = [r for r in rows if r["true_class"]]
    assert reported["videos"] == len(labelled) == 10 and reported["views"] == 3
    for view in ("single", "multi"):
        top1 = [r[f"{view}_class1"] == r["true_class"] for r in labelled]
        top5 = [r["true_class"] in [r[f"{view}_class{i}"] for i in range(1, 6)] for r in labelled]
        assert [int(r[f"{view}_correct"]) for r in labelled] == [int(x) for x in top1]
        assert sum(top1) == round(reported[f"{view}_view"]["acc/top1"] * len(labelled))
        assert np.mean(top1) == pytest.approx(reported[f"{view}_view"]["acc/top1"], abs=1e-6)
        assert np.mean(top5) == pytest.approx(reported[f"{view}_view"]["acc/top5"], abs=1e-6)
        for r in rows:
            probs = [float(r[f"{view}_prob{i}"]) for i in range(1, 6)]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
            assert len({r[f"{view}_class{i}"] for i in range(1, 6)}) == 5

    # The probabilities are the model's softmax: view 0, and the mean over the 3 views.
    model, info = load_model(tmp_path / "run" / "model.safetensors")
    done = np.arange(12)
    probs = predict_probs(model, open_tokens(val, "yes", progress=False, videos=done), 4, torch.device("cpu"),
                          all_views=True, arch=info["branch"].arch)
    for view, p in (("single", probs[:, 0]), ("multi", probs.mean(dim=1))):
        values, indices = p.topk(5, dim=1)
        assert [[r[f"{view}_class{i}"] for i in range(1, 6)] for r in rows] == \
            [[SIX_CLASSES[c] for c in row] for row in indices.tolist()]
        assert np.allclose([[float(r[f"{view}_prob{i}"]) for i in range(1, 6)] for r in rows], values, atol=1e-6)
    assert not torch.equal(probs[:, 0], probs.mean(dim=1))  # the two views' columns are not the same numbers


# ---- plain-line logs ------------------------------------------------------------------

PLAIN_LINE = re.compile(r"extract (\d+)/(\d+) \((\d+)%\)  (\d+\.\d\d) videos/s  ETA (\d+:\d\d:\d\d)  (\d+) failed")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """12 demo clips and one broken file."""
    from mad.synthetic import make_demo_videos

    root = tmp_path_factory.mktemp("plain")
    folder = make_demo_videos(root / "demo", videos_per_class=2, val_per_class=0, num_frames=8, size=64)["train"]
    (folder / "growing" / "broken.mp4").write_bytes(b"not a video at all" * 10)
    return folder


def extract_command(videos, out) -> list[str]:
    return [sys.executable, "-m", "mad", "extract", "--videos", str(videos), "--out", str(out), "--model", TINY_MODEL,
            "--pretrained", "none", "--layers", "2,4", "--precision", "fp32", "--workers", "0", "--batch-size", "2"]


@pytest.mark.slow
@pytest.mark.e2e
def test_extraction_into_a_pipe_prints_plain_lines_with_the_counts(videos, tmp_path):
    env = {**os.environ, "FORCE_COLOR": "1"}  # even told to colour, a pipe gets plain text
    result = subprocess.run(extract_command(videos, tmp_path / "cache"), capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    for text in (result.stdout, result.stderr):
        assert "\r" not in text and "\x1b" not in text
    lines = result.stdout.splitlines()
    matches = [PLAIN_LINE.fullmatch(line) for line in lines]
    assert all(matches), lines
    counts = [(int(m[1]), int(m[2]), int(m[3]), int(m[6])) for m in matches]
    assert 2 <= len(counts) <= 11  # one line per 10% step reached (several steps per batch here) and the end
    assert all(total == 13 for _, total, _, _ in counts)
    assert [done for done, *_ in counts] == sorted({done for done, *_ in counts})  # growing, never repeated
    assert all(percent == round(100 * done / 13) for done, _, percent, _ in counts)
    assert counts[-1] == (13, 13, 100, 1)  # the end: every video handled, the broken one failed
    summary = [line for line in result.stderr.splitlines() if "extracted" in line]
    assert summary == ["12 extracted, 1 failed in " + summary[0].split(" failed in ")[1]]  # one unwrapped line
    assert summary[0].endswith("12 done, 1 failed, 0 pending of 13")

    # --no-progress: neither progress nor summary (in this process: CliRunner's stdout is not a terminal either).
    result = CliRunner().invoke(app, extract_command(videos, tmp_path / "quiet")[3:] + ["--no-progress"])
    assert result.exit_code == 0, result.output
    assert not PLAIN_LINE.search(result.output) and "extracted" not in result.output


@pytest.mark.slow
@pytest.mark.e2e
def test_extraction_on_a_terminal_keeps_the_rich_bar(videos, tmp_path):
    controller, terminal = pty.openpty()
    process = subprocess.Popen(extract_command(videos, tmp_path / "cache"), stdout=terminal, stderr=terminal)
    os.close(terminal)
    output = b""
    while True:  # read while it runs: a full pty buffer would block it
        if select.select([controller], [], [], 0.1)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    process.wait(timeout=300)
    os.close(controller)
    text = output.decode(errors="replace")
    assert process.returncode == 0
    assert "━" in text and "13/13" in text and "\x1b[" in text  # rich's bar, redrawn with control codes
    assert not PLAIN_LINE.search(text)


def test_plain_progress_prints_every_tenth_every_five_minutes_and_at_the_end(monkeypatch, capsys):
    from mad import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    lines = progress.PlainProgress("extract", 100)
    for done in range(1, 101):  # one video a second
        clock[0] += 1.0
        lines.update(done, done, 0)
    lines.stop()  # nothing new since the last line: no repeat
    printed = capsys.readouterr().out.splitlines()
    assert [int(PLAIN_LINE.fullmatch(line)[1]) for line in printed] == list(range(10, 101, 10))
    assert printed[0] == "extract 10/100 (10%)  1.00 videos/s  ETA 0:01:30  0 failed"

    slow = progress.PlainProgress("extract", 10_000)  # 10% = 1000 videos, 10 s each: a line every 5 minutes
    for done in range(1, 71):
        clock[0] += 10.0
        slow.update(done, done - done // 7, done // 7)
    slow.stop()  # stopped early: the last counts are printed
    printed = capsys.readouterr().out.splitlines()
    assert [int(PLAIN_LINE.fullmatch(line)[1]) for line in printed] == [30, 60, 70]
    assert printed[-1] == "extract 70/10000 (1%)  0.09 videos/s  ETA 27:35:00  10 failed"  # 10 s a video x 9930 left


def test_training_into_a_pipe_prints_one_plain_line_per_epoch(caches, tmp_path, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--cache", caches["train"], "--val", caches["val"], "--epochs", "3",
                                      "--width", "16", "--heads", "2", "--batch-size", "8", "--workers", "0",
                                      "--out", str(run)])  # CliRunner's stdout is not a terminal
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "\x1b" not in result.output
    epochs = [line for line in result.output.splitlines() if line.startswith("epoch ")]
    expected = [f"epoch {r['epoch']}/3  loss {r['train/loss']:.4f}  acc {r['train/acc']:.3f}  "
                f"val {r['val/acc/top1']:.3f}  {r['clips_per_second']:.0f} clips/s  {r['epoch_seconds']:.1f} s"
                for r in metrics(run)]
    assert epochs == expected
