"""Augmented train views (`mad extract --train-views K`): drawn reproducibly, stored along the view axis with
what re-makes them, refused in one line when the options are bad; `mad train` draws one per video per epoch."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mad.cache.store import DONE, Store
from mad.extract.run import extract
from mad.extract.views import ViewSettings, crop_boxes, draw, jittered_indices, remake_view, video_generator
from tests.helpers import TINY_MODEL, extract_config

warnings.filterwarnings("ignore", message=".*random weights.*")
K = 3


def _videos(tmp_path, per_class=1) -> Path:
    from mad.synthetic import make_demo_videos

    return make_demo_videos(tmp_path / "demo", videos_per_class=per_class, val_per_class=0, num_frames=12,
                            size=64)["train"]


def _contents(store: Store) -> dict:
    """Everything a store holds per video: data arrays, frame indices, view boxes, status."""
    arrays = {name: store.read(name) for name in store.data_arrays}
    return {**arrays, "frame_index": store.frame_index(), "view_box": store.view_boxes(), "status": store.status(),
            "paths": np.array(store.paths())}


def _assert_same(a: Store, b: Store) -> None:
    ours, theirs = _contents(a), _contents(b)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert np.array_equal(ours[name], theirs[name]), name


def test_views_fall_within_their_segments_and_the_frame():
    settings = ViewSettings(views=50, scale=(0.2, 0.6), ratio=(0.5, 2.0))
    draws = draw(video_generator(0, "a/b.mp4"), settings.views, 8)
    index = jittered_indices(draws, 80)
    segment = np.arange(8) * 10
    assert ((index >= segment) & (index < segment + 10)).all()  # one frame within each of the 8 segments
    assert len({tuple(row) for row in index.tolist()}) > 40  # and they differ view to view
    boxes = crop_boxes(draws, 120, 90, settings)
    x, y, w, h, flip = boxes.T
    assert (x >= 0).all() and (y >= 0).all() and (x + w <= 120).all() and (y + h <= 90).all()
    area = w * h / (120 * 90)
    assert (area > 0.18).all() and (area < 0.62).all()  # the scale range, up to rounding
    assert 10 < flip.sum() < 40  # about half flipped
    assert not crop_boxes(draws, 120, 90, ViewSettings(views=50, flip=False))[:, 4].any()


def test_a_video_draws_its_views_from_its_path_and_the_seed_alone():
    one = draw(video_generator(0, "a.mp4"), K, 8)
    assert np.array_equal(one.offsets, draw(video_generator(0, "a.mp4"), K, 8).offsets)
    assert not np.array_equal(one.offsets, draw(video_generator(0, "b.mp4"), K, 8).offsets)
    assert not np.array_equal(one.offsets, draw(video_generator(1, "a.mp4"), K, 8).offsets)


def test_twice_sharded_and_resumed_give_identical_stores(tmp_path):
    videos = _videos(tmp_path)  # 6 videos, blocks of 2
    options = dict(train_views=K, shard_size=2, batch_size=2)
    extract(extract_config(videos, tmp_path / "one", **options))
    one = Store.open(tmp_path / "one")
    m = one.manifest
    assert m.views == K and m.train_views == K and m.augment["flip"] and m.sampling == "tsn-random"
    assert one.frame_index().shape == (6, K, 8) and one.view_boxes().shape == (6, K, 5)
    assert one.read("layers/2").shape[:2] == (6, K)
    # the views of a video differ from each other (else the test below could not fail)
    assert len({tuple(row) for row in one.view_boxes()[0].tolist()}) == K
    assert not np.array_equal(one.read("layers/4")[0, 0], one.read("layers/4")[0, 1])

    extract(extract_config(videos, tmp_path / "again", **options))
    _assert_same(one, Store.open(tmp_path / "again"))
    for shard in ("1/2", "0/2"):  # the later slice first: another order of videos
        extract(extract_config(videos, tmp_path / "sharded", shard=shard, **options))
    _assert_same(one, Store.open(tmp_path / "sharded"))
    extract(extract_config(videos, tmp_path / "resumed", limit=3, **options))  # stops mid-block
    assert (Store.open(tmp_path / "resumed").status() == DONE).sum() == 3
    extract(extract_config(videos, tmp_path / "resumed", **options))
    _assert_same(one, Store.open(tmp_path / "resumed"))
    # another seed: other views
    extract(extract_config(videos, tmp_path / "seed1", view_seed=1, **options))
    assert not np.array_equal(Store.open(tmp_path / "seed1").view_boxes(), one.view_boxes())


def test_a_stored_view_is_remade_from_its_frame_indices_and_box(tmp_path):
    from mad.extract.backbone import load_backbone

    videos = _videos(tmp_path)
    extract(extract_config(videos, tmp_path / "cache", train_views=K, flip="no", crop_scale="0.3,0.5"))
    store = Store.open(tmp_path / "cache")
    m = store.manifest
    assert not store.view_boxes()[..., 4].any() and m.augment["scale"] == [0.3, 0.5]
    backbone = load_backbone(m.model, "none", "2,4", precision="fp32")  # the same seeded random weights
    for video, view in ((0, 2), (4, 1)):
        frames = remake_view(str(videos / store.paths()[video]), store.frame_index()[video, view],
                             store.view_boxes()[video, view], m.image_size, m.augment["short_side"])
        assert frames.shape == (m.frames, 3, m.image_size, m.image_size)
        with torch.no_grad():
            tokens = backbone(torch.from_numpy(frames))[-1]  # level 4: [T, N, D]
        stored = torch.from_numpy(store.read_layer(4, video)[view].astype(np.float32))
        assert torch.allclose(tokens, stored, atol=2e-2 * stored.abs().max().item())
        other = torch.from_numpy(store.read_layer(4, video)[(view + 1) % K].astype(np.float32))
        assert not torch.allclose(tokens, other, atol=2e-2 * stored.abs().max().item())


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mad", *args], capture_output=True, text=True)


def _extract_args(videos, out, *more) -> list[str]:
    return ["extract", "--videos", str(videos), "--out", str(out), "--model", TINY_MODEL, "--pretrained", "none",
            "--layers", "2,4", "--workers", "0", "--no-progress", *more]


@pytest.mark.parametrize("bad, named", [(["--train-views", "0"], "--train-views 0"),
                                        (["--train-views", "2", "--crop-scale", "0,1"], "--crop-scale '0,1'"),
                                        (["--train-views", "2", "--crop-scale", "0.5,1.2"], "--crop-scale"),
                                        (["--train-views", "2", "--clips", "2"], "--train-views 2")])
def test_bad_view_options_are_one_line_exit_2_nothing_written(tmp_path, bad, named):
    result = _cli(*_extract_args(tmp_path, tmp_path / "cache", *bad))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {named}"), lines  # before any model is loaded
    assert not (tmp_path / "cache").exists()


def _digest(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".mad-"))
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()


def test_train_views_on_resume_of_a_store_without_them_is_refused(tmp_path):
    videos = _videos(tmp_path)
    extract(extract_config(videos, tmp_path / "cache", limit=2))
    before = _digest(tmp_path / "cache")
    result = _cli(*_extract_args(videos, tmp_path / "cache", "--train-views", "4", "--precision", "fp32",
                                 "--shard-size", "4", "--store", "full"))
    assert result.returncode == 2
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")]  # random weights
    assert len(lines) == 1 and lines[0].endswith("(--train-views: 0 in the store, 4 given); use another --out, or "
                                                 "--overwrite to start over"), lines
    assert _digest(tmp_path / "cache") == before  # nothing written
    with pytest.raises(Exception, match="--flip: True in the store, False given"):  # and the other way round
        extract(extract_config(videos, tmp_path / "views", train_views=2, limit=1))
        extract(extract_config(videos, tmp_path / "views", train_views=2, flip="no"))


def test_train_draws_one_view_per_video_per_epoch_and_eval_the_first(tmp_path):
    from mad.cache.dataset import open_tokens

    videos = _videos(tmp_path, per_class=2)
    extract(extract_config(videos, tmp_path / "cache", train_views=K))
    data = open_tokens(str(tmp_path / "cache"), "yes", progress=False)

    def drawn(seed, epoch):
        batches = list(data.train_batches(5, seed, epoch))
        return torch.cat([b[2] for b in batches]).tolist(), torch.cat([b[3] for b in batches]).tolist()

    first = drawn(0, 1)
    assert sorted(first[0]) == list(range(data.num_videos))  # every video once an epoch
    assert set(first[1]) == set(range(K))  # among all K views
    assert drawn(0, 1) == first and drawn(0, 2) != first and drawn(1, 1) != first
    batch = next(iter(data.train_batches(data.num_videos, 0, 1)))
    stored = Store.open(tmp_path / "cache").read("layers/4")[data.videos]
    for row, (position, view) in enumerate(zip(batch[2].tolist(), batch[3].tolist())):
        assert torch.equal(batch[0][1][row], torch.from_numpy(stored[position, view]))
    assert set(torch.cat([b[3] for b in data.eval_batches(4)]).tolist()) == {0}


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_mid_run_then_resume_gives_the_same_views(tmp_path):
    videos = _videos(tmp_path, per_class=3)  # 18 videos, blocks of 2
    extract(extract_config(videos, tmp_path / "reference", train_views=K, shard_size=2, batch_size=2))
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mad", *_extract_args(videos, out, "--train-views", str(K), "--precision",
                                                           "fp32", "--shard-size", "2", "--batch-size", "2",
                                                           "--store", "full")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and process.poll() is None and done < 4:
        try:
            done = int((Store.open(out).status() == DONE).sum())
        except Exception:
            done = 0
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert 4 <= (Store.open(out).status() == DONE).sum() < 18, "the kill must land mid-run"
    subprocess.run(command, check=True, capture_output=True)
    _assert_same(Store.open(tmp_path / "reference"), Store.open(out))


def test_train_on_views_alone_equals_lockstep_and_eval_needs_deterministic_views(tmp_path):
    from mad.adapt.train import TrainConfig, train
    from mad.errors import MadError
    from tests.test_lockstep import TINY, assert_same_rows, lockstep, metric_rows

    videos = _videos(tmp_path, per_class=2)
    extract(extract_config(videos, tmp_path / "train", train_views=K))
    extract(extract_config(videos, tmp_path / "val"))  # deterministic: the centre view
    caches = {"train": str(tmp_path / "train"), "val": str(tmp_path / "val")}
    settings = {**TINY, "batch_size": 4}

    def config(out, **overrides):
        return TrainConfig(**{**settings, "cache": caches["train"], "val": caches["val"], "out": str(out), **overrides})

    train(config(tmp_path / "alone"), quiet=True)
    lockstep(caches, [config(tmp_path / "lock0"), config(tmp_path / "lock1", lr=1e-3)])
    assert_same_rows(metric_rows(tmp_path / "alone"), metric_rows(tmp_path / "lock0"))
    assert metric_rows(tmp_path / "lock0") != metric_rows(tmp_path / "lock1")
    # mad report shows which view each training video was trained on in the last epoch, as the model saw it
    from mad.cache.dataset import epoch_order
    from mad.report import build_report, render

    run = build_report([tmp_path / "alone"], "cpu", worst=1)[0]
    positions, views = epoch_order(12, K, TrainConfig().seed, settings["epochs"])
    drawn = dict(zip(positions.tolist(), views.tolist()))
    assert len(run.trained_views) == 3
    for position, video in enumerate(run.trained_views):
        assert [view["trained"] for view in video["views"]] == [k == drawn[position] for k in range(K)]
        assert all(view["strip"] for view in video["views"])
    assert "Train views: the one each video was trained on in epoch 2" in render([run])
    with pytest.raises(MadError, match="random --train-views views; evaluate on a store extracted without"):
        train(config(tmp_path / "refused", val=caches["train"]), quiet=True)
    assert not (tmp_path / "refused").exists()


def test_plan_counts_train_views_and_info_shows_them(tmp_path):
    from rich.console import Console

    from mad.cache.info import show_info
    from mad.plan import PlanConfig, plan

    one, four = (plan(PlanConfig(num_videos=100, val_videos=10, train_views=k, probe=0)) for k in (None, 4))
    for mode in ("full", "compact"):
        train1, train4 = one["splits"]["train"]["modes"][mode], four["splits"]["train"]["modes"][mode]
        assert train4["read_bytes_every_view"] == 4 * train1["read_bytes_every_view"]
        assert train4["read_bytes_per_epoch"] == train1["read_bytes_per_epoch"]  # one view a video an epoch
        assert four["splits"]["val"]["modes"][mode] == one["splits"]["val"]["modes"][mode]  # val: deterministic
    assert four["splits"]["train"]["views"] == 4 and four["splits"]["train"]["clips_decoded"] == 4
    with pytest.raises(Exception, match="--train-views 0"):
        PlanConfig(num_videos=1, train_views=0)

    extract(extract_config(_videos(tmp_path), tmp_path / "cache", train_views=2, flip="no", limit=1))
    console = Console(record=True, width=300)
    show_info(str(tmp_path / "cache"), console=console)
    text = console.export_text()
    assert "train views      2 per video" in text and "flips off" in text and "[6, 2, 8, 17, 64]" in text
