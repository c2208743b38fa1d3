"""Fault injection: random SIGKILLs during extraction, and damaged chunks on disk."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import warnings

import numpy as np

from conftest import TINY_MODEL, extract_config
from mad.cache.store import DONE, IncompleteStoreError, Store
from mad.extract.run import extract

warnings.filterwarnings("ignore", message=".*random weights.*")


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
    extract(extract_config(videos, tmp_path / "reference", shard_size=2, batch_size=2))
    reference = Store.open(tmp_path / "reference")
    expected = {layer: reference.read_layer(layer) for layer in reference.layers}

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
        for layer in store.layers:
            data = store.read_layer(layer)
            for v in done:  # done means complete: never partial data
                assert np.array_equal(data[v], expected[layer][v]), (trial, v, layer)
        if len(done) == reference.num_videos:
            break
    assert trial == 9 and kills_with_progress >= 5, "the kills should land while work is under way"
    subprocess.run(command, check=True, capture_output=True)
    store = Store.open(out)
    assert (store.status() == DONE).all() and store.paths() == reference.paths()
    for layer in store.layers:
        assert np.array_equal(store.read_layer(layer), expected[layer])
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

    from mad.extract.run import ExtractError

    with pytest.raises(ExtractError, match="not a mad cache"):
        extract(extract_config(videos, tmp_path / "foreign"))
