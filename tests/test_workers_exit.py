"""Worker processes end with the command that started them, however it ends (SIGKILL from a scheduler or
the OOM killer): no decoder, cache reader or multiprocessing resource tracker is left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pytest

from tests.helpers import TINY_MODEL
from tests.helpers.cache import make_cache
from tests.helpers.processes import descendants, running, survivors_of_sigkill
from mad.cache.store import DONE, IncompleteStoreError, Store

warnings.filterwarnings("ignore", message=".*random weights.*")

pytestmark = [pytest.mark.slow, pytest.mark.e2e,
              pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree in /proc")]

# Torch's own check (the worker compares getppid() when its queue has been idle 5 s) needs 5 s or more, and
# misses a parent killed while the worker was still starting; the kernel's parent-death signal is immediate.
WITHIN = 4.0


def _wait_for(condition, process, seconds=180.0, what=""):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the command ended before {what}"
        if condition():
            return
        time.sleep(0.1)
    process.kill()
    pytest.fail(f"timed out waiting for {what}")


def _done(out) -> int:
    try:
        return int((Store.open(out).status() == DONE).sum()) if Store.exists(out) else 0
    except (IncompleteStoreError, OSError, ValueError):
        return 0


def test_sigkilled_extract_leaves_no_worker(tmp_path):
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "demo", videos_per_class=10, val_per_class=0, num_frames=12,
                              size=64)["train"]  # 60 videos: the run is far from done at the kill
    out = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-m", "mad", "extract", "--videos", str(videos), "--out", str(out), "--model", TINY_MODEL,
         "--pretrained", "none", "--layers", "2,4", "--precision", "fp32", "--workers", "1", "--shard-size", "2",
         "--batch-size", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # videos done: the decoder has started and delivered (one killed while still starting is the unit test's)
    _wait_for(lambda: _done(out) >= 2, process, what="the first extracted videos")
    tree, left = survivors_of_sigkill(process, WITHIN)
    assert len(tree) >= 2, f"expected a decode worker and the resource tracker, found {tree}"
    assert not left, f"still running {WITHIN} s after the SIGKILL: {left}"


def test_sigkilled_streamed_train_leaves_no_reader(tmp_path):
    make_cache(tmp_path / "train", videos_per_class=32, seed=0)
    make_cache(tmp_path / "val", videos_per_class=8, seed=1)
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "mad", "train", "--cache", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
         "--in-ram", "no", "--workers", "2", "--epochs", "500", "--width", "16", "--heads", "2", "--batch-size",
         "8", "--device", "cpu", "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # an epoch logged: both train readers and both val readers have delivered batches
    metrics = run / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, process, what="the first epoch")
    tree, left = survivors_of_sigkill(process, WITHIN)
    assert len(tree) >= 5, f"expected 2 train readers, 2 val readers and the resource tracker, found {tree}"
    assert not left, f"still running {WITHIN} s after the SIGKILL: {left}"


_CHILD = """
import os, sys, time
import mad.runtime as runtime
parent, ready, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "parent-death signal":  # only the kernel can end it
    runtime._watch_parent = lambda parent: None
if mode == "watch thread":  # as where there is no prctl
    runtime._set_parent_death_signal = lambda: False
if mode == "parent gone before":  # killed while the worker was still starting
    while os.getppid() == parent:
        time.sleep(0.05)
exit_with_parent = runtime.exit_with_parent
open(ready + ".calling", "w").close()
exit_with_parent(parent)
open(ready, "w").close()
time.sleep(600)
"""

_PARENT = """
import subprocess, sys, os
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid()), *sys.argv[2:]])
print(child.pid, flush=True)
child.wait()
"""


@pytest.mark.parametrize("mode", ["parent-death signal", "watch thread", "parent gone before"])
def test_exit_with_parent(tmp_path, mode):
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, _CHILD, str(ready), mode], stdout=subprocess.PIPE,
                              text=True)
    child = int(parent.stdout.readline())
    if mode == "parent gone before":
        tree = descendants(parent.pid)
        survivors = survivors_of_sigkill(parent, 60.0)[1]  # the child exits once it has imported torch
        assert child in tree
        assert (tmp_path / "ready.calling").exists() and not ready.exists(), "the child must call exit_with_parent and end there"
    else:
        _wait_for(ready.exists, parent, seconds=60, what="the child")
        tree, survivors = survivors_of_sigkill(parent, 2.5)  # the watch thread looks every second
        assert child in tree
    assert not survivors and not running(tree), survivors
