"""`mad plan --sweep K`: counted FLOPs, figures that scale as they must, read- vs compute-bound, bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mad.cli import app
from mad.plan import PlanConfig
from mad.plan_sweep import SweepPlanConfig, count_flops, plan_sweep
from tests.helpers import TINY_MODEL

# Kinetics-400 at ViT-B/16, T=8, layers 4,8,12, compact: what count_flops answers (checked by the slow test)
FLOPS = {"backbone_per_view": 281.0e9, "train_per_clip": 7.11e9, "val_per_clip": 2.49e9}
K400 = PlanConfig(num_videos=240000, views=1, probe=0)


def sweep(**changes) -> SweepPlanConfig:
    return SweepPlanConfig(**{"sweep": 4, "epochs": 3, **changes})


def test_twice_the_configurations_is_twice_the_compute_and_lockstep_reads_once():
    one, two = plan_sweep(K400, sweep(sweep=4), FLOPS), plan_sweep(K400, sweep(sweep=8), FLOPS)
    for side in ("lockstep", "one_by_one"):
        assert two[side]["compute_flops"] == pytest.approx(2 * one[side]["compute_flops"])
    assert two["lockstep"]["read_bytes"] == one["lockstep"]["read_bytes"]  # one read per epoch, whatever K
    for result, k in ((one, 4), (two, 8)):
        assert result["lockstep"]["read_bytes"] == pytest.approx(result["one_by_one"]["read_bytes"] / k)
        assert result["one_by_one"]["read_bytes"] == pytest.approx(k * 3 * 240000 * result["bytes_per_video_view"])
    assert two["extraction"] == one["extraction"]  # extracted once


def test_the_disk_decides_read_bound_or_compute_bound():
    slow, fast = plan_sweep(K400, sweep(disk_gbps=0.1), FLOPS), plan_sweep(K400, sweep(disk_gbps=100), FLOPS)
    assert slow["lockstep"]["bound"] == slow["one_by_one"]["bound"] == "read"
    assert fast["lockstep"]["bound"] == fast["one_by_one"]["bound"] == "compute"
    # compute-bound: lockstep saves nothing; read-bound: it saves the K-1 extra reads
    assert fast["lockstep"]["seconds"] == pytest.approx(fast["one_by_one"]["seconds"])
    assert slow["one_by_one"]["seconds"] == pytest.approx(4 * slow["lockstep"]["seconds"])
    assert slow["lockstep"]["seconds"] == pytest.approx(3 * 240000 * slow["bytes_per_video_view"] / 0.1e9)


def test_faster_device_shortens_compute_only():
    base, faster = plan_sweep(K400, sweep(disk_gbps=100), FLOPS), plan_sweep(K400, sweep(disk_gbps=100,
                                                                                          device_tflops=2 * 989), FLOPS)
    assert faster["lockstep"]["seconds"] == pytest.approx(base["lockstep"]["seconds"] / 2)
    assert faster["lockstep"]["read_bytes"] == base["lockstep"]["read_bytes"]


def test_kinetics_400_100_configurations_30_epochs():
    cfg = PlanConfig(num_videos=240000, views=1, val_videos=20000, probe=0)
    result = plan_sweep(cfg, SweepPlanConfig(sweep=100, epochs=30), FLOPS)
    assert round(result["bytes_per_video_view"] / 1e6, 2) == 1.17
    assert round(result["one_by_one"]["read_bytes"] / 1e12) == 846  # the 840 TB
    assert round(result["lockstep"]["read_bytes"] / 1e12, 1) == 8.5
    assert result["lockstep"]["bound"] == "compute" and result["one_by_one"]["bound"] == "read"
    assert result["extraction"]["bound"] == "decode"
    assert result["total_seconds"]["lockstep"] < 24 * 3600  # the target: one GPU-day


def test_counted_flops_of_the_tiny_model():
    flops = count_flops(PlanConfig(num_videos=1, model=TINY_MODEL, layers="2,4", cell_size="2", probe=0))
    assert flops["backbone_per_view"] > 0
    assert 2 * flops["val_per_clip"] < flops["train_per_clip"] < 4 * flops["val_per_clip"]  # backward ~2x forward


def test_cli_prints_the_sweep_plan_and_its_json():
    args = ["plan", "--num-videos", "1000", "--model", TINY_MODEL, "--layers", "2,4", "--cell-size", "2",
            "--sweep", "8", "--epochs", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "sweep, lockstep" in result.output and "predicted" in result.output
    result = CliRunner().invoke(app, [*args, "--json"])
    data = json.loads(result.stdout)
    assert data["config"]["sweep"] == 8 and data["prediction"].startswith("predicted")
    assert data["one_by_one"]["read_bytes"] == pytest.approx(8 * data["lockstep"]["read_bytes"])


@pytest.mark.parametrize("flag,value", [("--sweep", "0"), ("--disk-gbps", "0"), ("--utilisation", "1.5"),
                                        ("--device-tflops", "-1"), ("--epochs", "0"), ("--store", "tape"),
                                        ("--arch", "vit")])
def test_bad_input_is_one_line_exit_2(flag, value):
    result = CliRunner().invoke(app, ["plan", "--num-videos", "10", "--sweep", "4", "--probe", "0", flag, value])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and flag in lines[0], lines


@pytest.mark.slow
def test_vit_b16_branch_costs_about_7_gflop_per_clip():
    flops = count_flops(PlanConfig(num_videos=1, probe=0))
    assert flops["train_per_clip"] == pytest.approx(FLOPS["train_per_clip"], rel=0.02)
    assert flops["val_per_clip"] == pytest.approx(FLOPS["val_per_clip"], rel=0.02)
    assert flops["backbone_per_view"] == pytest.approx(FLOPS["backbone_per_view"], rel=0.02)
