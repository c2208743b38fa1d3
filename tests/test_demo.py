"""`mad demo`, the embedded default, end to end: the M-adapter must learn what a static model cannot."""

from __future__ import annotations

import json

import pytest

from mad.demo import DemoConfig, run_demo

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # pytest -m 'not slow' leaves these out


def test_demo_madapter_learns_temporal_order_that_static_models_cannot(tmp_path):
    # The shipped defaults (videos, backbone, epochs, compact store), not a reduced copy: about 2 min on 2 idle CPU cores.
    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), progress=False))
    results = report["results"]
    assert results["madapter"]["val_top1_last"] >= 0.9, report
    # Every class pair is an exact time reversal, so a static model's ceiling is 1/2; the pairs' background
    # tints let it reach about that (at chance, 1/6, it would show nothing about time).
    for static in ("meanpool", "linear"):
        assert 0.35 <= results[static]["val_top1_last"] <= 0.65, report
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["results"] == report["results"]
    for arch in ("madapter", "meanpool", "linear"):
        assert (tmp_path / "demo" / "runs" / arch / "model.safetensors").is_file()
    # the demo ViT's 14x14 grid is pooled to 7x7 as a ViT-B/16's is: the demo trains the default branch
    config = json.loads((tmp_path / "demo" / "runs" / "madapter" / "config.json").read_text())
    assert config["cache_manifest"]["tokens"] == 1 + 14 * 14 and config["model"]["cell_size"] == 2
