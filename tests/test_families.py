"""Every registered branch family, through the same path: build, a training step, checkpoint round trip, eval,
predict. A family registered from this file (`toy`) is covered like the others and trains through the CLI:
adding a family is its file and its registration, nothing else."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from mad.adapt.branch import FAMILIES, BranchConfig, Family, register
from mad.adapt.checkpoint import load_model, save_model
from mad.adapt.families import family, names, store_needs, stored_names
from mad.cache.store import Store
from tests.helpers import extract_config

warnings.filterwarnings("ignore", message=".*random weights.*")


class ToyBranch(nn.Module):
    """The deepest level's CLS averaged over time, then a linear head."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.head = nn.Linear(cfg.in_width, cfg.num_classes)

    def forward(self, levels):
        return self.head(levels[-1][:, :, 0].float().mean(dim=1))


class ToyFamily(Family):
    name = "toy"
    description = "a test's family: the deepest CLS averaged over time, linear head"
    model = ToyBranch
    preset = dict(lr=3e-3)


ARCHS = [*names(), "toy"]  # every family mad registers, and this file's


@pytest.fixture(autouse=True, scope="module")
def toy_registered():
    """`toy` is registered while this file's tests run, and only then (other files see mad's own registry)."""
    register(ToyFamily())
    yield
    FAMILIES.pop("toy")


SMALL = dict(width=16, heads=2)  # for the families that take them; a preset's 0s (EVL) win where it sets them


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Demo videos (6 classes) by the tiny ViT (4 blocks) into full train and val stores serving every family."""
    from mad.extract.run import extract
    from mad.synthetic import make_demo_videos

    tmp = tmp_path_factory.mktemp("families")
    videos = make_demo_videos(tmp / "videos", videos_per_class=2, val_per_class=1, num_frames=12, size=64)
    needs = store_needs(",".join(stored_names()), 2)  # EVL: the last 2 blocks
    for split in ("train", "val"):
        extract(extract_config(videos[split], tmp / split, store="full"), needs)
    return tmp, videos


def test_registry_refuses_unknown_arch_naming_the_registered_ones():
    from mad.errors import MadError

    with pytest.raises(MadError, match="--arch 'resnet': not a registered branch family .*madapter.*evl.*toy"):
        family("resnet")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_every_family_trains_round_trips_evaluates_and_predicts(arch, stores, tmp_path):
    from mad.adapt.evaluate import evaluate
    from mad.adapt.train import TrainConfig, train
    from mad.predict import predict_videos

    tmp, videos = stores
    settings = dict(cache=str(tmp / "train"), val=str(tmp / "val"), epochs=1, batch_size=4, workers=0,
                    in_ram="yes", device="cpu", out=str(tmp_path / "run"))
    summary = train(TrainConfig(arch=arch, **settings, **SMALL), quiet=True, given=set(settings))
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["arch"] == arch and summary["parameters"] == config["parameters"] > 0
    for name, value in family(arch).preset.items():  # settings not given took the family's preset
        assert config["train"].get(name, config["model"].get(name)) == value or value == 0, name
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]

    # checkpoint round trip: saved again and loaded, the same function
    model, info = load_model(run / "model.safetensors")
    assert info["branch"].arch == arch
    save_model(model, tmp_path / "again.safetensors", info["branch"], {k: v for k, v in info.items()
                                                                      if k != "branch"})
    again, _ = load_model(tmp_path / "again.safetensors")
    store = Store.open(tmp / "val")
    levels = [torch.from_numpy(store.read_layer(n, 0).astype(np.float32)) for n in family(arch).levels(store.manifest)]
    with torch.no_grad():
        expected = model(levels).softmax(-1)[0]
        assert torch.equal(again(levels).softmax(-1)[0], expected)

    # eval scores the saved model as training's validation did (first view: the same number)
    scores = evaluate(run, str(tmp / "val"), progress=False)
    assert scores["videos"] == 6 and scores["single_view"]["acc/top1"] == pytest.approx(summary["val/acc/top1"])

    # predict: decode -> backbone (the levels the family reads) -> branch equals the branch on the cached levels
    (predicted,) = predict_videos([str(videos["val"] / store.paths()[0])], str(run), top=6)
    for c, name in enumerate(info["class_names"]):
        assert abs(dict(predicted["top"])[name] - expected[c].item()) < 1e-4, name


@pytest.mark.slow
def test_a_family_registered_by_a_test_trains_through_the_cli(stores, tmp_path):
    from mad.cli import app

    tmp, _ = stores
    run = tmp_path / "toy"
    result = CliRunner().invoke(app, ["train", "--cache", str(tmp / "train"), "--val", str(tmp / "val"), "--arch",
                                      "toy", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--out",
                                      str(run)])
    assert result.exit_code == 0, result.output
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 3e-3  # its preset, as no --lr was given
    assert config["parameters"] == 6 * (Store.open(tmp / "train").manifest.width + 1)  # its head, nothing else
    assert "toy: " in result.output  # the line its `describe` gives
