"""`mad bench extract` and `mad bench scaling` on a tiny model: they run, and their figures hang together."""

from __future__ import annotations

import json
import warnings

import pytest

from tests.helpers import TINY_MODEL

warnings.filterwarnings("ignore", message=".*random weights.*")


pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # pytest -m 'not slow' leaves these out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from mad.synthetic import make_demo_videos

    root = tmp_path_factory.mktemp("bench") / "videos"
    return make_demo_videos(root, videos_per_class=1, val_per_class=0, num_frames=16, size=64)["train"]


def test_bench_extract_reports_rates_and_bounds(videos, tmp_path):
    from mad.bench.extract import bench_extract

    # 6 videos, limit 8: the list repeats; 2 runs side by side
    r = bench_extract(str(videos), model=TINY_MODEL, layers="2,4", frames=4, limit=8, batch_size=2, workers=1,
                      device="cpu", precision="fp32", out=str(tmp_path), repeats=2)
    assert r["settings"]["clips"] == 8 and len(r["runs"]) == 2
    for run in r["runs"]:
        for key in ("decode_clips_per_s", "model_clips_per_s", "full_clips_per_s", "cpu_time_bound_clips_per_s",
                    "full_after_first_batch_clips_per_s"):
            assert run[key] > 0
        # the CPU-time bound is cores / (CPU-seconds of decoding + of the model, per clip)
        per_clip = run["decode_cpu_seconds_per_clip"] + run["model_cpu_seconds_per_clip"]
        assert run["cpu_time_bound_clips_per_s"] == pytest.approx(r["machine"]["cores"] / per_clip)
        assert run["full_over_model_only"] == pytest.approx(run["full_clips_per_s"] / run["model_clips_per_s"])
    spread = r["full_over_cpu_time_bound"]
    assert spread["min"] == min(run["full_over_cpu_time_bound"] for run in r["runs"]) <= spread["max"]
    assert r["short_vs_long"]["curve"]
    saved = json.loads((tmp_path / "extract_cpu_mad-tiny-vit.json").read_text())
    assert saved["full_clips_per_s"] == r["full_clips_per_s"]


def test_bench_scaling_runs_one_and_two_processes(videos, tmp_path):
    from mad.bench.extract import bench_scaling

    r = bench_scaling(str(videos), model=TINY_MODEL, layers="2,4", frames=4, limit=4, processes=2,
                      precision="fp32", out=str(tmp_path))
    assert set(r["seconds"]) == {"1", "2"} and all(s > 0 for s in r["seconds"].values())
    assert r["speedup"] == pytest.approx(r["seconds"]["1"] / r["seconds"]["2"])
    assert (tmp_path / "extract_scaling_cpu_mad-tiny-vit.json").exists()


def test_bench_scaling_names_a_failed_extraction(videos, tmp_path):
    from mad.bench.extract import BenchExtractError, bench_scaling

    with pytest.raises(BenchExtractError, match="failed: .*layer"):
        bench_scaling(str(videos), model=TINY_MODEL, layers="2,9", frames=4, limit=2, precision="fp32")
