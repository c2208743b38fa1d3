"""`mad bench memory` on a tiny backbone: the modes' peak memory comes out in the expected order,
and the in-backbone modes' public-API forward (hooked adapters, `SelfAttention`) computes what open_clip does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mad.adapt.step import make_optimizer, train_step
from mad.bench.memory import (MODES, BenchConfig, BenchError, find_max_batch, resolve_config, run_benchmark,
                              run_child)
from mad.bench.memory.workloads import (SelfAttention, build_in_backbone_adapter, deepest_cls_logits,
                                        lean_attention, load_random_backbone, random_frames)
from mad.errors import MadError

TINY = Path(__file__).parent / "configs" / "mad-tiny-vit.json"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """All modes, each in its own process, on the tiny ViT widened to 256 channels.

    Why wider: at width 64 the backbone's weights (~0.5 MB) and its no_grad forward are
    within the noise of a process's RSS, so "online > cached" would be luck. At width
    256 with 16 clips x 8 frames the gaps are 18-90 MB in fp32, measured reproducible to 0.3 MB.
    Why fp32: CPU bf16 backward through the backbone took 17 s a step (fp32: 0.8 s), so the
    fixture ran 150 s vs 33 s; the order of the modes is the same in both. The bf16 path is
    covered by test_in_backbone_adapters_run_from_hooks_and_train_alone.
    """
    root = tmp_path_factory.mktemp("bench")
    config = json.loads(TINY.read_text())
    config["vision_cfg"].update(width=256, head_width=64)
    model = root / "mad-tiny-vit-w256.json"
    model.write_text(json.dumps(config))
    return run_benchmark(model=str(model), frames=8, batch=16, layers="2,3,4", device="cpu", precision="fp32",
                         steps=2, out=root / "results", classes=10, branch_width=24, threads=1, quiet=True)


@pytest.mark.slow
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


def test_evl_modes_online_above_cached_and_cached_holds_no_backbone(report):
    rows = {row["mode"]: row for row in report["modes"]}
    online, cached = rows["evl-online"], rows["evl-cached"]
    assert online["peak_bytes"] - cached["peak_bytes"] > 4 * 2**20
    assert cached["backbone_parameters"] == 0 and cached["open_clip_imported"] is False
    assert cached["trainable_parameters"] == online["trainable_parameters"] > 0
    assert online["backbone_parameters"] == rows["madapter-online"]["backbone_parameters"]


def test_static_baseline_modes_train_their_own_heads(report):
    """meanpool / linear modes (benchmarks/bench_demo_archs.py): their own heads, not the branch."""
    cfg = BenchConfig(**report["config"])
    rows = {row["mode"]: row for row in report["modes"]}
    sizes = []
    for arch in ("meanpool", "linear"):
        cached, online = run_child(cfg, f"{arch}-cached"), run_child(cfg, f"{arch}-online")
        assert cached["backbone_parameters"] == 0 and cached["open_clip_imported"] is False
        assert online["backbone_parameters"] == rows["madapter-online"]["backbone_parameters"]
        assert cached["trainable_parameters"] == online["trainable_parameters"]
        assert online["peak_bytes"] > cached["peak_bytes"]
        sizes.append(cached["trainable_parameters"])
    assert rows["madapter-cached"]["trainable_parameters"] > sizes[0] > sizes[1] > 0


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


def tiny_config(**overrides) -> BenchConfig:
    cfg = resolve_config(str(TINY), frames=4, batch=2, layers="2,4", device="cpu", precision="fp32", steps=1,
                         classes=5, branch_width=24)
    return BenchConfig(**{**cfg.__dict__, **overrides})


def test_resolve_config_checks_options():
    cfg = tiny_config()
    assert (cfg.in_width, cfg.num_tokens, cfg.image_size, cfg.layers) == (64, 17, 64, [2, 4])
    assert cfg.cell_size == 1  # auto: a 4x4 grid is finer than 7x7, so every patch stays
    with pytest.raises(BenchError, match="not divisible by heads"):
        resolve_config(str(TINY), 4, 2, "2,4", "cpu", "bf16", 1, 5, branch_width=32)
    with pytest.raises(BenchError, match="out of range"):
        resolve_config(str(TINY), 4, 2, "9", "cpu", "bf16", 1, 5, branch_width=24)
    with pytest.raises(MadError, match="precision"):
        resolve_config(str(TINY), 4, 2, "2,4", "cpu", "fp8", 1, 5, branch_width=24)


def test_self_attention_matches_multihead_attention():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(3, 7, 32, requires_grad=True)
    expected = attn(x, x, x, need_weights=False)[0]
    lean = SelfAttention(attn)
    got, weights = lean(x, x, x, need_weights=False)
    assert weights is None
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad_expected = torch.autograd.grad(expected.sum(), x)[0]
    torch.testing.assert_close(torch.autograd.grad(got.sum(), x)[0], grad_expected, atol=1e-5, rtol=1e-5)
    assert list(lean.parameters()) == list(attn.parameters())
    y = torch.randn(3, 5, 32)  # cross-attention is not covered: the module itself answers
    torch.testing.assert_close(lean(x, y, y, need_weights=False)[0], attn(x, y, y, need_weights=False)[0])


def test_lean_backbone_forward_matches_open_clip():
    """The benchmark's forward (forward_intermediates with SelfAttention) = open_clip's own, CLS after ln_post."""
    cfg = tiny_config()
    head = nn.Linear(cfg.in_width, cfg.classes)
    frames = random_frames(cfg)
    backbone = load_random_backbone(cfg, "fp32")
    expected = deepest_cls_logits(backbone, head, frames, cfg)
    assert lean_attention(backbone.visual) == 4
    torch.testing.assert_close(deepest_cls_logits(backbone, head, frames, cfg), expected, atol=1e-5, rtol=1e-5)
    # the same CLS as the full open_clip tower (projection aside) when the deepest tap is the last block
    pixels = (frames.float() / 255.0 - backbone.mean) / backbone.std
    backbone.visual.proj = None  # open_clip's forward then returns ln_post(CLS), unprojected
    cls = backbone.visual(pixels)  # [B*T, D]
    logits = head(cls.view(cfg.batch, cfg.frames, -1).mean(dim=1))
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_in_backbone_adapters_run_from_hooks_and_train_alone():
    cfg = tiny_config(precision="bf16")
    workload = build_in_backbone_adapter(cfg)
    backbone, adapters, head = workload.modules
    assert {p.dtype for p in adapters.parameters()} == {torch.bfloat16}  # CPU: the stream's dtype, no fp32 copy
    assert all(isinstance(block.attn, SelfAttention) for block in backbone.visual.transformer.resblocks)
    frozen = [p.clone() for p in backbone.parameters()]
    labels = torch.zeros(cfg.batch, dtype=torch.long)
    optimizer = make_optimizer(workload.trained, 1e-2, 0.05)
    for _ in range(2):
        train_step(workload.forward, labels, optimizer, workload.trainable)
    assert all(torch.equal(a, b) for a, b in zip(frozen, backbone.parameters()))
    assert all(adapter.up.weight.abs().sum() > 0 for adapter in adapters)  # every block's adapter got gradients
    with torch.no_grad():
        adapted = workload.forward()
        for adapter in adapters:  # back to the zero-initialised up-projection: the adapters add nothing
            adapter.up.weight.zero_()
            adapter.up.bias.zero_()
        assert not torch.equal(workload.forward(), adapted)  # so the hooks did feed the blocks the adapted stream


def test_child_entry_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mad.bench.memory", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--mode" in done.stdout
    assert issubclass(BenchError, MadError)
