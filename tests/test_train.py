"""Stage two from synthetic caches: data sources, training, resume, evaluation, sweep, CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import numpy as np
import torch

from tests.helpers.cache import make_cache
from mad.adapt.evaluate import evaluate
from mad.adapt.sweep import parse_grid, sweep
from mad.adapt.train import TrainConfig, train
from mad.cache.dataset import InMemoryTokens, StreamingTokens, open_tokens
from mad.cache.store import Store
from mad.errors import MadError

# Tiny branch: the whole file stays within a few CPU-seconds per test.
TINY = dict(width=32, heads=2, batch_size=16, lr=3e-3, warmup_epochs=1, workers=0)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Direction task (class = left-to-right or right-to-left motion): train 128, val 32, val with 2 clips.

    With 24 training clips per class, val top-1 after 20 epochs ranged 0.72-1.00 over seeds 0-3,
    with or without the correlation input; with 64 per class, 0.97-1.00.
    """
    root = tmp_path_factory.mktemp("caches")
    make_cache(root / "train", videos_per_class=64, seed=0)
    make_cache(root / "val", videos_per_class=16, seed=1)
    make_cache(root / "val2", videos_per_class=8, seed=2, clips=2)
    return {name: str(root / name) for name in ("train", "val", "val2")}


def config(caches, out, **overrides):
    options = dict(cache=caches["train"], val=caches["val"], epochs=2, out=str(out), **TINY)
    options.update(overrides)
    return TrainConfig(**options)


def metric_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "clips_per_second")} for row in rows]


# ---- data ------------------------------------------------------------------------------


def test_only_done_labelled_videos_are_used(tmp_path):
    store = make_cache(tmp_path / "c", videos_per_class=4, failed=(1,), unlabelled=(2,))
    data = open_tokens(store, "yes", progress=False)
    assert isinstance(data, InMemoryTokens)
    assert data.videos.tolist() == [0, 3, 4, 5, 6, 7]
    assert data.arrays[0].shape == (6, 1, 8, 17, 32) and data.arrays[0].dtype == torch.float16
    assert torch.equal(data.arrays[1][1], torch.from_numpy(store.read_layer(4, slice(3, 4))[0]))


def test_streaming_gives_the_same_batches_as_ram(caches):
    store = Store.open(caches["val2"])
    in_ram = open_tokens(store, "yes", progress=False)
    streamed = open_tokens(store, "no", workers=1)  # one spawned reader process
    assert isinstance(streamed, StreamingTokens)
    try:
        def same(a, b):  # one batch: every level, the labels, the views
            return (len(a[0]) == len(b[0]) == len(in_ram.arrays) and all(torch.equal(x, y) for x, y in zip(a[0], b[0]))
                    and torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]))

        for epoch in (1, 2):  # persistent workers serve a second pass
            ram, stream = list(in_ram.train_batches(5, seed=3, epoch=epoch)), list(streamed.train_batches(5, seed=3,
                                                                                                         epoch=epoch))
            assert len(ram) == len(stream) > 1 and all(same(a, b) for a, b in zip(ram, stream))
        # a jump, and a pass stopped half-way (a crash, a break) then started again, still give the right batches
        for epoch, stop in ((3, None), (5, 1), (5, None), (6, None)):
            ram, compared = list(in_ram.train_batches(4, seed=1, epoch=epoch)), 0
            for i, (a, b) in enumerate(zip(ram, streamed.train_batches(4, seed=1, epoch=epoch))):
                assert same(a, b)
                compared += 1
                if i == stop:
                    break
            assert len(ram) > 1 and compared == (stop + 1 if stop is not None else len(ram))
        levels, position, view = streamed._reader[(3, 1)]  # one item, read in this process
        assert (position, view) == (3, 1) and all(torch.equal(x, y[3, 1]) for x, y in zip(levels, in_ram.arrays))
        views = torch.cat([v for *_, v in in_ram.train_batches(16, seed=0, epoch=1)])
        assert set(views.tolist()) == {0, 1}  # one random view of the two per video
        assert sum(len(b[1]) for b in streamed.eval_batches(8, all_views=True)) == 2 * in_ram.num_videos
    finally:
        streamed.close()


# ---- training --------------------------------------------------------------------------


@pytest.mark.slow
def test_madapter_learns_temporal_order_that_linear_cannot(caches, tmp_path):
    madapter = train(config(caches, tmp_path / "madapter", epochs=20), quiet=True)
    linear = train(config(caches, tmp_path / "linear", arch="linear", epochs=20), quiet=True)
    assert madapter["val/acc/top1"] >= 0.9
    # Classes are exact time reversals: chance is 0.5 (the best of 20 noisy epochs may pick a lucky one).
    assert linear["last/val/acc/top1"] <= 0.65 and linear["val/acc/top1"] <= 0.75
    rows = metric_rows(tmp_path / "madapter")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.2  # training lowers the loss
    run = tmp_path / "madapter"
    for name in ("config.json", "metrics.jsonl", "model.safetensors", "last.pt", "curves.png", "confusion.png",
                 "summary.json"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "config.json").read_text())
    assert saved["cache_manifest"]["layers"] == [2, 4] and saved["model"]["arch"] == "madapter"
    assert "arch" not in saved["train"]  # the branch's settings are saved once, in "model"
    assert set(rows[0]) == {"epoch", "lr", "train/loss", "train/acc", "val/acc/top1", "val/acc/top5", "val/acc/mean1"}
    print(f"\nsynthetic direction task, val top-1: madapter {madapter['val/acc/top1']:.3f}, "
          f"linear {linear['val/acc/top1']:.3f}")


@pytest.mark.slow
def test_same_seed_same_metrics(caches, tmp_path):
    first = train(config(caches, tmp_path / "a"), quiet=True)
    second = train(config(caches, tmp_path / "b"), quiet=True)
    assert metric_rows(tmp_path / "a") == metric_rows(tmp_path / "b")
    assert first["train/loss"] == second["train/loss"]


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(caches, tmp_path):
    whole = train(config(caches, tmp_path / "whole", epochs=4), quiet=True)

    def crash_after_two(row):
        if row["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(caches, tmp_path / "cut", epochs=4), on_epoch_end=crash_after_two, quiet=True)
    with pytest.raises(MadError, match="a run already exists here; pass --resume"):
        train(config(caches, tmp_path / "cut", epochs=4), quiet=True)
    resumed = train(config(caches, tmp_path / "cut", epochs=4, resume=True), quiet=True)
    assert metric_rows(tmp_path / "cut") == metric_rows(tmp_path / "whole")
    assert resumed["val/acc/top1"] == whole["val/acc/top1"] and resumed["train/loss"] == whole["train/loss"]
    with pytest.raises(MadError, match=r"cannot resume with different settings \(--width 32 -> 64"):
        train(config(caches, tmp_path / "cut", epochs=4, width=64, resume=True), quiet=True)


@pytest.mark.slow
def test_streamed_training_matches_in_ram_training(caches, tmp_path):
    train(config(caches, tmp_path / "ram", in_ram="yes"), quiet=True)
    train(config(caches, tmp_path / "streamed", in_ram="no", workers=1), quiet=True)
    assert metric_rows(tmp_path / "ram") == metric_rows(tmp_path / "streamed")


@pytest.mark.slow
def test_no_image_model_is_built(caches, tmp_path, monkeypatch):
    from mad._compat import import_open_clip

    open_clip = import_open_clip()

    def forbidden(*args, **kwargs):
        raise AssertionError("training from the cache built an open_clip model")

    monkeypatch.setattr(open_clip, "create_model", forbidden)
    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    monkeypatch.setattr("mad.extract.backbone.load_backbone", forbidden)
    train(config(caches, tmp_path / "run", epochs=1), quiet=True)


def test_val_cache_of_other_tokens_is_refused(caches, tmp_path):
    make_cache(tmp_path / "other", videos_per_class=2, layers=(1, 4))
    with pytest.raises(MadError, match=r"other: does not match the training cache .* on --layers: 1,4 here, 2,4 there"):
        train(config(caches, tmp_path / "run", val=str(tmp_path / "other")), quiet=True)
    with pytest.raises(MadError, match="no mad cache here"):
        train(config(caches, tmp_path / "run", val=str(tmp_path / "missing")), quiet=True)


# ---- evaluation and sweep --------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_single_and_multi_view(caches, tmp_path):
    train(config(caches, tmp_path / "run", epochs=1), quiet=True)
    result = evaluate(tmp_path / "run", caches["val2"], device="cpu", progress=False)
    assert result["views"] == 2 and result["videos"] == 16
    for view in ("single_view", "multi_view"):
        assert set(result[view]) == {"acc/top1", "acc/top5", "acc/mean1"}
        assert 0.0 <= result[view]["acc/top1"] <= 1.0
    assert result["multi_view"]["acc/top5"] == 1.0  # two classes: top-5 holds every class
    assert json.loads((tmp_path / "run" / "eval-val2.json").read_text())["multi_view"] == result["multi_view"]
    assert (tmp_path / "run" / "confusion-val2.png").is_file()
    make_cache(tmp_path / "wide", videos_per_class=2, width=16)
    with pytest.raises(MadError, match=r"wide: does not match the training cache of .* on width \(--model\): "
                                       r"16 here, 32 there$"):
        evaluate(tmp_path / "run", tmp_path / "wide", device="cpu", progress=False)


@pytest.mark.slow
def test_sweep_trains_every_combination_from_one_read(caches, tmp_path, monkeypatch):
    reads = []
    original = Store.read

    def counting(self, *args, **kwargs):
        reads.append(self.location)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Store, "read", counting)
    base = TrainConfig(epochs=1, **TINY)
    results = sweep(caches["train"], caches["val"], "lr=1e-3,3e-3 arch=madapter,linear", str(tmp_path / "sweep"),
                    base=base, quiet=True)
    assert len(results) == 4
    assert {(r["lr"], r["arch"]) for r in results} == {(1e-3, "madapter"), (3e-3, "madapter"), (1e-3, "linear"),
                                                       (3e-3, "linear")}
    # one read per layer and shard: 128 train videos and 32 val videos in shards of 8, two layers
    assert reads.count(caches["train"]) == 2 * 16 and reads.count(caches["val"]) == 2 * 4
    with open(tmp_path / "sweep" / "leaderboard.csv") as f:
        board = list(csv.DictReader(f))
    assert len(board) == 4 and board[0]["val/acc/top1"] >= board[-1]["val/acc/top1"]


def test_grid_parsing():
    assert parse_grid("lr=1e-3,3e-4 width=256 arch=madapter,linear") == {
        "lr": [1e-3, 3e-4], "width": [256], "arch": ["madapter", "linear"]}
    with pytest.raises(MadError, match="'colour' is not a setting"):
        parse_grid("colour=red")
    with pytest.raises(MadError, match="width takes int values"):
        parse_grid("width=wide")


# ---- command line ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_cli_train_resume_eval_and_errors(caches, tmp_path):
    from typer.testing import CliRunner

    from mad.cli import app

    runner = CliRunner()
    run = str(tmp_path / "run")
    common = ["--cache", caches["train"], "--val", caches["val"], "--width", "16", "--heads", "2", "--in-ram", "yes"]
    result = runner.invoke(app, ["train", *common, "--epochs", "2", "--out", run])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--resume", "--out", run])  # settings come from the run's config.json
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    result = runner.invoke(app, ["eval", "--run", run, "--cache", caches["val2"], "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "multi_view" in result.output and "acc/top1" in result.output

    result = runner.invoke(app, ["train", "--cache", caches["train"], "--val", str(tmp_path / "nope"), "--out", run])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == f"error: {tmp_path / 'nope'}: no mad cache here (no zarr.json)"
    result = runner.invoke(app, ["train", *common, "--arch", "vit", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "error: --arch 'vit': use madapter, meanpool, linear or evl" in result.output
    result = runner.invoke(app, ["sweep", "--grid", "depth=x", "--cache", caches["train"]])
    assert result.exit_code == 2 and "error: --grid item 'depth=x': depth takes int values" in result.output


@pytest.mark.slow
@pytest.mark.e2e
def test_bench_train_smoke(tmp_path):
    from tests.helpers import TINY_MODEL

    from mad.bench.train import bench_train
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "videos", videos_per_class=1, val_per_class=0, num_frames=8, size=64)
    # 6 videos, limit 8: the list repeats; 2 repeats of the comparison, decoding in 1 worker process
    result = bench_train(str(videos["train"]), model=TINY_MODEL, layers="2,4", frames=4, batch_size=2, epochs=2,
                         width=32, online_steps=2, workers=1, limit=8, precision="fp32", device="cpu",
                         out=str(tmp_path / "out"), repeats=2, decode_workers=1)
    assert result["steps_per_epoch"] == 4 and result["settings"]["clips"] == 8 and len(result["runs"]) == 2
    for run in result["runs"]:  # each ratio is its own run's epoch times (timings themselves are noise here)
        assert all(run[k] > 0 for k in ("ram_epoch_seconds", "stream_epoch_seconds", "online_step_seconds"))
        assert run["online_over_ram"] == pytest.approx(run["online_step_seconds"] * 4 / run["ram_epoch_seconds"])
        assert run["online_decoded_over_stream"] == pytest.approx(
            run["online_decoded_step_seconds"] * 4 / run["stream_epoch_seconds"])
    for key in ("online_over_stream", "stream_over_ram"):
        spread = result[key]
        assert spread["min"] <= spread["median"] <= spread["max"]
        assert spread["min"] == min(r[key] for r in result["runs"])
    assert result["settings"]["store"] == "compact"
    assert len(list((tmp_path / "out").glob("train_cpu_*_compact.json"))) == 1


@pytest.mark.slow
def test_bf16_autocast_on_cpu_trains_and_bad_precision_is_refused(caches, tmp_path):
    fp32 = train(config(caches, tmp_path / "fp32", precision="fp32"), quiet=True)
    bf16 = train(config(caches, tmp_path / "bf16", precision="bf16"), quiet=True)
    assert math.isfinite(bf16["train/loss"]) and bf16["train/loss"] != fp32["train/loss"]  # autocast did run
    assert abs(bf16["train/loss"] - fp32["train/loss"]) < 0.1  # and trains the same model to about the same loss
    with pytest.raises(MadError, match="--precision 'fp16': use auto, bf16 or fp32"):
        train(config(caches, tmp_path / "bad", precision="fp16"), quiet=True)


@pytest.mark.slow
def test_cell_size_is_resolved_into_the_model_and_bad_values_are_refused(caches, tmp_path):
    from mad.adapt.checkpoint import load_model

    auto = train(config(caches, tmp_path / "auto", epochs=1), quiet=True)
    cells = train(config(caches, tmp_path / "cells", epochs=1, cell_size="2"), quiet=True)
    saved = json.loads((tmp_path / "cells" / "config.json").read_text())
    assert saved["model"]["cell_size"] == 2
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["model"]["cell_size"] == 1  # 4x4 grid: kept
    model, info = load_model(tmp_path / "cells" / "model.safetensors")
    assert model.cell == 2 and info["branch"].cell_size == 2
    assert auto["train/loss"] != cells["train/loss"]
    for bad in ("0", "half"):
        with pytest.raises(MadError, match=f"--cell-size '{bad}': give auto, 1"):
            train(config(caches, tmp_path / "bad", cell_size=bad), quiet=True)


def test_format_1_stores_still_open_append_and_train(tmp_path):
    """Stores written before format 2 (paths as zarr-python strings, `pool`, `dtype` in the manifest)."""
    import zarr

    store = make_cache(tmp_path / "old", videos_per_class=4)
    paths = store.paths()
    group = zarr.open_group(str(tmp_path / "old"), mode="r+")
    del group["path"]
    group.create_array("path", shape=(len(paths),), dtype=str, chunks=(8,))
    group["path"][:] = np.asarray(paths, dtype=object)
    manifest = dict(group.attrs["mad"])
    manifest.update(format_version=1, pool=manifest.pop("grid_downsample"), dtype="float16")
    for key in ("storage", "compact"):
        manifest.pop(key)
    group.attrs["mad"] = manifest
    old = Store.open(tmp_path / "old", mode="r+")
    assert old.manifest.format_version == 1 and old.paths() == paths and old.manifest.storage == "full"
    old.append_videos(["left_to_right/new.mp4"], [0])
    assert Store.open(tmp_path / "old").paths() == paths + ["left_to_right/new.mp4"] and old.verify() == []
    summary = train(TrainConfig(cache=str(tmp_path / "old"), out=str(tmp_path / "run"), epochs=1, **TINY), quiet=True)
    assert math.isfinite(summary["train/loss"])
