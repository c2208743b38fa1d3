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
