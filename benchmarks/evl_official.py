"""Our EVL (`mad.adapt.evl`, reading a store) against the official code run end to end on the same frames.

    python benchmarks/evl_official.py --official /path/to/efficient-video-recognition [--out benchmarks/results]

`--official` is a checkout of OpenGVLab/efficient-video-recognition, or its bare git directory (its HEAD is read
with `git show`). The official `TemporalCrossAttention.forward` allocates its output on 'cuda'; that one token is
changed to the input's device in the copy the script imports (nothing else is touched).

The backbone: open_clip's ViT-B-16-quickgelu (the official blocks use QuickGELU, as OpenAI's CLIP does) with
mad's seeded random weights (no pre-trained weights here). The official `EVLTransformer` (ViT-B/16-lnpre, 8
frames, 4 decoder layers, 400 classes, backbone frozen in float32) is built by its own code: its weight loader
reads that open_clip visual tower (its `torch.jit.load` of a CLIP file is handed the tower instead) and splits
the in-projection into its q_proj, k_proj, v_proj. Its decoder and head get random weights (the temporal
cross-attention tables at the features' scale, so the q/k path weighs in the logits); its state dict is
saved as the official main.py saves it under DDP (`module.` prefixes) and loaded into ours with
`mad.adapt.evl_checkpoint.load_official` (strict; q/k weights from the store). Then, on 2 synthetic videos:

- `mad extract --branches evl` (full store, float32 backbone) caches them; ours reads the float16 levels;
- the official model runs its own blocks on the same decoded, normalised frames: its q, k (per block, from
  its q_proj/k_proj), block outputs and logits, in eval mode and in train mode with the same seed (dropout
  masks drawn in the same order), and the gradients of a loss in train mode;
- ours also runs on the official blocks' float32 outputs (no float16 storage), which isolates our q/k
  recomputation and decoder from the store's rounding;
- and ours with its q multiplied by 2, to show what size of difference a wrong q/k makes in the logits.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mad.adapt.branch import BranchConfig, count_parameters  # noqa: E402
from mad.adapt.families import build_model, store_needs  # noqa: E402
from mad.adapt.evl_checkpoint import load_official  # noqa: E402

FILES = ("model.py", "vision_transformer.py", "weight_loaders.py")
MODEL, FRAMES, CLASSES, VIDEOS = "ViT-B-16-quickgelu", 8, 400, 2


def official_sources(path: Path, into: Path) -> Path:
    """The official model files in `into` (from a work tree or a bare git directory), made runnable on CPU."""
    for name in FILES:
        if (path / name).exists():
            text = (path / name).read_text()
        else:
            text = subprocess.run(["git", f"--git-dir={path}", "show", f"HEAD:{name}"], check=True,
                                  capture_output=True, text=True).stdout
        if name == "model.py":
            assert text.count("device='cuda'") == 1
            text = text.replace("device='cuda'", "device=q.device")
        (into / name).write_text(text)
    return into


def make_store(tmp: Path):
    """2 synthetic clips extracted as `mad extract --branches madapter,evl --store full` does; the store, the
    frames its backbone saw (normalised, [B, 3, T, S, S]) and the backbone."""
    from mad.cache.store import Store
    from mad.extract.backbone import load_backbone
    from mad.extract.decode import decode_clip
    from mad.extract.run import ExtractConfig, extract
    from mad.synthetic import write_video

    rng = np.random.default_rng(0)
    (tmp / "videos" / "c").mkdir(parents=True)
    for v in range(VIDEOS):  # smooth random colours, drifting: frames differ, neighbours alike
        base = rng.uniform(0, 255, (4, 4, 3))
        video = np.stack([np.kron(np.roll(base, t // 3, axis=1), np.ones((16, 16, 1))) for t in range(24)])
        write_video(tmp / "videos" / "c" / f"clip{v}.mp4", (video + rng.normal(0, 8, video.shape)).clip(0, 255)
                    .astype(np.uint8))
    extract(ExtractConfig(videos=str(tmp / "videos"), out=str(tmp / "store"), model=MODEL, pretrained="none",
                          layers="12", frames=FRAMES, store="full", precision="fp32", workers=0, progress=False),
            store_needs("madapter,evl"))
    store = Store.open(tmp / "store")
    backbone = load_backbone(MODEL, "none", "12", precision="fp32")  # the store's seeded random weights
    frames = []
    for v, path in enumerate(store.paths()):
        clip = decode_clip(str(tmp / "videos" / path), FRAMES, size=store.manifest.image_size)
        assert np.array_equal(clip.frame_index, store.frame_index()[v])
        frames.append((torch.from_numpy(clip.frames[0]).float() / 255 - backbone.mean) / backbone.std)  # [T, 3, S, S]
    return store, torch.stack(frames).transpose(1, 2), backbone  # [B, 3, T, S, S]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|"""
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="write evl_official.json here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*random weights.*")
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "official").mkdir()
        sys.path.insert(0, str(official_sources(args.official, tmp / "official")))
        from model import EVLTransformer  # the official module

        store, x, backbone = make_store(tmp)
        torch.manual_seed(0)  # the official decoder's own init, then our perturbation: the same weights every run
        with mock.patch("torch.jit.load", lambda path, map_location=None: SimpleNamespace(visual=backbone.visual)):
            official = EVLTransformer(num_frames=FRAMES, backbone_name="ViT-B/16-lnpre", backbone_type="clip",
                                      backbone_path="open_clip", backbone_mode="freeze_fp32", decoder_num_layers=4,
                                      decoder_qkv_dim=768, decoder_num_heads=12, num_classes=CLASSES)
        m = store.manifest
        ours = build_model(BranchConfig(arch="evl", num_levels=len(m.branches["evl"]["levels"]), in_width=m.width,
                                        num_tokens=m.tokens, num_frames=m.frames, num_classes=CLASSES, width=0,
                                        heads=0, depth=0, dropout=0.5, qk_heads=m.branches["evl"]["heads"],
                                        qk_eps=m.branches["evl"]["ln_eps"]))
        theirs_params, ours_params = count_parameters(official), count_parameters(ours)
        print(f"trainable parameters, ViT-B/16 8 frames 400 classes: official {theirs_params:,}, ours {ours_params:,}")

        # The official decoder and head, random (its tables, embeddings and query start at zero), saved as its
        # main.py saves them under DDP, loaded into ours strictly; our q/k weights from the store.
        for p in official.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        for table in official.decoder.cross_attention:  # at the features' scale (std ~1.3), so q and k weigh in
            table.w1.normal_()
            table.w2.normal_()
        torch.save({"model": {f"module.{k}": v for k, v in official.state_dict().items()}}, tmp / "official.pth")
        ours.load_frozen({name: torch.from_numpy(value) for name, value in store.frozen().items()})
        load_official(ours, tmp / "official.pth")
        blocks = official.backbone[0].blocks
        same_frozen = all(torch.equal(ours.qk.weight[i], torch.cat([blocks[b].attn.q_proj.weight,
                                                                    blocks[b].attn.k_proj.weight]))
                          for i, b in enumerate(range(8, 12)))
        print(f"the official state dict (module. prefixes) loaded strictly into ours; the store's q/k weights equal "
              f"the official blocks' q_proj/k_proj: {same_frozen}")

        # The official model end to end; its backbone's per-block q, k, out caught on the way.
        features = []
        official.backbone[0].register_forward_hook(  # copies: the official decoder adds to its 'out's in place
            lambda module, inputs, output: features.append([{k: v.clone() for k, v in f.items()} for f in output]))
        official.eval()
        ours.eval()
        reference = official(x)
        B, T = x.shape[0], x.shape[2]
        blocks_out = [{k: v.view(B, T, *v.shape[1:]) for k, v in f.items()} for f in features[0]]  # 12 blocks
        levels = [torch.from_numpy(store.read_layer(n, slice(None))[:, 0])  # float16
                  for n in m.branches["evl"]["levels"]]
        result = {"official_parameters": theirs_params, "our_parameters": ours_params,
                  "store_qk_weights_equal_official": same_frozen}

        # q, k: ours recomputed from the store's float16 levels against the official blocks' own
        qk = [ours.qk(levels[i], i) for i in range(4)]
        result["qk_max_relative_difference"] = max(max(relative(q, blocks_out[8 + i]["q"]),
                                                       relative(k, blocks_out[8 + i]["k"]))
                                                   for i, (q, k) in enumerate(qk))
        result["levels_max_relative_difference"] = max(relative(levels[i].float(), blocks_out[7 + i]["out"])
                                                       for i in range(5))
        ours_store = ours(levels)
        ours_fp32 = ours([blocks_out[7 + i]["out"] for i in range(5)])
        result["logit_range"] = reference.abs().max().item()
        result["eval_logits_store_max_abs_difference"] = (ours_store - reference).abs().max().item()
        result["eval_logits_official_features_max_abs_difference"] = (ours_fp32 - reference).abs().max().item()
        doubled = ours.qk.register_forward_hook(lambda module, inputs, output: (2 * output[0], output[1]))
        result["eval_logits_with_q_doubled_max_abs_difference"] = (ours(levels) - reference).abs().max().item()
        doubled.remove()

        # train mode, the same seed: dropout in every decoder layer's MLP and before the head
        official.train()
        ours.train()
        labels = torch.arange(B) % CLASSES
        with torch.enable_grad():
            torch.manual_seed(1)
            theirs_train = official(x)
            F.cross_entropy(theirs_train, labels).backward()
            torch.manual_seed(1)
            ours_train = ours(levels)
            F.cross_entropy(ours_train, labels).backward()
        result["train_logits_store_max_abs_difference"] = (ours_train - theirs_train).abs().max().item()
        theirs_grads = dict(official.named_parameters())
        # k_proj's bias gets no gradient in exact arithmetic (it shifts each query's logits by a constant, which the
        # softmax ignores): both sides hold float32 noise there (< 2e-7), left out of the relative figure
        kept = [name for name, _ in ours.named_parameters() if not name.endswith("attn.k_proj.bias")]
        result["train_grads_max_relative_difference"] = max(relative(ours.get_parameter(name).grad,
                                                                     theirs_grads[name].grad) for name in kept)
        result["train_grads_k_proj_bias_max_abs"] = max(p.grad.abs().max().item() for name, p in
                                                        [*ours.named_parameters(), *theirs_grads.items()]
                                                        if name.endswith("attn.k_proj.bias"))
        result["train_logits_differ_from_eval"] = (theirs_train - reference).abs().max().item()
        for key, value in result.items():
            print(f"{key}: {value:.3g}" if isinstance(value, float) else f"{key}: {value}")
        result.update(command="python benchmarks/evl_official.py --official PATH",
                      config=f"{MODEL} (random weights, seed 0), {VIDEOS} synthetic clips, {FRAMES} frames, full store "
                             "(float16 levels), official backbone frozen in float32; 4 decoder layers, width 768, "
                             "12 heads, mlp ratio 4, dropout 0.5, 400 classes; CPU, float32")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "evl_official.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
