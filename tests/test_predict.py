"""`mad predict` chains decode -> backbone -> branch exactly as extraction + training did."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.helpers import extract_config
from mad.adapt.checkpoint import load_model
from mad.errors import MadError
from mad.predict import predict_videos
from mad.adapt.train import TrainConfig, train
from mad.cache.store import Store
from mad.extract.run import extract

warnings.filterwarnings("ignore", message=".*random weights.*")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from mad.synthetic import make_demo_videos

    tmp = tmp_path_factory.mktemp("predict")
    videos = make_demo_videos(tmp / "videos", videos_per_class=2, val_per_class=0, num_frames=12, size=64)["train"]
    extract(extract_config(videos, tmp / "cache", precision="bf16"))
    train(TrainConfig(cache=str(tmp / "cache"), arch="madapter", width=32, heads=2, epochs=2, batch_size=4,
                      out=str(tmp / "run"), device="cpu"), quiet=True)
    return tmp, videos


def test_predict_matches_the_branch_on_cached_tokens(trained_run):
    tmp, videos = trained_run
    store = Store.open(tmp / "cache")
    branch, info = load_model(tmp / "run" / "model.safetensors")
    paths = store.paths()[:3]
    results = predict_videos([str(videos / p) for p in paths], str(tmp / "run"), top=6)
    for v, (path, result) in enumerate(zip(paths, results)):
        levels = [torch.from_numpy(store.read_layer(layer, v).astype(np.float32)) for layer in store.layers]
        with torch.no_grad():
            expected = branch(levels).softmax(-1)[0]  # one view: [C]
        got = dict(result["top"])
        assert len(got) == 6
        for c, name in enumerate(info["class_names"]):
            assert abs(got[name] - expected[c].item()) < 1e-4, (path, name)


@pytest.mark.slow
@pytest.mark.e2e
def test_predict_cli_reports_bad_files_and_refuses_a_missing_run(trained_run, tmp_path):
    tmp, videos = trained_run
    good = str(next(iter(sorted(videos.rglob("*.mp4")))))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"nope")
    result = subprocess.run([sys.executable, "-m", "mad", "predict", good, str(bad), "--run", str(tmp / "run")],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.startswith(good + ": ") and result.stdout.count(",") == 4  # top-5
    assert f"{bad}: error: not a video file" in result.stderr
    with pytest.raises(MadError, match="no such model file"):
        predict_videos([good], str(tmp_path / "nothing"))


@pytest.mark.slow
def test_predict_averages_the_softmax_over_every_view(trained_run, tmp_path):
    """A run trained on a 2 clips x 3 crops cache: predict decodes the same 6 views and averages their softmax."""
    _, videos = trained_run
    extract(extract_config(videos, tmp_path / "cache", precision="bf16", clips=2, crops=3))
    train(TrainConfig(cache=str(tmp_path / "cache"), width=32, heads=2, epochs=1, batch_size=4,
                      out=str(tmp_path / "run"), device="cpu"), quiet=True)
    store = Store.open(tmp_path / "cache")
    branch, info = load_model(tmp_path / "run" / "model.safetensors")
    (result,) = predict_videos([str(videos / store.paths()[0])], str(tmp_path / "run"), top=6)
    levels = [torch.from_numpy(store.read_layer(layer, 0).astype(np.float32)) for layer in store.layers]
    assert levels[0].shape[0] == 6  # views
    with torch.no_grad():
        per_view = branch(levels).softmax(-1)  # [6, C]
    assert not torch.allclose(per_view[0], per_view[3], atol=1e-4)  # the clips differ: averaging matters
    got = dict(result["top"])
    for c, name in enumerate(info["class_names"]):
        assert abs(got[name] - per_view.mean(dim=0)[c].item()) < 1e-4, name
