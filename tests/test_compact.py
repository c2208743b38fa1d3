"""Compact stores: the 8-bit values on tokens with outliers, records, and compact vs full stores end to end."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mad.adapt.families import family
from mad.adapt.train import TrainConfig, train
from mad.cache import compact
from mad.cache.dataset import open_tokens
from mad.cache.inputs import branch_inputs, normalized_cells
from mad.cache.store import DONE, Store
from mad.errors import MadError
from mad.extract.run import extract
from tests.helpers import extract_config


def outlier_tokens(seed=0, frames=4, side=14, width=256):
    """Tokens as a pre-trained CLIP ViT has them: two channels ~80x the others in every token (fixed sign),
    and three patch tokens per frame with ~30x the norm of the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, frames, 1 + side * side, width, generator=g)
    x[..., 7] = 80 + torch.randn(x.shape[:-1], generator=g)
    x[..., width // 2 + 3] = -80 + torch.randn(x.shape[:-1], generator=g)
    heavy = torch.randperm(side * side, generator=g)[:3] + 1
    x[:, :, heavy] *= 30
    return x, [7, width // 2 + 3]


def cosines(a, b, channels=None):
    if channels is not None:
        a, b = a[..., channels], b[..., channels]
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def test_8bit_cells_keep_every_channel_of_tokens_with_outliers():
    x, outliers = outlier_tokens()
    others = [c for c in range(x.shape[-1]) if c not in outliers]
    cells = normalized_cells(x, 2).float()  # what a compact store holds: LayerNorm, 2x2 cells
    restored = compact.dequantize_cells(*compact.quantize_cells(cells)).float()
    assert cosines(restored, cells).min() >= 0.999
    assert cosines(restored, cells, others).min() >= 0.999  # the outlier channels do not eat the others' range
    # a scale per token only (no channel scale) loses the other channels: what the channel scale is for
    scale = cells.abs().amax(dim=-1, keepdim=True) / 127
    per_token = torch.round(cells / scale).clamp(-127, 127) * scale
    assert cosines(per_token, cells, others).min() < 0.99


def test_similarity_rows_and_records_round_trip():
    x, _ = outlier_tokens(frames=3, side=6, width=64)
    levels = [x, x * 0.5 + 1]
    inputs = branch_inputs(levels, cell=2, radius=1, groups=4)
    layout = compact.record_layout(2, 3, 1 + 3 * 3, 36, 64, 4 * 9)
    records = compact.encode(inputs, layout)
    assert records.shape == (1, compact.record_bytes(layout)) and records.dtype == torch.uint8
    decoded = compact.decode(records, layout, num_levels=2, side=6, groups=4)
    assert decoded.similarity.shape == inputs.similarity.shape
    assert (decoded.similarity - inputs.similarity).abs().max() <= 2 / 255 / 2 + 1e-3  # half a step of [-1, 1]
    for k in range(2):
        assert cosines(decoded.cells[k], inputs.cells[k]).min() >= 0.999
        assert torch.equal(decoded.cls[k], inputs.cls[k].half().float())
        assert torch.equal(decoded.token_mean[k], inputs.token_mean[k].half().float())


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same demo videos extracted twice with the tiny ViT (4x4 grid): full and compact (cells of 2)."""
    from mad.synthetic import make_demo_videos

    root = tmp_path_factory.mktemp("compact")
    videos = make_demo_videos(root / "videos", videos_per_class=6, val_per_class=3, num_frames=12, size=64)
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for split in ("train", "val"):
            for mode in ("full", "compact"):
                out = root / f"{mode}-{split}"
                extract(extract_config(videos[split], out, store=mode, cell_size="2", shard_size=8))
                paths[mode, split] = str(out)
    return paths


@pytest.mark.slow
def test_compact_store_holds_a_sixth_or_less_and_says_what_it_fixed(stores):
    full, small = Store.open(stores["full", "train"]), Store.open(stores["compact", "train"])
    assert small.manifest.storage == "compact" and small.manifest.compact["cell_size"] == 2
    assert small.manifest.compact["correlation"] == 1 and list(small.data_arrays) == ["records"]
    assert (small.status() == DONE).all() and small.paths() == full.paths()
    assert small.data_arrays["records"][0] == (1, small.manifest.compact["record_bytes"])
    assert small.verify() == []
    # ViT-B/16, T=8, layers 4,8,12: 7x7 cells, correlation radius 1 in 4 groups (the shapes alone decide it)
    vit_b = compact.record_bytes(compact.record_layout(3, 8, 1 + 7 * 7, 196, 768, 4 * 9))
    assert vit_b <= 1.2e6 and vit_b * 6 <= 3 * 8 * 197 * 768 * 2


@pytest.mark.slow
def test_training_from_compact_equals_full_up_to_8_bits(stores, tmp_path):
    common = dict(epochs=3, width=32, heads=2, batch_size=8, workers=0, in_ram="yes", seed=0, cell_size="2")
    run = tmp_path / "full"
    train(TrainConfig(cache=stores["full", "train"], val=stores["full", "val"], out=str(run), **common), quiet=True)
    from mad.adapt.checkpoint import load_model

    model, _ = load_model(run / "model.safetensors")
    full = open_tokens(Store.open(stores["full", "val"]), "yes", progress=False)
    small = open_tokens(Store.open(stores["compact", "val"]), "yes", progress=False)
    with torch.no_grad():
        (a, labels, _, _), = list(full.eval_batches(64))
        (b, _, _, _), = list(small.eval_batches(64))
        layers = family("madapter")  # full levels, or compact records decoded
        logits_full = model(layers.inputs(full.to_device(a, "cpu"), full.manifest))
        logits_compact = model(layers.inputs(small.to_device(b, "cpu"), small.manifest))
    assert torch.allclose(logits_full, logits_compact, atol=0.05 * logits_full.abs().max().item())
    assert (logits_full.argmax(1) == logits_compact.argmax(1)).float().mean() >= 0.99
    # and a run trained on the compact store itself trains the same model, to within 8-bit noise
    summary = train(TrainConfig(cache=stores["compact", "train"], val=stores["compact", "val"],
                                out=str(tmp_path / "compact"), **common), quiet=True)
    full_summary = __import__("json").loads((run / "summary.json").read_text())
    assert abs(summary["train/loss"] - full_summary["train/loss"]) < 0.05


@pytest.mark.slow
def test_compact_store_refuses_branch_settings_it_cannot_serve(stores, tmp_path):
    base = dict(cache=stores["compact", "train"], epochs=1, width=32, heads=2, batch_size=8, workers=0)
    with pytest.raises(MadError, match="cells of 2x2 patches cannot serve --cell-size 1"):
        train(TrainConfig(out=str(tmp_path / "a"), cell_size="1", **base), quiet=True)
    with pytest.raises(MadError, match="correlation radius 1 cannot serve --correlation 2"):
        train(TrainConfig(out=str(tmp_path / "b"), correlation=2, **base), quiet=True)
    with pytest.raises(MadError, match="does not match the training cache .* on --store: full here, compact there$"):
        train(TrainConfig(out=str(tmp_path / "c"), val=stores["full", "val"], **base), quiet=True)
    for arch, correlation in (("madapter", 0), ("meanpool", 1), ("linear", 1)):  # served from the stored inputs
        summary = train(TrainConfig(out=str(tmp_path / arch), arch=arch, correlation=correlation, **base), quiet=True)
        assert np.isfinite(summary["train/loss"])


def test_compact_extraction_resumes_bitwise_and_refuses_other_settings(stores, tmp_path):
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "v", videos_per_class=2, val_per_class=0, num_frames=12, size=64)["train"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract(extract_config(videos, tmp_path / "whole", store="compact"))
        extract(extract_config(videos, tmp_path / "parts", store="compact", limit=5))
        assert Store.open(tmp_path / "parts").counts()["pending"] == 7
        extract(extract_config(videos, tmp_path / "parts", store="compact"))
        with pytest.raises(MadError, match=r"different settings \(--correlation: 1 in the store, 2 given\); use"):
            extract(extract_config(videos, tmp_path / "parts", store="compact", correlation=2))
        with pytest.raises(MadError, match=r"different settings \(--store: compact in the store, full given\); use"):
            extract(extract_config(videos, tmp_path / "parts", store="full"))
    whole, parts = Store.open(tmp_path / "whole"), Store.open(tmp_path / "parts")
    assert np.array_equal(whole.read("records"), parts.read("records"))
    assert (parts.status() == DONE).all()


@pytest.mark.slow
def test_eval_and_predict_from_a_run_trained_on_a_compact_store(stores, tmp_path):
    from mad.adapt.evaluate import evaluate
    from mad.predict import predict_videos

    run = tmp_path / "run"
    train(TrainConfig(cache=stores["compact", "train"], val=stores["compact", "val"], out=str(run), epochs=2,
                      width=32, heads=2, batch_size=8, workers=0), quiet=True)
    result = evaluate(run, stores["compact", "val"], device="cpu", progress=False)
    assert result["videos"] == 18 and 0 <= result["multi_view"]["acc/top1"] <= 1
    with pytest.raises(MadError, match="does not match the training cache of .* on --store: full here, compact there$"):
        evaluate(run, stores["full", "val"], device="cpu", progress=False)
    store = Store.open(stores["compact", "val"])
    video = str(Path(store.manifest.videos_root) / store.paths()[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (predicted,) = predict_videos([video], str(run), top=2, device="cpu")
    assert len(predicted["top"]) == 2 and predicted["top"][0][0] in store.class_names


def test_plan_predicts_the_bytes_of_both_storage_modes(stores):
    from mad.plan import PlanConfig, plan

    store = Store.open(stores["compact", "val"])
    videos = store.manifest.videos_root
    result = plan(PlanConfig(videos=videos, model=store.manifest.model, layers="2,4", cell_size="2", probe=1,
                             device="cpu", precision="fp32"))
    split = result["splits"]["train"]
    assert split["num_videos"] == store.num_videos and result["probe"]["decode_per_clip"] > 0
    for mode in ("full", "compact"):
        real = sum(Store.open(stores[mode, "val"]).bytes_on_disk().values())
        planned = split["modes"][mode]["read_bytes_per_epoch"]  # the data arrays: one view per video here
        assert abs(planned - real) <= 0.1 * real, (mode, planned, real)
