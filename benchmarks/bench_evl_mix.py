"""EVL's relative-position mix two ways, forward + backward: which is faster at which sizes?

    python benchmarks/bench_evl_mix.py --out benchmarks/results

out[n, q] = sum_k attn[n, q, k] * table[index[q, k]] (mad.adapt.evl._RelativeMix), for n = batch x
(T-1) frame pairs, P = 196 patches, a (2*14-1)^2 = 729-row table of width C:
- "scatter" (ours): attn scattered into the table's rows, one [n*P, 729] x [729, C] product;
- "gather-bmm" (the official einsum's shape): table[index] gathered to [P, P, C], P products of
  [n, P] x [P, C].
At the demo's sizes (batch 16, C=128) and ViT-B/16's (batch 2, C=768). Median of 5 after one warm-up.
Writes evl_mix_cpu.json.
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
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "threads": args.threads, "torch": torch.__version__, "sizes": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evl_mix_cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
