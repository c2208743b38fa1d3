"""Scoring and labelling rules with hand-made inputs: exact metrics, multi-view, unlabelled videos, label files."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mad.adapt.evaluate import accuracy, evaluate, predict_probs
from mad.adapt.train import TrainConfig, train
from mad.cache.dataset import open_tokens
from mad.cache.store import Store
from mad.errors import MadError
from mad.extract.run import extract
from mad.extract.videos import find_videos
from tests.helpers import extract_config
from tests.helpers.cache import make_cache


def test_accuracy_of_hand_made_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0, 0.0],   # label 0: top-1 right
                          [0.1, 0.2, 0.3, 0.4, 0.0, 0.0],   # label 0: 4th of 6 -> top-5 right only
                          [0.0, 0.05, 0.1, 0.15, 0.3, 0.4],  # label 0: last of 6 -> wrong even at top-5
                          [0.1, 0.8, 0.1, 0.0, 0.0, 0.0]])  # label 1: right
    result = accuracy(probs, torch.tensor([0, 0, 0, 1]))
    assert result["acc/top1"] == pytest.approx(2 / 4)
    assert result["acc/top5"] == pytest.approx(3 / 4)
    assert result["acc/mean1"] == pytest.approx((1 / 3 + 1) / 2)  # mean of per-class recall (classes present)


@pytest.mark.slow
def test_multi_view_is_the_mean_of_softmaxes_and_unlabelled_videos_are_not_scored(tmp_path):
    make_cache(tmp_path / "train", videos_per_class=8)
    cache = make_cache(tmp_path / "val", videos_per_class=4, clips=2, seed=3, unlabelled=(1, 2))
    train(TrainConfig(cache=str(tmp_path / "train"), out=str(tmp_path / "run"), epochs=1, width=16, heads=2,
                      workers=0), quiet=True)
    result = evaluate(tmp_path / "run", tmp_path / "val", device="cpu", progress=False)
    assert result["videos"] == 6 and result["views"] == 2  # 8 videos, 2 unlabelled: left out, not counted wrong

    from mad.adapt.checkpoint import load_model

    model, info = load_model(tmp_path / "run" / "model.safetensors")
    data = open_tokens(cache, "yes", progress=False)
    labels = torch.from_numpy(cache.labels()[[0, 3, 4, 5, 6, 7]].astype(np.int64))
    per_view = []
    with torch.no_grad():
        for view in range(2):  # each view on its own, by hand
            levels = [array[:, view] for array in data.arrays]  # [6, T, N, D]
            per_view.append(model(levels).softmax(dim=-1))
    assert result["single_view"] == pytest.approx(accuracy(per_view[0], labels))
    assert result["multi_view"] == pytest.approx(accuracy((per_view[0] + per_view[1]) / 2, labels))
    assert torch.allclose(predict_probs(model, data, 4, torch.device("cpu"), all_views=True, arch=info["branch"].arch),
                          torch.stack(per_view, dim=1), atol=1e-6)


def test_eval_refuses_a_cache_with_other_class_names(tmp_path):
    make_cache(tmp_path / "train", videos_per_class=4)
    train(TrainConfig(cache=str(tmp_path / "train"), out=str(tmp_path / "run"), epochs=1, width=16, heads=2,
                      workers=0), quiet=True)
    make_cache(tmp_path / "other", videos_per_class=2, task="appearance")  # same tokens, other class names
    with pytest.raises(MadError, match="other: class names differ"):
        evaluate(tmp_path / "run", tmp_path / "other", device="cpu", progress=False)


def _touch_videos(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def test_labels_from_an_mmaction2_list_and_csv_files(tmp_path):
    root = _touch_videos(tmp_path / "videos", ["a/1.mp4", "b/2.mp4", "c.mp4"])
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("b/2.mp4 1\r\n./a/1.mp4 0 \r\n\r\n")  # no comments in this format
    (lists / "label_map.txt").write_text("jumping\nrunning\n")
    found = find_videos(root, lists / "train.txt")
    assert (found.paths, found.labels, found.class_names) == (["a/1.mp4", "b/2.mp4"], [0, 1], ["jumping", "running"])

    (tmp_path / "names.csv").write_text("path,label\nc.mp4,walking\na/1.mp4,jumping\nb/2.mp4,\n")
    found = find_videos(root, tmp_path / "names.csv")  # names: sorted into numbers; empty = unlabelled
    assert (found.paths, found.labels, found.class_names) == (["a/1.mp4", "b/2.mp4", "c.mp4"], [0, -1, 1],
                                                            ["jumping", "walking"])
    (tmp_path / "numbers.csv").write_text("path,label\nc.mp4,2\na/1.mp4,0\n")
    found = find_videos(root, tmp_path / "numbers.csv")
    assert (found.labels, found.class_names) == ([0, 2], ["0", "1", "2"])

    (lists / "bad.txt").write_text("a/1.mp4 zero\n")
    with pytest.raises(MadError, match=r"bad.txt:1: expected 'path label' with an integer label"):
        find_videos(root, lists / "bad.txt")
    (lists / "label_map.txt").write_text("jumping\n")
    with pytest.raises(MadError, match="label 1 has no name"):
        find_videos(root, lists / "train.txt")


def test_grid_downsample_at_extraction_averages_the_patch_grid(tmp_path):
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "demo", videos_per_class=1, val_per_class=0, num_frames=12, size=64)["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract(extract_config(videos, tmp_path / "full"))
        extract(extract_config(videos, tmp_path / "small", grid_downsample=2))
    full, small = Store.open(tmp_path / "full"), Store.open(tmp_path / "small")
    assert small.manifest.tokens == 1 + 2 * 2 and small.manifest.grid_downsample == 2  # the tiny ViT's 4x4 grid
    for layer in full.layers:
        tokens = full.read_layer(layer).astype(np.float32)  # [V, views, T, 17, D]
        grid = tokens[..., 1:, :].reshape(*tokens.shape[:3], 2, 2, 2, 2, -1)  # [.., y, dy, x, dx, D]
        expected = grid.mean(axis=(4, 6)).reshape(*tokens.shape[:3], 4, -1)  # cells, row-major
        stored = small.read_layer(layer).astype(np.float32)
        assert np.allclose(stored[..., 0, :], tokens[..., 0, :], atol=1e-2)  # CLS as it is
        assert np.allclose(stored[..., 1:, :], expected, atol=2e-2)  # each float16-rounded
