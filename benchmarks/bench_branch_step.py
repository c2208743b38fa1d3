"""One M-adapter training step from cached-shape tokens, for several `--cell-size` settings side by side.

    python benchmarks/bench_branch_step.py                          # ViT-B-16 shapes, batch 8
    python benchmarks/bench_branch_step.py --tokens 257 --in-width 1024 --batch 4 --name ViT-L-14

Builds the branch as `mad train` does (its BranchConfig defaults: width 384, heads 6, depth 1,
correlation 1) for each `--cell-size` setting, feeds random float16 levels of the cached shape, and
times `mad.adapt.step.train_step` (forward, cross-entropy with `mad train`'s smoothing, backward,
clipping, AdamW). Settings alternate within each round, so a noisy machine slows them alike. Reports
min / median / max step time per setting over the rounds (after a warm-up step) and writes
benchmarks/results/branch_step_cpu_<name>.json with the command and date.
"""

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from mad.adapt.branch import BranchConfig
from mad.adapt.families import build_model, family
from mad.adapt.step import make_optimizer, train_step
from mad.runtime import machine_info


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=197, help="N = 1 + H*W (197: ViT-B/16 at 224 px)")
    parser.add_argument("--in-width", type=int, default=768, help="D, the backbone's width")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--cell-sizes", default="1,auto", help="comma-separated --cell-size settings")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    parser.add_argument("--name", default="ViT-B-16", help="shapes' name, for the JSON file")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    torch.manual_seed(0)
    levels = [torch.randn(args.batch, args.frames, args.tokens, args.in_width).half() for _ in range(args.levels)]
    labels = torch.randint(0, 174, (args.batch,))
    settings = [(cell, precision) for precision in args.precisions.split(",") for cell in args.cell_sizes.split(",")]
    times = {setting: [] for setting in settings}
    for _ in range(args.rounds):
        for cell, precision in settings:
            torch.manual_seed(0)
            model = build_model(BranchConfig(num_levels=args.levels, in_width=args.in_width, num_tokens=args.tokens,
                                             num_frames=args.frames, num_classes=174, cell_size=cell))
            optimizer = make_optimizer(model, 1e-3, 0.05)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
            for step in range(args.steps + 1):
                started = time.perf_counter()
                train_step(lambda: model(levels), labels, optimizer, model.parameters(), autocast)
                if step:  # the first step warms up the allocator
                    times[cell, precision].append(time.perf_counter() - started)
    side = int((args.tokens - 1) ** 0.5)
    first = statistics.median(times[settings[0]])
    rows = []
    for (cell, precision), seconds in times.items():
        n = int(family("madapter").check(BranchConfig(num_tokens=args.tokens, in_width=args.in_width,
                                                   cell_size=cell)).cell_size)
        cells = -(-side // n)
        median = statistics.median(seconds)
        rows.append({"cell_size": cell, "resolved": n, "branch_grid": f"{cells}x{cells}", "precision": precision,
                     "step_seconds": {"min": min(seconds), "median": median, "max": max(seconds)},
                     "median_vs_first": median / first})
        print(f"--cell-size {cell:>4} ({side}x{side} -> {cells}x{cells}), {precision}: step {min(seconds):.3f} / "
              f"{median:.3f} / {max(seconds):.3f} s (min / median / max), median {median / first:.2f}x the first")
    result = {"benchmark": "branch_step", "command": shlex.join(["python", *sys.argv]),
              "date": datetime.date.today().isoformat(), "machine": machine_info("cpu"), "settings": vars(args),
              "rows": rows}
    path = Path(args.out) / f"branch_step_cpu_{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
