"""One M-adapter training step from cached-shape tokens, grid pooling off and on, side by side.

    python benchmarks/bench_branch_step.py                          # ViT-B-16 shapes, batch 8
    python benchmarks/bench_branch_step.py --tokens 257 --in-width 1024 --batch 4   # ViT-L-14 shapes

Builds the branch exactly as `mad train` does (width 384, heads 6, depth 1, correlation 1) for
each `--grid-pool` setting, feeds random float16 levels of the cached shape, and times forward,
cross-entropy, backward and AdamW step. Settings alternate within each round, so a noisy
machine slows them alike; the figure per setting is its fastest step over the rounds (after a
warm-up step). Prints seconds per step and each setting's ratio to the first.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

from mad.adapt.madapter import build_model, resolve_grid_pool


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=197, help="N = 1 + H*W (197: ViT-B/16 at 224 px)")
    parser.add_argument("--in-width", type=int, default=768, help="D, the backbone's width")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--grid-pools", default="1,auto", help="comma-separated --grid-pool settings")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32 and/or bf16 (autocast)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per setting and round")
    args = parser.parse_args()

    torch.manual_seed(0)
    levels = [torch.randn(args.batch, args.frames, args.tokens, args.in_width).half() for _ in range(args.levels)]
    labels = torch.randint(0, 174, (args.batch,))
    settings = [(pool, precision) for precision in args.precisions.split(",") for pool in args.grid_pools.split(",")]
    best = {setting: float("inf") for setting in settings}
    for _ in range(args.rounds):
        for pool, precision in settings:
            torch.manual_seed(0)
            model = build_model("madapter", args.levels, args.in_width, args.tokens, args.frames, 174,
                                width=384, heads=6, grid_pool=pool)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for step in range(args.steps + 1):
                started = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    loss = F.cross_entropy(model(levels).float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if step:  # the first step warms up the allocator
                    best[pool, precision] = min(best[pool, precision], time.perf_counter() - started)
    side = int((args.tokens - 1) ** 0.5)
    first = best[settings[0]]
    rows = []
    for (pool, precision), seconds in best.items():
        n = resolve_grid_pool(pool, args.tokens)
        cells = -(-side // n)
        rows.append({"grid_pool": pool, "resolved": n, "branch_grid": f"{cells}x{cells}", "precision": precision,
                     "step_seconds": round(seconds, 3), "vs_first": round(seconds / first, 3)})
        print(f"--grid-pool {pool:>4} ({side}x{side} -> {cells}x{cells}), {precision}: {seconds:.3f} s / step, "
              f"{seconds / first:.2f}x the first")
    print(json.dumps({"settings": vars(args), "threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
