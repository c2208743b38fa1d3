"""benchmarks/gpu_check.sh is tested code before any GPU shows up: --smoke runs every step on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("environment", "memory_vit_b16", "cuda_tests", "memory_vit_l14", "extract", "train_streamed", "sweep")


def gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_without_cuda_and_without_smoke_it_refuses_in_one_line(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    done = gpu_check("--out", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("gpu_check: no CUDA device here")


def test_one_step_writes_the_json(tmp_path):
    done = gpu_check("--smoke", "--steps", "environment", "--out", str(tmp_path), timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    step = report["steps"]["environment"]
    assert step["status"] == "ok" and step["torch"] and step["zarr"][0].isdigit()
    assert report["published_side4video_gb"]["AIM"] == 35.2


@pytest.mark.slow
@pytest.mark.e2e
def test_smoke_runs_every_step_on_the_cpu(tmp_path):
    done = gpu_check("--smoke", "--out", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = report["steps"]
    assert report["smoke"] and tuple(steps) == STEPS
    failed = {name: step for name, step in steps.items() if step["status"] != "ok"}
    assert not failed, json.dumps(failed, indent=1)[-3000:]
    modes = [row["mode"] for row in steps["memory_vit_b16"]["modes"]]
    assert modes == ["in-backbone-adapter", "madapter-online", "madapter-cached", "evl-online", "evl-cached"]
    assert all(row["peak_gib"] > 0 and row["step_seconds"] > 0 for row in steps["memory_vit_b16"]["modes"])
    assert [row["mode"] for row in steps["memory_vit_l14"]["modes"]] == ["in-backbone-adapter", "madapter-cached"]
    tests = steps["cuda_tests"]
    assert tests["tests"] >= 2 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    rates = steps["extract"]["clips_per_second"]
    assert all(rates[k] > 0 for k in ("decode_only", "model_only", "full"))
    assert steps["extract"]["bound_by"] in ("decode_only", "model_only")
    train = steps["train_streamed"]
    assert len(train["clips_per_second_by_epoch"]) == 3 and train["clips_per_second_after_first_epoch"] > 0
    assert train["gpu_utilisation"]["source"].startswith("none")
    assert set(steps["sweep"]["by_k"]) == {"2"}
    assert not (tmp_path / "work").exists()  # videos and stores are removed; results and logs stay
    assert (tmp_path / "logs" / "train_streamed.log").exists()
