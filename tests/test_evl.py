"""EVL's decoder from the cache: the official parameter count, q/k parity with open_clip, the store contract,
and train / eval / sweep / predict on a store extracted with --branches madapter,evl."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import extract_config
from mad.adapt.checkpoint import load_model
from mad.adapt.evl import TemporalCrossAttention, relative_index
from mad.adapt.branch import BranchConfig, count_parameters
from mad.adapt.families import build_model, check_served, store_needs
from mad.adapt.evl_checkpoint import load_official
from mad.adapt.import_evl import import_official
from mad.adapt.sweep import sweep
from mad.adapt.config import resolve, with_preset
from mad.adapt.train import TrainConfig, train
from mad.cache.manifest import Manifest
from mad.cache.store import Store
from mad.errors import MadError
from mad.extract.run import extract

warnings.filterwarnings("ignore", message=".*random weights.*")


def official_vitb16_parameters(frames=8, side=14, layers=4, width=768, qkv=768, mlp_ratio=4.0, classes=400) -> int:
    """Trainable parameters of the official EVLTransformer (its backbone is frozen and not registered), counted
    from the definitions in OpenGVLab/efficient-video-recognition's model.py and vision_transformer.py.
    (benchmarks/evl_official.py instantiates the official modules: 33,183,376 for these defaults.)"""
    hidden = round(mlp_ratio * width)
    attention = 3 * (width * qkv + qkv) + qkv * width + width  # Attention: q_proj, k_proj, v_proj, out_proj
    mlp = width * hidden + hidden + hidden * width + width  # fc1, fc2
    decoder_layer = attention + mlp + 3 * 2 * width  # TransformerDecoderLayer: + norm1, norm2, norm3
    temporal_conv = width * 3 + width  # Conv1d(width, width, 3, groups=width)
    temporal_pos_embed = frames * width
    cross_attention = 2 * (2 * side - 1) ** 2 * width  # TemporalCrossAttention: w1, w2
    decoder = layers * (decoder_layer + temporal_conv + temporal_pos_embed + cross_attention) + width  # cls_token
    proj = 2 * width + width * classes + classes  # LayerNorm, Dropout, Linear
    return decoder + proj


def test_default_parameter_count_equals_the_official_vitb16_config():
    ours = build_model(BranchConfig(arch="evl", num_levels=5, in_width=768, num_tokens=197, num_frames=8,
                                    num_classes=400, width=0, heads=0, depth=0, dropout=0.5))
    official = official_vitb16_parameters()
    print(f"EVL ViT-B/16 8 frames 400 classes, trainable parameters: official {official:,}, ours "
          f"{count_parameters(ours):,}")
    assert official == 33_183_376  # what benchmarks/evl_official.py counts on the official modules
    assert count_parameters(ours) == official
    assert sum(b.numel() for b in ours.qk.buffers()) == 4 * (2 * 768 + 2 * 768 * 768 + 2 * 768)  # frozen, not trained


def official_cross_attention(q, k, w1, w2, side):
    """The official TemporalCrossAttention.forward, transcribed (w[idx] gathered into [P, P, C])."""
    P = side * side
    idx = torch.zeros(P, P, dtype=torch.long)  # the official construction, loop for loop
    for a in range(P):
        qi, qj = a // side, a % side
        for b in range(P):
            ki, kj = b // side, b % side
            idx[a, b] = (qi - ki + side - 1) * (side * 2 - 1) + (qj - kj + side - 1)

    def half(q, k, w):
        q, k = q[:, :, 1:], k[:, :, 1:]
        attn = torch.einsum("ntqhd,ntkhd->ntqkh", q / (q.size(-1) ** 0.5), k)
        attn = attn.softmax(dim=-2).mean(dim=-1)
        return torch.einsum("ntqk,qkc->ntqc", attn, w[idx])

    N, T, L, H, D = q.size()
    ret = torch.zeros([N, T, L, w1.size(-1)])
    ret[:, 1:, 1:, :] += half(q[:, 1:], k[:, :-1], w1)
    ret[:, :-1, 1:, :] += half(q[:, :-1], k[:, 1:], w2)
    return ret, idx


def test_temporal_cross_attention_equals_the_official_formula_values_and_gradients():
    torch.manual_seed(0)
    side, width = 3, 8
    module = TemporalCrossAttention(side, width)
    with torch.no_grad():
        module.w1.normal_()
        module.w2.normal_()
    q, k = torch.randn(2, 4, 1 + side * side, 2, 5), torch.randn(2, 4, 1 + side * side, 2, 5)
    ours = module(q, k)
    w1, w2 = module.w1.detach().clone().requires_grad_(), module.w2.detach().clone().requires_grad_()
    reference, idx = official_cross_attention(q, k, w1, w2, side)
    assert torch.equal(relative_index(side), idx)
    assert torch.allclose(ours, reference, atol=1e-5)
    assert ours[:, :, 0].abs().max() == 0  # CLS gets nothing
    grad = torch.randn_like(ours)
    (ours * grad).sum().backward()
    (reference * grad).sum().backward()
    assert torch.allclose(module.w1.grad, w1.grad, atol=1e-5) and torch.allclose(module.w2.grad, w2.grad, atol=1e-5)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Demo videos (6 classes) extracted by the tiny ViT (4 blocks) into a compact and a full store, madapter,evl."""
    from mad.synthetic import make_demo_videos

    tmp = tmp_path_factory.mktemp("evl")
    videos = make_demo_videos(tmp / "videos", videos_per_class=2, val_per_class=1, num_frames=12, size=64)
    for store in ("compact", "full"):
        extract(extract_config(videos["train"], tmp / store, store=store), store_needs("madapter,evl"))
    extract(extract_config(videos["val"], tmp / "val", store="compact"), store_needs("madapter,evl"))
    return tmp, videos


def test_recomputed_qk_equal_open_clip_attention_qk_in_value(stores):
    """The q, k the decoder reads equal, value for value, what open_clip's own attention projects on the same frames.

    The store keeps blocks 2..4 of the 4-block ViT (--evl-layers 3) and the decoder reads only the last 2 of them
    (depth 2): the store's block slice, `FrozenQK.load`'s slice and `EVL.forward`'s level slice all have to line up
    for decoder layer i to read block 3+i's q, k. Tolerance: the cached levels are float16, so q/k recomputed from
    them differ from the float32 backbone's by up to 0.2% of the largest |q| or |k| (measured: 0.03%); a q off by
    1%, scaled by 2 or taken from another block is outside it."""
    from mad.extract.backbone import load_backbone
    from mad.extract.decode import decode_clip

    tmp, videos = stores
    extract(extract_config(videos["val"], tmp / "evl3", store="full"), store_needs("madapter,evl", 3))
    store = Store.open(tmp / "evl3")
    evl = store.manifest.branches["evl"]
    assert evl["blocks"] == [2, 3, 4] and evl["levels"] == [1, 2, 3, 4]
    model = build_model(BranchConfig(arch="evl", num_levels=len(evl["levels"]), in_width=store.manifest.width,
                                     num_tokens=store.manifest.tokens, num_frames=store.manifest.frames,
                                     num_classes=6, width=64, heads=1, depth=2, dropout=0.0, qk_heads=evl["heads"],
                                     qk_eps=evl["ln_eps"])).eval()
    model.load_frozen({name: torch.from_numpy(value) for name, value in store.frozen().items()})
    read = []  # the q, k each decoder layer reads, in order
    model.qk.register_forward_hook(lambda module, args, output: read.append(output))

    backbone = load_backbone(store.manifest.model, "none", "4", precision="fp32")  # the same seeded random weights
    seen = {}
    for l, block in enumerate(backbone.visual.transformer.resblocks):
        def hook(module, args, output, l=l):  # args[0]: the attention's input, ln_1(x), [B*T, N, D]
            D = module.embed_dim
            q, k, _ = F.linear(args[0], module.in_proj_weight, module.in_proj_bias).split(D, dim=-1)
            seen[l] = (q, k)
        block.attn.register_forward_hook(hook)
    for v, path in enumerate(store.paths()[:2]):
        clip = decode_clip(str(videos["val"] / path), store.manifest.frames, size=store.manifest.image_size)
        assert np.array_equal(clip.frame_index, store.frame_index()[v])
        backbone(torch.from_numpy(clip.frames[0]))  # [T, 3, S, S]: fills `seen`
        levels = [torch.from_numpy(store.read_layer(level, v)[0].astype(np.float32))[None] for level in evl["levels"]]
        read.clear()
        with torch.no_grad():
            model(levels)
        assert len(read) == 2
        for i, (q, k) in enumerate(read):  # decoder layer i: block 3+i of the ViT (0-based 2+i)
            for ours, theirs in ((q, seen[2 + i][0]), (k, seen[2 + i][1])):
                ours = ours[0].flatten(-2)  # [T, N, D]
                tolerance = 2e-3 * theirs.abs().max().item()
                torch.testing.assert_close(ours, theirs, rtol=0, atol=tolerance, msg=lambda m: f"{path} layer {i}: {m}")


def test_store_records_what_each_family_needs_and_refuses_what_it_cannot_serve(stores, tmp_path):
    tmp, videos = stores
    compact = Store.open(tmp / "compact")
    assert list(compact.manifest.branches) == ["madapter", "evl"]
    assert set(compact.data_arrays) == {"records", "layers/0", "layers/1", "layers/2", "layers/3", "layers/4"}
    assert set(Store.open(tmp / "full").data_arrays) == {f"layers/{n}" for n in range(5)}  # --layers 2,4 in them
    # resuming with other branch families is refused (they change what the store holds)
    with pytest.raises(MadError, match="branches"):
        extract(extract_config(videos["train"], tmp / "compact", store="compact"), store_needs("madapter"))
    with pytest.raises(MadError, match="grid-downsample 1"):
        store_needs("madapter,evl", grid_downsample=2)
    with pytest.raises(MadError, match="grid-downsample 1"):  # extraction itself refuses it too
        extract(extract_config(videos["train"], tmp_path / "x", grid_downsample=2), store_needs("madapter,evl"))
    with pytest.raises(MadError, match="unknown branch family"):
        store_needs("madapter,aim")
    # a store without EVL's inputs: one line naming what to re-run
    extract(extract_config(videos["train"], tmp_path / "plain", store="compact"))
    assert Store.open(tmp_path / "plain").manifest.branches == {}  # nothing beyond --layers
    result = subprocess.run([sys.executable, "-m", "mad", "train", "--cache", str(tmp_path / "plain"), "--arch", "evl",
                             "--epochs", "1", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "holds no inputs for --arch evl" in line
    assert "extracted for --layers only" in line and "--branches evl" in line and str(videos["train"]) in line, line
    # stores made before branch families existed (no `branches` in the manifest) serve the families reading
    # --layers alone, and the same store made since (which records them) is the same store
    values = compact.manifest.to_dict()
    del values["branches"]
    old = Manifest.from_dict(values)
    assert old.branches == {} and old.differences(Manifest.from_dict({**values, "branches": {"madapter": {}}}),
                                                  ["branches"]) == []
    for arch in ("madapter", "linear"):
        check_served(arch, old, "old")
    with pytest.raises(MadError, match="old: holds no inputs for --arch evl"):
        check_served("evl", old, "old")


def test_train_eval_predict_and_sweep_evl_next_to_the_others(stores, tmp_path):
    from mad.adapt.evaluate import evaluate
    from mad.predict import predict_videos

    tmp, videos = stores
    # the CLI without --lr / --dropout / --width: EVL's defaults; a compact store serves EVL from its float16 levels
    run = tmp_path / "evl"
    result = subprocess.run([sys.executable, "-m", "mad", "train", "--cache", str(tmp / "compact"), "--val",
                             str(tmp / "val"), "--arch", "evl", "--epochs", "2", "--batch-size", "4", "--out", str(run),
                             "--device", "cpu"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["lr"] == 4e-4 and config["model"]["dropout"] == 0.5
    model_args = config["model"]
    assert (model_args["depth"], model_args["width"], model_args["heads"]) == (4, 64, 1)  # 4 blocks, D, D / 64
    assert config["parameters"] == official_vitb16_parameters(frames=8, side=4, width=64, qkv=64, classes=6)

    # eval on the full store (EVL reads the same float16 levels from either storage mode)
    scores = evaluate(run, str(tmp / "full"), progress=False)
    model, info = load_model(run / "model.safetensors")
    assert info["branch"].arch == "evl" and scores["videos"] == 12
    # the checkpoint carries the frozen q/k weights it was trained with
    frozen = Store.open(tmp / "full").frozen()
    assert torch.equal(model.qk.weight, torch.from_numpy(frozen["evl_qk_weight"]))

    # predict: decode -> backbone (EVL's levels) -> branch equals the branch on the cached levels
    store = Store.open(tmp / "full")
    path = store.paths()[0]
    (predicted,) = predict_videos([str(videos["train"] / path)], str(run), top=6)
    levels = [torch.from_numpy(store.read_layer(n, 0).astype(np.float32)) for n in store.manifest.branches["evl"]["levels"]]
    with torch.no_grad():
        expected = model(levels).softmax(-1)[0]
    assert len(info["class_names"]) == 6 and len(predicted["top"]) == 6
    for c, name in enumerate(info["class_names"]):
        assert abs(dict(predicted["top"])[name] - expected[c].item()) < 1e-4, name

    # a sweep over the three families from one read of the store, each with its own defaults
    results = sweep(str(tmp / "compact"), str(tmp / "val"), "arch=madapter,evl,linear", str(tmp_path / "sweep"),
                    TrainConfig(epochs=1, batch_size=4, device="cpu"), quiet=True)
    assert sorted(r["arch"] for r in results) == ["evl", "linear", "madapter"]
    evl_run = next(r["run"] for r in results if r["arch"] == "evl")
    madapter_run = next(r["run"] for r in results if r["arch"] == "madapter")
    assert json.loads((tmp_path / "sweep" / evl_run.split("/")[-1] / "config.json").read_text())["train"]["lr"] == 4e-4
    assert json.loads((tmp_path / "sweep" / madapter_run.split("/")[-1] / "config.json").read_text())["train"][
        "lr"] == TrainConfig().lr


def test_evl_members_stack_and_each_matches_its_run_alone(stores, tmp_path):
    """Two EVL configurations (dropout 0.5) step as one stacked model; each writes its run alone's numbers."""
    from mad.adapt.lockstep import train_lockstep
    from mad.adapt.train import count_classes
    from mad.cache.dataset import open_tokens

    tmp, _ = stores
    configs = [evl_config(cache=str(tmp / "compact"), val=str(tmp / "val"), out=str(tmp_path / f"s{i}"), lr=lr,
                          epochs=1, batch_size=4, in_ram="yes", workers=0) for i, lr in enumerate((4e-4, 1e-3))]
    train_store, val_store = Store.open(tmp / "compact"), Store.open(tmp / "val")
    classes = count_classes(train_store, val_store)
    members = [resolve(cfg, train_store.manifest, classes, cfg.cache) for cfg in configs]
    train_data, val_data = open_tokens(train_store, "yes", 0), open_tokens(val_store, "yes", 0)
    try:
        train_lockstep(members, train_data, val_data, quiet=True)
    finally:
        train_data.close()
        val_data.close()
    train(dataclasses.replace(configs[1], out=str(tmp_path / "alone")), quiet=True)
    rows = [json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0]) for name in ("s1", "alone")]
    assert rows[0]["train/loss"] == pytest.approx(rows[1]["train/loss"], rel=1e-3)
    assert rows[0]["val/acc/top1"] == pytest.approx(rows[1]["val/acc/top1"], abs=1.5 / 6)


def test_evl_reads_only_its_levels_and_its_depth_takes_the_deepest_blocks():
    torch.manual_seed(0)
    cfg = BranchConfig(arch="evl", num_levels=5, in_width=16, num_tokens=10, num_frames=4, num_classes=3, width=16,
                       heads=2, depth=2, dropout=0.0, qk_heads=2)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.qk.weight.normal_()
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    levels = [torch.randn(2, 4, 10, 16) for _ in range(5)]
    out = model(levels)
    assert torch.equal(out, model(levels[2:]))  # depth 2 reads levels 2..4 (the input of its first block, 2 outputs)
    changed = [levels[0], levels[1], levels[2], levels[3], levels[4].flip(1)]  # the last block's frames reversed
    assert not torch.allclose(out, model(changed))  # order matters (temporal conv, position embedding, cross-attn)
    with pytest.raises(ValueError, match="depth 5"):
        build_model(BranchConfig(**{**cfg.to_dict(), "depth": 5}))
    with pytest.raises(ValueError, match="square patch grid"):
        build_model(BranchConfig(**{**cfg.to_dict(), "num_tokens": 7}))


def test_evl_depth_follows_the_store(stores, tmp_path):
    """A store holding N EVL blocks trains --depth N and refuses --depth N+1 in one line naming --depth and the
    extraction that would serve it (the depth was once checked against a default of 2 blocks, not the store)."""
    from typer.testing import CliRunner

    from mad.cli import app

    tmp, _ = stores
    base = ["train", "--cache", str(tmp / "compact"), "--arch", "evl", "--epochs", "1", "--batch-size", "4",
            "--device", "cpu", "--in-ram", "yes", "--workers", "0"]
    served = CliRunner().invoke(app, base + ["--depth", "4", "--out", str(tmp_path / "depth4")])
    assert served.exit_code == 0, served.output
    assert json.loads((tmp_path / "depth4" / "config.json").read_text())["model"]["depth"] == 4
    refused = CliRunner().invoke(app, base + ["--depth", "5", "--out", str(tmp_path / "depth5")])
    assert refused.exit_code == 2
    line = refused.output.strip()
    assert "\n" not in line and line.startswith("error: --depth 5:") and "--evl-layers 5" in line, line
    assert not (tmp_path / "depth5").exists()  # refused before any run folder or data


def evl_config(**settings) -> TrainConfig:
    """What `mad train --arch evl` with these options trains: EVL's preset for the rest."""
    return with_preset(TrainConfig(arch="evl", **settings), given=set(settings))


def official_state_names(layers: int) -> list[str]:
    """The state dict keys of the official EVLTransformer with a frozen backbone (decoder and head only: the
    backbone is kept out of the module tree), transcribed from OpenGVLab/efficient-video-recognition's model.py
    and vision_transformer.py."""
    names = ["decoder.cls_token", "proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias"]
    for i in range(layers):
        layer = f"decoder.decoder_layers.{i}"
        names += [f"{layer}.attn.{p}_proj.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")]
        names += [f"{layer}.mlp.{fc}.{w}" for fc in ("fc1", "fc2") for w in ("weight", "bias")]
        names += [f"{layer}.norm{n}.{w}" for n in (1, 2, 3) for w in ("weight", "bias")]
        names += [f"decoder.temporal_conv.{i}.weight", f"decoder.temporal_conv.{i}.bias",
                  f"decoder.temporal_pos_embed.{i}", f"decoder.cross_attention.{i}.w1",
                  f"decoder.cross_attention.{i}.w2"]
    return sorted(names)


def save_official(state: dict, path) -> None:
    """As the official main.py saves under DDP: `module.` before every key, with the optimizer's state."""
    params = [v.clone().requires_grad_() for v in state.values()]
    optimizer = torch.optim.AdamW(params, lr=4e-4, weight_decay=0.05)
    torch.save({"model": {f"module.{k}": v.clone() for k, v in state.items()}, "optimizer": optimizer.state_dict(),
                "lr_sched": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10).state_dict(),
                "loss_scaler": {}, "next_step": 10}, path)


def test_an_official_checkpoint_loads_strictly_and_gives_its_logits(stores, tmp_path):
    """An official checkpoint's decoder and head load strictly, q/k weights from the store: `mad import-evl` makes
    a run whose logits are the source weights' exactly; `mad train --init` starts from them; misfits are refused."""
    from mad.adapt.evaluate import evaluate

    tmp, _ = stores
    store = Store.open(tmp / "full")
    frozen = {name: torch.from_numpy(value) for name, value in store.frozen().items()}
    torch.manual_seed(1)
    source = build_model(resolve(TrainConfig(arch="evl"), store.manifest, 6, given=())[1]).eval()
    source.load_frozen(frozen)
    with torch.no_grad():  # the tables, embeddings and query start at zero: make every weight count
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("qk.")}
    assert sorted(state) == official_state_names(4)
    checkpoint = tmp_path / "official.pth"
    save_official(state, checkpoint)
    levels = [torch.from_numpy(store.read_layer(n, v).astype(np.float32)) for v in range(3)
              for n in store.manifest.branches["evl"]["levels"]]
    levels = [torch.cat(levels[i::5]) for i in range(5)]  # 3 videos
    with torch.no_grad():
        expected = source(levels)

    run = tmp_path / "imported"
    result = subprocess.run([sys.executable, "-m", "mad", "import-evl", str(checkpoint), "--cache", str(tmp / "full"),
                             "--out", str(run)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    model, info = load_model(run / "model.safetensors")
    assert torch.equal(model.qk.weight, frozen["evl_qk_weight"]) and info["class_names"] == store.class_names
    with torch.no_grad():
        assert torch.equal(model(levels), expected)
    assert evaluate(run, str(tmp / "full"), progress=False)["videos"] == 12  # mad eval reads it as a run

    # mad train --init: the run starts from the checkpoint (lr 0: it stays there)
    summary = train(evl_config(cache=str(tmp / "full"), init=str(checkpoint), epochs=1, lr=0.0,
                               batch_size=6, device="cpu", out=str(tmp_path / "tuned")), quiet=True)
    tuned, _ = load_model(summary["run"] + "/model.safetensors")
    with torch.no_grad():
        assert torch.equal(tuned(levels), expected)

    # misfits: 16 frames, a fine-tuned backbone, a missing layer, another arch
    for name, change in (("frames16", lambda s: {**s, "decoder.temporal_pos_embed.0": torch.zeros(16, 64)}),
                         ("backbone", lambda s: {**s, "backbone.blocks.0.attn.q_proj.weight": torch.zeros(64, 64)}),
                         ("layers3", lambda s: {k: v for k, v in s.items() if not (".3." in k or k.endswith(".3"))})):
        save_official(change(state), tmp_path / f"{name}.pth")
    with pytest.raises(MadError, match=r"temporal_pos_embed.0 is \(16, 64\) in the checkpoint, \(8, 64\) here"):
        train(evl_config(cache=str(tmp / "full"), init=str(tmp_path / "frames16.pth"), epochs=1,
                                   device="cpu", out=str(tmp_path / "x")), quiet=True)
    with pytest.raises(MadError, match="backbone weights .* fine-tuned"):
        import_official(tmp_path / "backbone.pth", str(tmp / "full"), tmp_path / "y")
    with pytest.raises(MadError, match="missing decoder.cross_attention.3.w1"):
        load_official(source, tmp_path / "layers3.pth")
    with pytest.raises(MadError, match="--init .* for --arch evl only"):
        train(TrainConfig(cache=str(tmp / "full"), init=str(checkpoint), out=str(tmp_path / "z")), quiet=True)
    with pytest.raises(MadError, match="no such checkpoint file"):
        load_official(source, tmp_path / "absent.pth")
