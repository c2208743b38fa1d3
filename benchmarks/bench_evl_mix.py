"""EVL's relative-position mix two ways, forward + backward: which is faster at which sizes?

    python benchmarks/bench_evl_mix.py --out benchmarks/results

out[n, q] = sum_k attn[n, q, k] * table[index[q, k]] (mad.adapt.evl._RelativeMix), for n = batch x
(T-1) frame pairs, P = 196 patches, a (2*14-1)^2 = 729-row table of width C:
- "scatter" (ours): attn scattered into the table's rows, one [n*P, 729] x [729, C] product;
- "gather-bmm" (the official einsum's shape): table[index] gathered to [P, P, C], P products of
  [n, P] x [P, C].
At the demo's sizes (batch 16, C=128) and ViT-B/16's (batch 2, C=768). Median of 5 after one warm-up.
Then a whole EVL training step at the demo's sizes (random float16 levels, AdamW), with our mix and
with the gather one swapped in, interleaved (ours, gather, ours). Writes evl_mix_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mad.adapt.evl import _RelativeMix, relative_index  # noqa: E402

SIZES = {"demo (batch 16, T 8, C 128)": (16 * 7, 128), "ViT-B/16 (batch 2, T 8, C 768)": (2 * 7, 768)}


def gather_bmm(attn, table, index):  # [n, P, P], [R, C], [P, P] -> [n, P, C]
    return torch.bmm(attn.transpose(0, 1), table[index]).transpose(0, 1)  # [P, n, P] @ [P, P, C]


def demo_step_seconds() -> dict:
    """Median seconds of an EVL training step (batch 16, T 8, 5 levels of 197 x 128), each mix."""
    from mad.adapt import evl
    from mad.adapt.branch import BranchConfig
    from mad.adapt.families import build_model

    torch.manual_seed(0)
    model = build_model(BranchConfig(arch="evl", num_levels=5, in_width=128, num_tokens=197, num_frames=8,
                                     num_classes=6, width=0, heads=0, depth=0, dropout=0.5, qk_heads=2))
    with torch.no_grad():  # stand-ins for the frozen q/k weights a store carries
        model.qk.weight.normal_(0, 128 ** -0.5)
    levels = [torch.randn(16, 8, 197, 128).half() for _ in range(5)]
    labels = torch.randint(0, 6, (16,))
    optimizer = torch.optim.AdamW(model.parameters(), 4e-4)

    def median_step() -> float:
        seconds = []
        for _ in range(6):
            started = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(levels), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds[1:])

    def gather_mix(self, attn, table, B):
        out = gather_bmm(attn, table, self.index)
        return out.view(B, -1, *out.shape[1:])

    ours = evl.TemporalCrossAttention.mix
    result = {"scatter": median_step()}
    evl.TemporalCrossAttention.mix = gather_mix
    try:
        result["gather-bmm"] = median_step()
    finally:
        evl.TemporalCrossAttention.mix = ours
    result["scatter again"] = median_step()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: unaffected by a busy core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    side = 14
    index = relative_index(side)
    rows = {}
    for name, (n, C) in SIZES.items():
        attn = torch.rand(n, side * side, side * side).softmax(-1)
        table = torch.randn((2 * side - 1) ** 2, C, requires_grad=True)
        ways = {"scatter": lambda: _RelativeMix.apply(attn, table, index), "gather-bmm": lambda: gather_bmm(attn, table, index)}
        assert torch.allclose(ways["scatter"](), ways["gather-bmm"](), atol=1e-5)
        rows[name] = {"n": n, "width": C}
        for way, f in ways.items():
            seconds = []
            for _ in range(6):
                started = time.perf_counter()
                f().sum().backward()
                seconds.append(time.perf_counter() - started)
            rows[name][way] = {"seconds_median": statistics.median(seconds[1:]), "seconds": seconds[1:]}
        rows[name]["scatter_over_gather"] = rows[name]["scatter"]["seconds_median"] / rows[name]["gather-bmm"]["seconds_median"]
        print(f"{name}: scatter {rows[name]['scatter']['seconds_median']:.3f} s, gather-bmm "
              f"{rows[name]['gather-bmm']['seconds_median']:.3f} s (scatter / gather {rows[name]['scatter_over_gather']:.2f})")
    step = demo_step_seconds()
    print("EVL step at the demo's sizes: " + ", ".join(f"{k} {v:.3f} s" for k, v in step.items()))
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "threads": args.threads, "torch": torch.__version__, "sizes": rows, "demo_step_seconds": step}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evl_mix_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
