"""`mad plan`: no model without a probe, a dataset's splits in one plan, and times that match `mad extract`."""

from __future__ import annotations

import os
import statistics
import warnings

import pytest
import torch
from typer.testing import CliRunner

from mad.cli import app
from mad.plan import PlanConfig, plan
from tests.helpers import TINY_MODEL, extract_config


def test_probe_0_runs_no_model(monkeypatch):
    import mad.extract.backbone

    def no_model(*args, **kwargs):
        raise AssertionError("--probe 0 loaded a model")

    monkeypatch.setattr(mad.extract.backbone, "load_backbone", no_model)
    result = plan(PlanConfig(num_videos=240000, views=1, val_videos=20000, val_views=9, probe=0))
    assert result["probe"] is None
    for mode in ("full", "compact"):
        assert result["total"][mode]["extraction_seconds"] is None and result["total"][mode]["bytes_on_disk"] > 0


def test_splits_planned_together_add_up_to_the_separate_plans():
    together = plan(PlanConfig(num_videos=240000, views=1, val_videos=20000, val_views=9, probe=0))
    train = plan(PlanConfig(num_videos=240000, views=1, probe=0))["splits"]["train"]
    val = plan(PlanConfig(num_videos=20000, views=9, probe=0))["splits"]["train"]
    assert together["splits"]["val"]["views"] == 9 and together["splits"]["val"]["clips_decoded"] == 3
    for mode in ("full", "compact"):
        assert together["splits"]["train"]["modes"][mode] == train["modes"][mode]
        assert together["splits"]["val"]["modes"][mode] == val["modes"][mode]
        assert together["total"][mode]["bytes_on_disk"] == (train["modes"][mode]["bytes_on_disk"]
                                                            + val["modes"][mode]["bytes_on_disk"])
    # Kinetics-400 at ViT-B/16, T=8, layers 4,8,12: the README's figures
    assert round(together["total"]["compact"]["bytes_on_disk"] / 1e12, 2) == 0.49
    assert round(together["total"]["full"]["bytes_on_disk"] / 1e12, 2) == 3.05


def test_cli_plans_train_and_val_with_the_total():
    result = CliRunner().invoke(app, ["plan", "--num-videos", "240000", "--val-videos", "20000", "--val-views", "9",
                                      "--probe", "0"])
    assert result.exit_code == 0, result.output
    lines = {" ".join(line.split()[:2]): line for line in result.output.splitlines()}
    assert "3.05 TB" in lines["total full"] and "492.27 GB" in lines["total compact"]
    assert "20,000 x 9" in lines["val compact"]
    assert "cells of 2x2 patches" in result.output and "not probed" in result.output
    result = CliRunner().invoke(app, ["plan", "--num-videos", "100", "--val-views", "9", "--probe", "0"])
    assert result.exit_code == 2 and result.output.strip() == (
        "error: mad plan: --val-views needs --val-videos N (the val split's videos)")


@pytest.mark.slow
def test_predicted_extraction_time_matches_mad_extract_in_both_modes(tmp_path):
    """Predicted / measured seconds per video within 1.5x, for each storage mode, on the same clips.

    Decoding in the main process (--workers 0) and one torch thread: at this size a worker's
    start-up and hand-over outweigh its clips, and on a busy machine two threads' per-op waits
    swung the tiny model's time 40x (0.007 to 0.31 s per view). The default pipeline is checked at
    ViT-B/16 by benchmarks/bench_plan_vs_extract.py. A process can still stall for a second or
    more, so the median of five rounds of plan, then extract each mode.
    """
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "clips", videos_per_class=6, val_per_class=0, num_frames=24, size=96)["train"]
    ratios = {"full": [], "compact": []}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _rounds(videos, tmp_path, ratios)
    finally:
        torch.set_num_threads(threads)
    medians = {mode: statistics.median(r) for mode, r in ratios.items()}
    assert all(1 / 1.5 <= r <= 1.5 for r in medians.values()), (ratios, os.getloadavg())


def _rounds(videos, tmp_path, ratios: dict, rounds: int = 5) -> None:
    from mad.extract.run import extract

    for attempt in range(rounds):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # random weights
            planned = plan(PlanConfig(videos=str(videos), model=TINY_MODEL, layers="2,4", precision="fp32",
                                      device="cpu", workers=0, probe=8))["splits"]["train"]
            for mode in ratios:
                summary = extract(extract_config(videos, tmp_path / f"{mode}-{attempt}", store=mode, cell_size="auto",
                                                 shard_size=32))
                measured = ((summary["seconds"] - summary["first_batch_seconds"])
                            / (summary["done_now"] - summary["first_batch_clips"]))  # after the warm-up batch
                ratios[mode].append(planned["modes"][mode]["extraction_seconds"] / planned["num_videos"] / measured)


def test_plan_takes_every_extract_option_and_counts_what_the_branches_store(tmp_path):
    """A working `mad extract` command line with `extract` replaced by `plan` plans that extraction: the same
    settings (--pretrained, --branches, --evl-layers included), and the levels --branches adds in the bytes."""
    import json

    from mad.cache.store import Store
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "clips", videos_per_class=1, val_per_class=0, num_frames=12, size=64)["train"]
    command = ["extract", "--videos", str(videos), "--out", str(tmp_path / "store"), "--model", TINY_MODEL,
               "--pretrained", "none", "--layers", "2,4", "--frames", "8", "--store", "full", "--branches",
               "madapter,evl", "--evl-layers", "2", "--workers", "0", "--device", "cpu", "--precision", "fp32",
               "--shard-size", "4", "--batch-size", "2", "--cell-size", "2", "--no-progress"]
    runner = CliRunner()
    assert runner.invoke(app, command).exit_code == 0
    result = runner.invoke(app, ["plan", *command[1:], "--probe", "1", "--json"])
    assert result.exit_code == 0, result.output
    planned = json.loads(result.stdout[result.stdout.index("{"):])
    config = planned["config"]
    assert (config["pretrained"], config["branches"], config["store"], config["shard_size"]) == (
        "none", "madapter,evl", "full", 4)
    assert (config["model"], config["layers"], config["cell_size"], config["videos"]) == (
        TINY_MODEL, "2,4", "2", str(videos))
    manifest = Store.open(tmp_path / "store").manifest
    assert manifest.stored_levels == [2, 3, 4]  # --layers 2,4 and EVL's last 2 blocks' levels 2..4
    level = manifest.frames * manifest.tokens * manifest.width * 2 + 20  # float16, + a chunk's overhead
    assert planned["splits"]["train"]["modes"]["full"]["bytes_per_video_view"] == 3 * level
    assert planned["splits"]["train"]["num_videos"] == 6 and planned["probe"]["decoded_files"] == 1
    assert runner.invoke(app, ["plan", "--num-videos", "5", "--pretrained", "nope.pt", "--probe", "0"]).exit_code == 0
