"""EVL on the demo with content-matching q, k instead of the random-weight backbone's: does its design learn then?

    python benchmarks/evl_demo_qk.py DEMO [--epochs 30] [--depth 0] [--seed 0] [--out JSON]

DEMO is the folder of a `mad demo --archs ...,evl` run (its cache/train and cache/val hold EVL's
levels). The demo's ViT has random weights, and its attention maps between frames are uniform
(`benchmarks/evl_demo_attention.py`: entropy 0.999 of a uniform map's), so EVL's temporal
cross-attention term carries nothing there. This trains EVL exactly as the demo does (its defaults,
`mad.adapt.config.resolve`), but with the frozen q/k weights replaced by q = k = a * ln_1(x) (identity
projections, a = (10 / sqrt(head width))^(1/2)): attention that follows the content, a softmax over
10 x the per-head cosine, as pre-trained CLIP attention roughly does and as M-adapter's correlation
input matches. Trains both, the backbone's q, k ("store") and these ("content"), with the same seed,
epochs and decoder depth (`--depth 1`: the last block only, a quarter of the cost), and prints their
val top-1 (best and last epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main():
    from mad.adapt.config import resolve
    from mad.adapt.families import reads
    from mad.adapt.train import count_classes, train_on
    from mad.cache.store import Store
    from mad.cache.dataset import open_tokens
    from mad.demo import DemoConfig, demo_train_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=0, help="decoder layers (0: every cached block, EVL's)")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON, with this command and date)")
    args = parser.parse_args()
    cfg = DemoConfig(out=str(args.demo), epochs=args.epochs, seed=args.seed, progress=False)
    results = {}
    stores = [Store.open(str(args.demo / "cache" / split)) for split in ("train", "val")]
    train_data, val_data = (open_tokens(s, "yes", progress=False, arrays=reads(["evl"], s.manifest, s.location))
                            for s in stores)
    store_qk = dict(train_data.frozen)
    m = train_data.manifest
    D, heads, L = m.width, m.branches["evl"]["heads"], len(m.branches["evl"]["blocks"])
    scale = (10 / (D // heads) ** 0.5) ** 0.5
    eye = torch.eye(D) * scale
    content_qk = {"evl_ln_1_weight": torch.ones(L, D), "evl_ln_1_bias": torch.zeros(L, D),
                  "evl_qk_weight": torch.cat([eye, eye])[None].repeat(L, 1, 1), "evl_qk_bias": torch.zeros(L, 2 * D)}
    for name, frozen in (("store", store_qk), ("content", content_qk)):
        run = args.demo / "runs" / f"evl-qk-{name}-depth{args.depth}-epochs{args.epochs}"
        settings = dataclasses.replace(demo_train_config(
            args.demo / "cache" / "train", args.demo / "cache" / "val", "evl", run, cfg), depth=args.depth)
        train_cfg, branch = resolve(settings, m, count_classes(*stores), str(args.demo), given={"depth"})
        train_data.frozen = frozen  # what train_on loads into the model
        summary = train_on(train_cfg, branch, train_data, val_data, quiet=True)
        results[name] = {k: summary[k] for k in ("val/acc/top1", "last/val/acc/top1", "train/acc", "seconds")}
        print(name, json.dumps(results[name]), flush=True)
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "depth": args.depth, "epochs": args.epochs, "seed": args.seed, "results": results}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
