"""The demo dataset writes readable, correctly ordered clips; the bad corpus is as labelled."""

from __future__ import annotations

import av
import numpy as np
import pytest

from mad.synthetic import CLASSES, make_demo_videos

from tests.helpers.badfiles import make_bad_corpus


def _decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _centroid_x(video: np.ndarray) -> np.ndarray:
    """[T] x-centroid of the pixels that differ from the (per-pixel median) background."""
    background = np.median(video, axis=0)
    diff = np.abs(video.astype(np.float32) - background).sum(axis=-1)  # [T,H,W]
    mask = diff > 60
    xs = np.arange(video.shape[2])
    return np.array([xs[np.nonzero(m)[1]].mean() for m in mask])


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, make_demo_videos(root, videos_per_class=2, val_per_class=1, num_frames=16, size=96)


def test_demo_layout_and_frame_counts(demo):
    root, info = demo
    assert info["classes"] == list(CLASSES) and len(CLASSES) == 6
    assert (root / "classes.txt").read_text().split() == list(CLASSES)
    for split, count in (("train", 2), ("val", 1)):
        assert info[split] == root / split
        for name in CLASSES:
            clips = sorted((root / split / name).glob("*.mp4"))
            assert len(clips) == count
            for clip in clips:
                video = _decode(clip)
                assert video.shape == (16, 96, 96, 3)


def test_demo_motion_direction(demo):
    root, _ = demo
    right, left = (sorted((root / "train" / name).glob("*.mp4")) for name in ("moving_right", "moving_left"))
    assert right and left  # else the loops below check nothing
    for path in right:
        x = _centroid_x(_decode(path))
        assert x[-1] - x[0] > 15 and np.all(np.diff(x) > -2), x
    for path in left:
        x = _centroid_x(_decode(path))
        assert x[0] - x[-1] > 15 and np.all(np.diff(x) < 2), x


def test_demo_is_deterministic(tmp_path):
    a = make_demo_videos(tmp_path / "a", videos_per_class=1, val_per_class=0, num_frames=8, size=64)
    b = make_demo_videos(tmp_path / "b", videos_per_class=1, val_per_class=0, num_frames=8, size=64)
    for name in CLASSES:
        (clip_a,) = (a["train"] / name).glob("*.mp4")
        (clip_b,) = (b["train"] / name).glob("*.mp4")
        assert np.array_equal(_decode(clip_a), _decode(clip_b))


def test_bad_corpus(tmp_path):
    expected = make_bad_corpus(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == set(expected)
    for name, kind in expected.items():
        path = tmp_path / name
        assert path.stat().st_size < 200_000, name
        if kind == "fail":
            with pytest.raises((av.error.FFmpegError, StopIteration, IndexError, ValueError)):
                with av.open(str(path)) as container:
                    next(container.decode(video=0))
        elif kind == "ok":
            with av.open(str(path)) as container:
                frame = next(container.decode(video=0))
                assert frame.to_ndarray(format="rgb24").ndim == 3
        else:
            assert kind == "any"


def test_shifted_placement_moves_training_objects_to_the_top_left_at_half_size():
    from mad.synthetic import PLACEMENTS, make_clip

    def clip(placement, seed=3):
        return make_clip("orbiting_clockwise", np.random.default_rng(seed), 16, 64, placement).astype(float)

    assert np.array_equal(clip((1.0, 0.0, 0.0)), make_clip("orbiting_clockwise", np.random.default_rng(3), 16, 64))
    for seed in range(4):
        moving = clip(PLACEMENTS["shifted"]["train"], seed).std(axis=0).mean(axis=-1) > 20  # the object passed
        assert moving[:32, :32].sum() > 10 * max(moving[32:, 32:].sum(), 1)
        val = clip(PLACEMENTS["shifted"]["val"], seed).std(axis=0).mean(axis=-1) > 20
        assert val.sum() > 2 * moving.sum()  # larger
        assert val[32:, 32:].sum() > 0.3 * val[:32, :32].sum()  # about the centre, as drawn
