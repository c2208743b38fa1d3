"""EVL on the demo with content-matching q, k instead of the random-weight backbone's: does its design learn then?

    nice python benchmarks/evl_demo_qk.py DEMO [--epochs 30] [--seed 0]

DEMO is the folder of a `mad demo --archs ...,evl` run (its cache/train and cache/val hold EVL's
levels). The demo's ViT has random weights, and its attention maps between frames are uniform
(`benchmarks/evl_demo_attention.py`: entropy 0.999 of a uniform map's), so EVL's temporal
cross-attention term carries nothing there. This trains EVL exactly as the demo does (its defaults,
`with_arch_defaults`), but with the frozen q/k weights replaced by q = k = a * ln_1(x) (identity
projections, a = (10 / sqrt(head width))^(1/2)): attention that follows the content, a softmax over
10 x the per-head cosine, as pre-trained CLIP attention roughly does and as M-adapter's correlation
input matches. Prints the val top-1 of that run (the demo's own EVL run is the baseline).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    from mad.adapt.train import train_on, with_arch_defaults
    from mad.cache.dataset import open_tokens
    from mad.demo import DemoConfig, demo_train_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = DemoConfig(out=str(args.demo), epochs=args.epochs, seed=args.seed, progress=False)
    train_cfg = with_arch_defaults(demo_train_config(args.demo / "cache" / "train", args.demo / "cache" / "val", "evl",
                                                     args.demo / "runs" / "evl-content-qk", cfg))
    train_data = open_tokens(train_cfg.cache, "yes", progress=False, archs=("evl",))
    val_data = open_tokens(train_cfg.val, "yes", progress=False, archs=("evl",))
    m = train_data.manifest
    D, heads = m.width, m.evl["heads"]
    scale = (10 / (D // heads) ** 0.5) ** 0.5
    L = len(m.evl["blocks"])
    eye = torch.eye(D) * scale
    train_data.frozen = {"evl_ln_1_weight": torch.ones(L, D), "evl_ln_1_bias": torch.zeros(L, D),
                         "evl_qk_weight": torch.cat([eye, eye])[None].repeat(L, 1, 1),
                         "evl_qk_bias": torch.zeros(L, 2 * D)}
    summary = train_on(train_cfg, train_data, val_data, quiet=True)
    result = {k: summary[k] for k in ("val/acc/top1", "last/val/acc/top1", "train/acc", "seconds")}
    print(json.dumps({"evl_content_qk": result, "epochs": args.epochs, "seed": args.seed}))


if __name__ == "__main__":
    main()
