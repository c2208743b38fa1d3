"""Where EVL's q/k come from: recomputed from cached levels (a) or cached themselves (b). Bytes and step time.

    nice python benchmarks/bench_evl_qk.py [--batch 2] [--steps 3] [--out benchmarks/results]

EVL's temporal cross-attention reads, for each of its L blocks, that block's attention q and k.
(a) the store holds the block's input too (one level more than the L outputs) and the frozen
    weights ln_1 + q/k rows of the in-projection; `FrozenQK` recomputes q, k in the branch step;
(b) extraction taps q and k (float16, every token as the official backbone returns them) beside
    the L outputs; the step reads them.
Bytes per video-view follow from the shapes (float16, ViT-B/16, T=8 by default). Step time: one
`mad.adapt.step.train_step` of the default EVL branch (forward, backward, AdamW) on synthetic float16
inputs as the cache reader returns them, fp32 on this CPU, (a) and (b) interleaved, the first step of
each dropped. The two steps differ only in where q and k come from.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mad.adapt.branch import BranchConfig  # noqa: E402
from mad.adapt.families import build_model  # noqa: E402
from mad.adapt.step import make_optimizer, train_step  # noqa: E402
from mad.runtime import machine_info  # noqa: E402


class CachedQK(nn.Module):
    """(b): q, k read from the cache (float16 [B, T, N, D] each per block) instead of recomputed."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads
        self.q: list[torch.Tensor] = []
        self.k: list[torch.Tensor] = []

    def forward(self, x, block):
        B, T, N, D = self.q[block].shape
        return (self.q[block].float().view(B, T, N, self.heads, D // self.heads),
                self.k[block].float().view(B, T, N, self.heads, D // self.heads))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    B, T, N, D, L = args.batch, args.frames, args.tokens, args.width, args.blocks

    level_bytes = T * N * D * 2  # one level of one video-view, float16
    bytes_a = (L + 1) * level_bytes  # L outputs + the first block's input
    bytes_b = 3 * L * level_bytes  # L outputs + L q + L k
    frozen_bytes = L * (2 * D + 2 * D * D + 2 * D) * 4  # once per store, float32
    print(f"bytes per video-view: (a) recompute {bytes_a:,} ({L + 1} levels), (b) cached q/k {bytes_b:,} "
          f"({3 * L} arrays): (b) / (a) = {bytes_b / bytes_a:.2f}; (a) adds {frozen_bytes:,} bytes of frozen "
          "weights per store")

    torch.manual_seed(0)
    cfg = BranchConfig(arch="evl", num_levels=L + 1, in_width=D, num_tokens=N, num_frames=T, num_classes=400,
                       width=0, heads=0, depth=0, dropout=0.5, qk_heads=args.heads)
    models = {"a": build_model(cfg), "b": build_model(cfg)}
    models["b"].load_state_dict(models["a"].state_dict())
    with torch.no_grad():
        models["a"].qk.weight.normal_(0, 0.03)
    cached_qk = CachedQK(args.heads)
    models["b"].qk = cached_qk
    optimizers = {name: make_optimizer(model, 4e-4, 0.05) for name, model in models.items()}
    levels = [torch.randn(B, T, N, D).half() for _ in range(L + 1)]
    with torch.no_grad():  # (b)'s cached q, k: what the backbone's attention computed, stored as float16
        for i in range(L):
            q, k = models["a"].qk(levels[i], i)
            cached_qk.q.append(q.flatten(-2).half())
            cached_qk.k.append(k.flatten(-2).half())
    inputs = {"a": levels, "b": [levels[0]] + levels[1:]}  # (b)'s first level is not read (its q, k are cached)
    labels = torch.randint(0, 400, (B,))
    times = {"a": [], "b": []}
    for step in range(args.steps + 1):
        for name, model in models.items():
            model.train()
            started = time.perf_counter()
            train_step(lambda: model(inputs[name]), labels, optimizers[name], model.parameters())
            if step:
                times[name].append(time.perf_counter() - started)
    for name, label in (("a", "recompute"), ("b", "cached q/k")):
        t = times[name]
        print(f"({name}) {label}: step {statistics.median(t):.3f} s (min {min(t):.3f}, max {max(t):.3f})")
    ratio = statistics.median(times["a"]) / statistics.median(times["b"])
    print(f"step (a) / (b) = {ratio:.2f}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        result = {"benchmark": "evl_qk", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": "nice python " + " ".join(sys.argv), "machine": machine_info("cpu"),
                  "shapes": dict(batch=B, frames=T, tokens=N, width=D, heads=args.heads, blocks=L),
                  "bytes_per_video_view": {"a_recompute": bytes_a, "b_cached_qk": bytes_b},
                  "frozen_bytes_per_store": frozen_bytes,
                  "step_seconds": {"a_recompute": times["a"], "b_cached_qk": times["b"]},
                  "step_ratio_a_over_b": ratio}
        (args.out / "evl_qk_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
