"""Runs written before TrainConfig nested its branch (mad 0.1.0: tests/fixtures/old-run, made by its
make_old_run.py) still open, resume, train, evaluate and predict; older setting names read through the one rename
table, and an unknown one is refused in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mad.adapt.config import TrainConfig, config_from_run, resolve
from mad.cache.manifest import Manifest
from mad.errors import MadError
from tests.helpers import extract_config

warnings.filterwarnings("ignore", message=".*random weights.*")

FIXTURE = Path(__file__).parent / "fixtures" / "old-run"
WRITTEN_AT = "/tmp/mad-old-run"  # where make_old_run.py wrote it: moved to each test's folder
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "last.pt")


def old_run(root: Path, config: str = "config.json", edit=None) -> Path:
    """The fixture run copied to root/run, its paths moved to `root`; `edit(saved)` changes its config.json."""
    run = root / "run"
    run.mkdir(parents=True)
    for name in RUN_FILES[1:]:
        shutil.copy(FIXTURE / name, run / name)
    saved = json.loads((FIXTURE / config).read_text().replace(WRITTEN_AT, str(root)))
    if edit:
        edit(saved)
    (run / "config.json").write_text(json.dumps(saved))
    return run


def test_an_old_config_reads_its_resolved_branch_not_the_flat_settings_beside_it(tmp_path):
    run = old_run(tmp_path)
    cfg = config_from_run(run)
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["cell_size"] == "auto" and "width" in saved["train"]  # the old layout: flat, unresolved
    assert cfg.model.to_dict() == saved["model"] and (cfg.width, cfg.cell_size) == (16, 1)
    assert cfg.epochs == 2 and cfg.cache == str(tmp_path / "cache")


def test_an_old_evl_config_resolves_to_the_branch_it_trained(tmp_path):
    """EVL's preset saved width, depth, heads 0 ("from the store") in the old flat settings: resuming resolves the
    saved branch again and gets the same one, so the resume is not refused as changed."""
    run = old_run(tmp_path, "evl-config.json")
    saved = json.loads((run / "config.json").read_text())
    assert (saved["train"]["width"], saved["model"]["width"]) == (0, 64)
    cfg = config_from_run(run)
    again, branch = resolve(dataclasses.replace(cfg, resume=True), Manifest.from_dict(saved["cache_manifest"]), 6)
    assert branch.to_dict() == saved["model"] and again.model == cfg.model


def test_older_setting_names_are_renamed_and_unknown_ones_refused(tmp_path):
    def older(saved):  # mad < 0.1 wrote grid_pool for cell_size, in the settings and in the branch
        saved["train"]["grid_pool"] = saved["train"].pop("cell_size")
        saved["model"]["grid_pool"] = saved["model"].pop("cell_size")

    assert config_from_run(old_run(tmp_path / "a", edit=older)).cell_size == 1
    with pytest.raises(MadError, match=r"config.json: unknown settings warp_speed \(written by a newer mad\?\)$"):
        config_from_run(old_run(tmp_path / "b", edit=lambda saved: saved["train"].update(warp_speed=9)))
    with pytest.raises(MadError, match=r"config.json: model: unknown settings warp_speed"):
        config_from_run(old_run(tmp_path / "c", edit=lambda saved: saved["model"].update(warp_speed=9)))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The store make_old_run.py trained on, made again (the same videos, model and settings: the same shapes)."""
    from mad.adapt.families import store_needs
    from mad.extract.run import extract
    from mad.synthetic import make_demo_videos

    root = tmp_path_factory.mktemp("old")
    videos = make_demo_videos(root / "videos", videos_per_class=1, val_per_class=0, num_frames=12, size=64)["train"]
    extract(extract_config(videos, root / "cache"), store_needs("madapter,evl", 2))
    return root, videos


@pytest.mark.slow
def test_an_old_run_resumes_evaluates_and_predicts(store, tmp_path):
    from mad.adapt.checkpoint import load_model
    from mad.adapt.evaluate import evaluate
    from mad.cache.store import Store
    from mad.cli import app
    from mad.predict import predict_videos

    root, videos = store
    shutil.copytree(root / "cache", tmp_path / "cache")
    run = old_run(tmp_path)
    runner = CliRunner()
    refused = runner.invoke(app, ["train", "--resume", "--out", str(run), "--width", "32"])
    assert refused.exit_code == 2 and "cannot resume with different settings (--width 16 -> 32)" in refused.output
    result = runner.invoke(app, ["train", "--resume", "--out", str(run)])  # its settings from the old config.json
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "after epoch 1/2" in result.output
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2] and (run / "summary.json").is_file()

    scores = evaluate(run, str(tmp_path / "cache"), progress=False)
    assert scores["videos"] == 6
    model, info = load_model(run / "model.safetensors")
    cache = Store.open(tmp_path / "cache")
    (predicted,) = predict_videos([str(videos / cache.paths()[0])], str(run), top=6)
    levels = [torch.from_numpy(cache.read_layer(n, 0).astype(np.float32)) for n in cache.layers]
    with torch.no_grad():
        expected = model(levels).softmax(-1)[0]
    for c, name in enumerate(info["class_names"]):
        assert abs(dict(predicted["top"])[name] - expected[c].item()) < 1e-4, name
