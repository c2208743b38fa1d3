"""Fault injection: random SIGKILLs during extraction, and damaged chunks on disk."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from tests.helpers import TINY_MODEL, extract_config
from mad.cache.store import DONE, IncompleteStoreError, Store
from mad.extract.run import extract

warnings.filterwarnings("ignore", message=".*random weights.*")

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # pytest -m 'not slow' leaves these out


def _done(out) -> int:
    try:
        return int((Store.open(out).status() == DONE).sum()) if Store.exists(out) else 0
    except IncompleteStoreError:  # killed while creating the store
        return 0


def test_random_sigkills_never_corrupt_and_resume_completes(tmp_path):
    """10 seeded kills at random moments: after each, every video marked done holds exactly the data of an
    uninterrupted run; the final resume completes the store bitwise equal to that run."""
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "demo", videos_per_class=10, val_per_class=0, num_frames=12,
                              size=64)["train"]  # 60 videos
    # compact, the default `mad extract` store below (test_extract's SIGKILL test covers full stores)
    extract(extract_config(videos, tmp_path / "reference", shard_size=2, batch_size=2, store="compact"))
    reference = Store.open(tmp_path / "reference")
    expected = {name: reference.read(name) for name in reference.data_arrays}

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mad", "extract", "--videos", str(videos), "--out", str(out), "--model",
               TINY_MODEL, "--pretrained", "none", "--layers", "2,4", "--precision", "fp32", "--workers", "0",
               "--shard-size", "2", "--batch-size", "2"]
    rng = random.Random(1234)
    kills_with_progress = 0
    for trial in range(10):
        before = _done(out)
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # A random moment: after a random number (0-2) of blocks were written, plus a random fraction of a second.
        target = before + 2 * rng.randint(0, 2)
        deadline = time.time() + 60
        while target > before and time.time() < deadline and process.poll() is None:
            if _done(out) >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        if _done(out) == 0:
            continue
        store = Store.open(out)
        done = np.flatnonzero(store.status() == DONE)
        kills_with_progress += len(done) > before
        for name in store.data_arrays:
            data = store.read(name)
            for v in done:  # done means complete: never partial data
                assert np.array_equal(data[v], expected[name][v]), (trial, v, name)
    # Timing decides how many kills land mid-work (a loaded machine is slower); most must.
    assert kills_with_progress >= 3, f"only {kills_with_progress} of 10 kills landed while work was under way"
    subprocess.run(command, check=True, capture_output=True)
    store = Store.open(out)
    assert (store.status() == DONE).all() and store.paths() == reference.paths()
    for name in store.data_arrays:
        assert np.array_equal(store.read(name), expected[name])
    assert np.array_equal(store.frame_index(), reference.frame_index())


def test_store_whose_creation_was_interrupted_is_made_again(tmp_path):
    import zarr

    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "demo", videos_per_class=1, val_per_class=0, num_frames=12,
                              size=64)["train"]
    zarr.open_group(str(tmp_path / "cache"), mode="w", attributes={"mad_creating": True})  # as a kill leaves it
    summary = extract(extract_config(videos, tmp_path / "cache"))
    assert summary["done_total"] == 6
    # A foreign Zarr group is not ours to replace.
    zarr.open_group(str(tmp_path / "foreign"), mode="w", attributes={"owner": "someone"})
    import pytest

    from mad.errors import MadError

    with pytest.raises(MadError, match="not a mad cache"):
        extract(extract_config(videos, tmp_path / "foreign"))


def test_ddp_training_with_two_ranks_matches_one_process(tmp_path):
    """torchrun --nproc-per-node 2 (gloo on CPU) gives the metrics of one process with the same global batch."""
    import json

    from tests.helpers.cache import make_cache

    make_cache(tmp_path / "train", videos_per_class=12)
    make_cache(tmp_path / "val", videos_per_class=4, seed=1)
    options = ["train", "--cache", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--width", "32",
               "--heads", "2", "--epochs", "3", "--batch-size", "8", "--dropout", "0", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "mad", *options, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "mad", *options, "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    rows = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 3  # rank 0 alone wrote the metrics
    for a, b in zip(*rows):
        for key in ("train/loss", "train/acc", "val/acc/top1", "val/acc/top5", "lr"):
            assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])


def test_training_on_a_damaged_cache_fails_clearly(tmp_path):
    """Flipped bytes in a chunk: `mad train` stops with a message naming the store, not silent garbage."""
    from tests.helpers.cache import make_cache

    make_cache(tmp_path / "train", videos_per_class=8)
    shard = next(p for p in sorted((tmp_path / "train" / "layers").rglob("*")) if p.is_file()
                 and p.parent.name != "layers" and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = subprocess.run([sys.executable, "-m", "mad", "train", "--cache", str(tmp_path / "train"), "--epochs",
                             "1", "--width", "32", "--heads", "2", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and str(tmp_path / "train") in message and "checksum" in message
