"""M-adapter, EVL and the two static baselines side by side: demo accuracy, size, speed, memory.

    python benchmarks/bench_demo_archs.py --out benchmarks/results

1. The demo, as `mad demo --archs madapter,evl,meanpool,linear` builds and trains it (64 train /
   16 val clips per class of 3 time-reversed pairs, the random-weight demo ViT, one compact store
   extracted with `--branches madapter,evl`, 30 epochs, each arch with its own defaults), over
   several training seeds (the videos stay those of seed 0): val top-1 of the last epoch (not the
   best one: picking the best epoch on val flatters), trainable parameters, and training seconds
   per step (median over the epochs after the first, from each run's metrics.jsonl).
2. ViT-B/16 with random weights (memory and time do not depend on them), `mad bench memory`'s
   harness: each arch trained from the cache and online (backbone under no_grad), every mode in
   a fresh process: peak memory, step time, trainable parameters. The in-backbone adapter (the
   method that backpropagates through the backbone) is the reference row.

Writes demo_archs.json (with this command, date and machine) and demo_archs.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

ARCHS = ("madapter", "evl", "meanpool", "linear")


def demo_runs(args) -> dict:
    """Part 1: every arch over every seed on one demo cache."""
    from mad.adapt.config import with_preset
    from mad.adapt.train import train
    from mad.demo import DemoConfig, demo_train_config, extract_demo

    cfg = DemoConfig(out=args.work, videos_per_class=args.videos_per_class, val_per_class=args.val_per_class,
                     epochs=args.epochs, archs=tuple(args.archs), progress=False)
    work = Path(args.work)
    extract_demo(cfg, ("madapter", "evl"))

    rows = {}
    for arch in args.archs:
        runs = []
        for seed in args.seeds:
            run_dir = work / "runs" / f"{arch}-seed{seed}"
            train_cfg = demo_train_config(work / "cache" / "train", work / "cache" / "val", arch, run_dir, cfg,
                                          seed=seed)
            summary = train(train_cfg, quiet=True, given=())  # each arch's own preset
            train_cfg = with_preset(train_cfg, given=())
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            clips = 6 * args.videos_per_class
            steps = math.ceil(clips / train_cfg.batch_size)
            step_seconds = statistics.median(clips / row["clips_per_second"] / steps for row in history[1:] or history)
            runs.append({"seed": seed, "val_top1_last": summary["last/val/acc/top1"],
                         "val_top1_best": summary["val/acc/top1"], "parameters": summary["parameters"],
                         "step_seconds": step_seconds, "batch_size": train_cfg.batch_size, "lr": train_cfg.lr})
            print(f"{arch}, seed {seed}: val top-1 {runs[-1]['val_top1_last']:.3f} (last epoch), "
                  f"{step_seconds:.3f} s / step", flush=True)
        last = [r["val_top1_last"] for r in runs]
        rows[arch] = {"runs": runs, "val_top1_last_mean": statistics.mean(last), "val_top1_last_min": min(last),
                      "val_top1_last_max": max(last), "parameters": runs[0]["parameters"],
                      "step_seconds_median": statistics.median(r["step_seconds"] for r in runs)}
    return rows


def memory_runs(args) -> dict:
    """Part 2: each arch from the cache and online at the real backbone's size, one fresh process per mode."""
    from mad.bench.memory import resolve_config, run_child

    cfg = resolve_config(args.memory_model, frames=8, batch=args.memory_batch, layers=args.memory_layers,
                         device="cpu", precision="bf16", steps=args.memory_steps, classes=args.classes,
                         branch_width=args.memory_width)
    rows = {"config": asdict(cfg), "modes": {}}
    for mode in ["in-backbone-adapter"] + [f"{arch}-{where}" for arch in args.archs for where in ("cached", "online")]:
        print(f"{mode}: batch {cfg.batch} x {cfg.frames} frames ...", flush=True)
        row = run_child(cfg, mode)
        if "peak_bytes" not in row:
            raise SystemExit(f"{mode} did not finish: {row}")
        rows["modes"][mode] = row
    return rows


def write_table(result: dict, out: Path) -> str:
    demo, memory = result["demo"], result["memory"]
    settings = result["settings"]
    modes = memory["modes"]
    reference = modes["in-backbone-adapter"]["peak_bytes"]
    config = memory["config"]
    gib = 2 ** 30
    lines = [
        f"# M-adapter, EVL and the static baselines side by side ({result['date']})", "",
        f"Command: `{result['command']}` (this project's 2-core CPU).", "",
        f"**Demo** (columns 2-4): `mad demo`'s videos ({settings['videos_per_class']} train / "
        f"{settings['val_per_class']} val clips per class; 6 classes in 3 exactly time-reversed pairs, so a static "
        f"model cannot beat 1/2 within a pair), its random-weight ViT (4 blocks, width 128), one compact store "
        f"extracted with `--branches madapter,evl`, {settings['epochs']} epochs, batch 16, each arch with its "
        f"defaults. Val top-1 of the last epoch: mean (min-max) over training seeds "
        f"{', '.join(map(str, settings['seeds']))}; step: training seconds per step (median over the epochs after the first), median (min-max) over seeds.", "",
        f"**ViT-B/16** (columns 5-9): random weights, {config['frames']} frames, batch {config['batch']}, "
        f"{config['classes']} classes, M-adapter levels {', '.join(map(str, config['layers']))} at width "
        f"{config['branch_width']}, EVL on the last {config['evl_layers']} blocks with its defaults; backbone bf16 "
        f"(CPU: no autocast), heads fp32; peak memory = peak RSS of a fresh process per mode, data loading "
        f"excluded (`mad bench memory`'s harness); x = of the in-backbone adapter "
        f"({reference / gib:.2f} GiB, {modes['in-backbone-adapter']['step_seconds_median']:.2f} s / step), "
        f"which backpropagates through the backbone.", "",
        "| arch | demo val top-1 | demo params | demo step | ViT-B/16 params | peak, cached | peak, online "
        "| step, cached | step, online |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arch, row in demo.items():
        cached, online = modes[f"{arch}-cached"], modes[f"{arch}-online"]
        steps = [r["step_seconds"] for r in row["runs"]]
        lines.append(
            f"| {arch} | {row['val_top1_last_mean']:.3f} ({row['val_top1_last_min']:.3f}-{row['val_top1_last_max']:.3f})"
            f" | {row['parameters']:,} | {row['step_seconds_median']:.3f} s ({min(steps):.3f}-{max(steps):.3f})"
            f" | {cached['trainable_parameters']:,}"
            f" | {cached['peak_bytes'] / gib:.2f} GiB ({cached['peak_bytes'] / reference:.3f}x)"
            f" | {online['peak_bytes'] / gib:.2f} GiB ({online['peak_bytes'] / reference:.3f}x)"
            f" | {cached['step_seconds_median']:.2f} s | {online['step_seconds_median']:.2f} s |")
    table = "\n".join(lines) + "\n"
    (out / "demo_archs.md").write_text(table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the table")
    parser.add_argument("--work", default="demo-archs-work", help="videos, cache and runs go here")
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--videos-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--memory-model", default="ViT-B-16", help="open_clip name or model-config .json")
    parser.add_argument("--memory-layers", default="4,8,12")
    parser.add_argument("--memory-batch", type=int, default=2)
    parser.add_argument("--memory-width", type=int, default=384, help="M-adapter width at that size")
    parser.add_argument("--memory-steps", type=int, default=5)
    parser.add_argument("--classes", type=int, default=174, help="classes of the ViT-B/16 heads")
    parser.add_argument("--table-only", action="store_true", help="re-render demo_archs.md from its JSON in --out")
    args = parser.parse_args()
    if args.table_only:
        print(write_table(json.loads((Path(args.out) / "demo_archs.json").read_text()), Path(args.out)))
        return
    args.archs = args.archs.split(",")
    args.seeds = [int(s) for s in args.seeds.split(",")]

    from mad.runtime import machine_info

    started = time.perf_counter()
    memory = memory_runs(args)  # first: its step times are the ones a noisy machine disturbs most
    demo = demo_runs(args)
    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "machine": machine_info("cpu"), "seconds": time.perf_counter() - started,
              "settings": {"videos_per_class": args.videos_per_class, "val_per_class": args.val_per_class,
                           "epochs": args.epochs, "seeds": args.seeds, "store": "compact",
                           "branches": "madapter,evl", "demo_model": "mad-demo-vit", "classes": 6},
              "demo": demo, "memory": memory}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_archs.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_table(result, out))


if __name__ == "__main__":
    main()
