"""What EVL's temporal cross-attention sees on a store: how its frame-to-frame attention maps spread.

    nice python benchmarks/evl_demo_attention.py CACHE [--videos 32]

CACHE is a store extracted with --branches evl (e.g. `mad demo --archs ...,evl`'s demo/cache/train).
For each EVL block, from the q and k recomputed as the branch does (`FrozenQK` with the store's
frozen weights), the attention of every patch of frame t over the patches of frame t-1 (softmax over
keys, mean over heads, as EVL): its entropy as a fraction of a uniform map's (1.0: uniform) and the
mass it puts within one patch of the query's own position (uniform: ~9/196). Beside it, the same two
figures for a content match: softmax over the cosine of the LayerNormed tokens, temperature 10 (what
M-adapter's correlation input matches). EVL's term is a learned function of these maps: maps that
do not follow the content cannot carry where a patch came from.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mad.adapt.evl import FrozenQK, relative_index  # noqa: E402
from mad.cache.store import Store  # noqa: E402


def spread(attn: torch.Tensor, side: int) -> tuple[float, float]:
    """(entropy / log P, mass within one patch of the query's position) of maps [..., P, P]."""
    P = attn.shape[-1]
    entropy = -(attn * attn.clamp_min(1e-12).log()).sum(-1).mean().item() / math.log(P)
    offsets = relative_index(side)
    di, dj = offsets // (2 * side - 1) - (side - 1), offsets % (2 * side - 1) - (side - 1)
    near = ((di.abs() <= 1) & (dj.abs() <= 1)).float()  # [P, P]
    return entropy, (attn * near).sum(-1).mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--videos", type=int, default=32)
    args = parser.parse_args()
    store = Store.open(args.cache)
    m = store.manifest
    if m.evl is None:
        sys.exit(f"{args.cache}: no EVL levels (extract with --branches madapter,evl)")
    side = m.side
    blocks = len(m.evl["blocks"])
    qk = FrozenQK(blocks, m.width, m.evl["heads"], m.evl["ln_eps"])
    qk.load({k: torch.from_numpy(v) for k, v in store.frozen().items()})
    videos = np.arange(min(args.videos, store.num_videos))
    print(f"{args.cache}: {len(videos)} videos, {side}x{side} patches, uniform near-mass {9 / side ** 2:.3f}")
    for i, (block, level) in enumerate(zip(m.evl["blocks"], m.evl["levels"])):
        x = torch.from_numpy(store.read_layer(level, videos)[:, 0].astype(np.float32))  # block's input [V, T, N, D]
        q, k = qk(x, i)
        q, k = q[:, 1:, 1:].transpose(2, 3), k[:, :-1, 1:].transpose(2, 3)  # frame t vs t-1: [V, T-1, h, P, c]
        evl = ((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1).mean(2)  # [V, T-1, P, P]
        tokens = F.normalize(F.layer_norm(x[:, :, 1:], (m.width,)), dim=-1)
        content = (10 * tokens[:, 1:] @ tokens[:, :-1].transpose(-1, -2)).softmax(-1)
        (e1, n1), (e2, n2) = spread(evl, side), spread(content, side)
        print(f"block {block}: EVL's q.k maps entropy {e1:.3f}, near-mass {n1:.3f} | content match entropy {e2:.3f}, "
              f"near-mass {n2:.3f}")


if __name__ == "__main__":
    main()
