"""`mad bench memory` on a tiny backbone: the four modes' peak memory comes out in the expected order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mad.bench.memory import MODES, find_max_batch, run_benchmark

TINY = Path(__file__).parent / "configs" / "mad-tiny-vit.json"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """All four modes, each in its own process, on the tiny ViT widened to 256 channels.

    Why wider: at width 64 the backbone's weights (~0.5 MB) and its no_grad forward are
    within the noise of a process's RSS, so "online > cached" would be luck. At width
    256 with 16 clips x 8 frames the gaps are 10-50 MB, measured reproducible to 0.3 MB.
    """
    root = tmp_path_factory.mktemp("bench")
    config = json.loads(TINY.read_text())
    config["vision_cfg"].update(width=256, head_width=64)
    model = root / "mad-tiny-vit-w256.json"
    model.write_text(json.dumps(config))
    return run_benchmark(model=str(model), frames=8, batch=16, layers="2,3,4", device="cpu", precision="bf16",
                         steps=2, out=root / "results", classes=10, branch_width=24, threads=1, quiet=True)


def test_peak_memory_order(report):
    peak = {row["mode"]: row["peak_bytes"] for row in report["modes"]}
    assert list(peak) == list(MODES)
    assert peak["full-finetune"] >= peak["in-backbone-adapter"] > peak["madapter-online"] > peak["madapter-cached"]
    # clear gaps, not page-level noise
    assert peak["in-backbone-adapter"] - peak["madapter-online"] > 20 * 2**20
    assert peak["madapter-online"] - peak["madapter-cached"] > 4 * 2**20


def test_cached_mode_holds_no_backbone(report):
    rows = {row["mode"]: row for row in report["modes"]}
    cached = rows["madapter-cached"]
    assert cached["backbone_parameters"] == 0 and cached["open_clip_imported"] is False
    branch = rows["madapter-online"]["trainable_parameters"]
    assert cached["total_parameters"] == cached["trainable_parameters"] == branch
    assert rows["in-backbone-adapter"]["backbone_parameters"] == rows["full-finetune"]["backbone_parameters"] > 0
    assert rows["full-finetune"]["trainable_parameters"] == rows["full-finetune"]["total_parameters"]


def test_report_files(report):
    saved = json.loads(Path(report["files"]["json"]).read_text())
    assert Path(report["files"]["png"]).stat().st_size > 0
    assert Path(report["files"]["json"]).name == "memory_cpu_mad-tiny-vit-w256.json"
    assert saved["machine"]["device"] == "cpu" and saved["versions"]["torch"] and saved["command"] and saved["date"]
    rows = {row["mode"]: row for row in saved["modes"]}
    assert rows["in-backbone-adapter"]["peak_vs_reference"] == 1.0
    assert all(row["step_seconds_median"] > 0 and len(row["step_seconds"]) == 2 for row in saved["modes"])


@pytest.mark.parametrize("largest", [1, 5, 11, 16, 300])
def test_budget_search_finds_the_largest_fitting_batch(largest):
    seen = []

    def probe(batch):
        seen.append(batch)
        return {"fits": batch <= largest}

    found = find_max_batch(probe)
    assert found["limited_by"] == "budget"
    assert found["max_batch"] <= largest < found["first_failing_batch"]
    assert found["first_failing_batch"] - found["max_batch"] <= max(1, found["max_batch"] // 16)
    assert len(seen) <= 16 and len(seen) == len(set(seen))


def test_budget_search_is_bounded():
    found = find_max_batch(lambda batch: {"fits": True}, max_batch=64)
    assert found["max_batch"] == 64 and found["limited_by"] == "batch cap"
    found = find_max_batch(lambda batch: {"timed_out": True} if batch > 4 else {"fits": True})
    assert found["max_batch"] == 4 and found["limited_by"] == "probe time"
