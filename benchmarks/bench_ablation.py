"""The branch's design choices, one at a time, on the demo's time-reversed classes.

Builds the demo videos (fewer per class than `mad demo`, so the task does not
saturate), extracts them once into a full store (every variant can read it), then
trains each variant with `mad train`'s code over several seeds and writes a table:
val top-1 of the last epoch (not the best one: picking the best epoch on val
flatters), mean and min-max over seeds, trainable parameters and seconds per epoch.

    python benchmarks/bench_ablation.py --out benchmarks/results

Writes ablation_demo.json (with this command, date and machine) and ablation_demo.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

# name -> TrainConfig overrides: the default branch, then one change each
VARIANTS = {
    "madapter (defaults)": {},
    "no motion input (--no-motion)": {"motion": False},
    "no correlation input (--correlation 0)": {"correlation": 0},
    "every patch, no cells (--cell-size 1)": {"cell_size": "1"},
    "temporal conv3d (--temporal conv3d)": {"temporal": "conv3d"},
    "meanpool (static baseline)": {"arch": "meanpool"},
    "linear (CLS probe)": {"arch": "linear"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON and the table")
    parser.add_argument("--work", default="ablation-work", help="videos, cache and runs go here")
    parser.add_argument("--videos-per-class", type=int, default=24)
    parser.add_argument("--val-per-class", type=int, default=16)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--variants", default=None, help="comma-separated subset of the names (default: all)")
    parser.add_argument("--table-only", action="store_true", help="re-render ablation_demo.md from its JSON in --out")
    args = parser.parse_args()
    if args.table_only:
        print(write_table(json.loads((Path(args.out) / "ablation_demo.json").read_text()), Path(args.out)))
        return

    from mad.adapt.train import train
    from mad.demo import DemoConfig, demo_train_config, extract_demo
    from mad.runtime import machine_info

    cfg = DemoConfig(out=args.work, videos_per_class=args.videos_per_class, val_per_class=args.val_per_class,
                     epochs=args.epochs, progress=False)
    work = Path(args.work)
    extract_demo(cfg, store="full")

    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = VARIANTS if args.variants is None else {k: VARIANTS[k] for k in args.variants.split(",")}
    rows = {}
    for name, overrides in chosen.items():
        runs = []
        settings = {"arch": "madapter", **overrides}
        arch = settings.pop("arch")
        for seed in seeds:
            run_dir = work / "runs" / f"{len(rows)}-seed{seed}"
            started = time.perf_counter()
            summary = train(demo_train_config(work / "cache" / "train", work / "cache" / "val", arch, run_dir, cfg,
                                              seed=seed, **settings), quiet=True)
            seconds = time.perf_counter() - started
            runs.append({"seed": seed, "val_top1_last": summary["last/val/acc/top1"],
                         "val_top1_best": summary["val/acc/top1"], "parameters": summary["parameters"],
                         "seconds_per_epoch": seconds / args.epochs})
            print(f"{name}, seed {seed}: val top-1 {runs[-1]['val_top1_last']:.3f} (last epoch)", flush=True)
        last = [r["val_top1_last"] for r in runs]
        rows[name] = {"overrides": overrides, "runs": runs, "val_top1_last_mean": statistics.mean(last),
                      "val_top1_last_min": min(last), "val_top1_last_max": max(last),
                      "parameters": runs[0]["parameters"],
                      "seconds_per_epoch_median": statistics.median(r["seconds_per_epoch"] for r in runs)}

    result = {"command": " ".join(["python", *sys.argv]), "date": datetime.date.today().isoformat(),
              "machine": machine_info("cpu"),
              "settings": {"videos_per_class": args.videos_per_class, "val_per_class": args.val_per_class,
                           "epochs": args.epochs, "seeds": seeds, "store": "full", "demo_model": "mad-demo-vit",
                           "classes": 6},
              "variants": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation_demo.json").write_text(json.dumps(result, indent=2) + "\n")
    print(write_table(result, out))


def write_table(result: dict, out: Path) -> str:
    """ablation_demo.md from the result (`--table-only` re-renders it from the committed JSON)."""
    s = result["settings"]
    seeds = ",".join(map(str, s["seeds"]))
    lines = [f"# Branch ablation on the demo's time-reversed classes ({result['date']})", "",
             f"Command: `{result['command']}`. Demo videos, {s['videos_per_class']} train / {s['val_per_class']} "
             f"val clips per class (6 classes: 3 pairs, each the time reversal of the other), random-weight demo "
             f"ViT, full store, {s['epochs']} epochs, seeds {seeds}. Val top-1 of the last epoch: mean "
             f"(min-max over seeds). Static models cannot beat 1/2 within a pair. Seconds per epoch (training "
             f"and validation; a full store computes the branch's inputs every step): median (min-max) over seeds.",
             "", "| variant | val top-1 | trainable params | s / epoch |", "|---|---:|---:|---:|"]
    for name, row in result["variants"].items():
        seconds = [r["seconds_per_epoch"] for r in row["runs"]]
        lines.append(f"| {name} | {row['val_top1_last_mean']:.3f} ({row['val_top1_last_min']:.3f}-"
                     f"{row['val_top1_last_max']:.3f}) | {row['parameters']:,} | "
                     f"{statistics.median(seconds):.2f} ({min(seconds):.2f}-{max(seconds):.2f}) |")
    table = "\n".join(lines) + "\n"
    (out / "ablation_demo.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
