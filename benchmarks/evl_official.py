"""Our EVL decoder (`mad.adapt.evl`) against the official code, module by module.

    python benchmarks/evl_official.py --official /path/to/efficient-video-recognition [--out benchmarks/results]

`--official` is a checkout of OpenGVLab/efficient-video-recognition, or its bare git directory (as the
`fetch` tool leaves it; its HEAD is read with `git show`). The script instantiates the official
`EVLDecoder` and the head `EVLTransformer` puts on it (LayerNorm, Dropout, Linear) for ViT-B/16,
8 frames, 400 classes, the ViT-B/16 8-frame script's settings (no backbone: `EVLTransformer` needs
CLIP weights, and the backbone is frozen, so not counted), and prints:

1. the trainable parameters of both (our default config against the official one);
2. whether every official parameter name has a parameter of the same name and shape in ours;
3. the logits of both on the same random cached levels, with our weights loaded into the official
   modules: our forward against theirs, in float32 on the CPU. The official
   `TemporalCrossAttention.forward` allocates its output on 'cuda'; that one token is changed to the
   input's device in the copy the script imports (nothing else is touched).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mad.adapt.branch import BranchConfig, count_parameters  # noqa: E402
from mad.adapt.families import build_model  # noqa: E402

FILES = ("model.py", "vision_transformer.py", "weight_loaders.py")


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="write evl_official.json here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(official_sources(args.official, Path(tmp))))
        from model import EVLDecoder  # the official module

        torch.manual_seed(0)
        official = nn.ModuleDict({
            # EVLTransformer.__init__ for ViT-B/16-lnpre, 8 frames, the train script's settings
            "decoder": EVLDecoder(num_frames=8, spatial_size=(14, 14), num_layers=4, in_feature_dim=768,
                                  qkv_dim=768, num_heads=12, mlp_factor=4.0, mlp_dropout=0.5),
            "proj": nn.Sequential(nn.LayerNorm(768), nn.Dropout(0.5), nn.Linear(768, 400)),
        })
        ours = build_model(BranchConfig(arch="evl", num_levels=5, in_width=768, num_tokens=197, num_frames=8,
                                        num_classes=400, width=0, heads=0, depth=0, dropout=0.5, qk_heads=12))
        theirs_params = sum(p.numel() for p in official.parameters() if p.requires_grad)
        ours_params = count_parameters(ours)
        print(f"trainable parameters, ViT-B/16 8 frames 400 classes: official {theirs_params:,}, ours {ours_params:,}")

        theirs_shapes = {k: tuple(v.shape) for k, v in official.named_parameters()}
        ours_shapes = {k: tuple(v.shape) for k, v in ours.named_parameters()}
        same_names = theirs_shapes == ours_shapes
        print(f"same parameter names and shapes: {same_names}")
        if not same_names:
            print("  only official:", sorted(set(theirs_shapes) - set(ours_shapes))[:5])
            print("  only ours:", sorted(set(ours_shapes) - set(theirs_shapes))[:5])

        # Same weights (ours, made non-trivial: the tables and embeddings start at zero), same inputs.
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.02)
            ours.qk.weight.normal_(0, 0.05)
            ours.qk.ln_weight.normal_(1, 0.1)
        official.load_state_dict({k: v for k, v in ours.state_dict().items() if k in theirs_shapes}, strict=True)
        ours.eval()
        official.eval()
        levels = [torch.randn(2, 8, 197, 768).half() for _ in range(5)]
        with torch.no_grad():
            logits = ours(levels)
            features = []
            for i in range(4):  # what the official backbone hands its decoder for block i: out, q, k (float32)
                q, k = ours.qk(levels[i], i)
                features.append({"out": levels[i + 1].float(), "q": q, "k": k})
            reference = official["proj"](official["decoder"](features)[:, 0, :])
        difference = (logits - reference).abs().max().item()
        print(f"logits, ours against official on the same weights and inputs: max |difference| {difference:.2e} "
              f"(logits' range {reference.abs().max().item():.2f})")
        result = {"official_parameters": theirs_params, "our_parameters": ours_params,
                  "same_parameter_names_and_shapes": same_names, "max_abs_logit_difference": difference,
                  "logit_range": reference.abs().max().item(),
                  "command": "python benchmarks/evl_official.py --official PATH", "config": "ViT-B/16, 8 frames, "
                  "4 decoder layers, width 768, 12 heads, mlp ratio 4, dropout 0.5, 400 classes"}
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "evl_official.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
