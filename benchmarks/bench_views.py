"""Augmented train views where they should matter: few training clips, validation objects elsewhere.

    python benchmarks/bench_views.py --out benchmarks/results

The demo's six classes (three time-reversed pairs), drawn with `make_demo_videos(placement="shifted")`:
training objects at half size in the top-left quarter of the frame, validation objects at full size about
the centre. Few training clips per class (default 4), the random-weight demo ViT, compact stores. The
training store is extracted once per setting: `--train-views 0` means the deterministic centre view
(no `--train-views`), K > 0 means `mad extract --train-views K --flip no` (the demo's labels name a
direction: a flipped "moving right" is a "moving left"). Validation is always the deterministic view.
Every setting trains the M-adapter branch for the same number of epochs (one view per video per epoch,
so the same steps), over several seeds; per epoch the JSON keeps train top-1 (on the views drawn that
epoch, as training saw them) and val top-1. Writes views_shifted.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

# As `mad` sets it before torch loads OpenMP: on a shared CPU, spinning threads wait for each other's time slices.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def extract_all(args, work: Path) -> dict:
    """Videos and stores: {"val": store, 0: deterministic train store, K: train store with K views}, seconds."""
    from mad.demo import DemoConfig, demo_extract_config
    from mad.extract.run import extract
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(work / "videos", videos_per_class=args.videos_per_class,
                              val_per_class=args.val_per_class, placement="shifted")
    cfg = DemoConfig(out=str(work), progress=False)
    stores, seconds = {}, {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        for key in ["val", *args.views]:
            split = "val" if key == "val" else "train"
            views = {} if key in ("val", 0) else {"train_views": key, "flip": "no"}
            stores[key] = work / "cache" / (f"train-views{key}" if split == "train" else "val")
            started = time.perf_counter()
            extract(demo_extract_config(videos[split], stores[key], cfg, **views))
            seconds[str(key)] = time.perf_counter() - started
    return {"stores": stores, "extract_seconds": seconds}


def train_all(args, work: Path, stores: dict) -> dict:
    from mad.adapt.train import train
    from mad.demo import DemoConfig, demo_train_config

    cfg = DemoConfig(out=str(work), epochs=args.epochs, progress=False)
    results = {}
    for views in args.views:
        runs = []
        for seed in args.seeds:
            run_dir = work / "runs" / f"views{views}-seed{seed}"
            summary = train(demo_train_config(stores[views], stores["val"], "madapter", run_dir, cfg, seed=seed),
                            quiet=True, given=())
            history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            runs.append({"seed": seed, "train_top1": [round(r["train/acc"], 4) for r in history],
                         "val_top1": [round(r["val/acc/top1"], 4) for r in history],
                         "val_top1_last": summary["last/val/acc/top1"], "val_top1_best": summary["val/acc/top1"]})
        results[f"views_{views}"] = {"runs": runs, **summarise(runs)}
    return results


def summarise(runs: list[dict]) -> dict:
    """Means over seeds: per epoch, and the last epoch's."""
    mean = lambda key, e: round(statistics.mean(r[key][e] for r in runs), 4)  # noqa: E731
    epochs = len(runs[0]["val_top1"])
    return {"train_top1_mean_by_epoch": [mean("train_top1", e) for e in range(epochs)],
            "val_top1_mean_by_epoch": [mean("val_top1", e) for e in range(epochs)],
            "train_top1_last": [r["train_top1"][-1] for r in runs], "val_top1_last": [r["val_top1_last"] for r in runs],
            "val_top1_best": [r["val_top1_best"] for r in runs]}


def table(result: dict) -> str:
    """Markdown: per setting, train and val top-1 at a few epochs and the last (means over seeds)."""
    epochs = result["settings"]["epochs"]
    marks = sorted({e for e in (1, epochs // 4, epochs // 2, epochs) if e >= 1})
    head = "| views | " + " | ".join(f"epoch {e}: train / val" for e in marks) + " | val last (min-max) |"
    rows = [head, "|" + "---|" * (len(marks) + 2)]
    for name, r in result["results"].items():
        cells = [f"{r['train_top1_mean_by_epoch'][e - 1]:.3f} / {r['val_top1_mean_by_epoch'][e - 1]:.3f}" for e in marks]
        last = r["val_top1_last"]
        label = "centre (none)" if name == "views_0" else name.split("_")[1]
        rows.append(f"| {label} | " + " | ".join(cells)
                    + f" | {statistics.mean(last):.3f} ({min(last):.3f}-{max(last):.3f}) |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results", help="folder for views_shifted.json")
    parser.add_argument("--work", default="views-work", help="videos, stores and runs go here")
    parser.add_argument("--views", default="0,1,4,8", help="0: the deterministic centre view")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--videos-per-class", type=int, default=4)
    parser.add_argument("--val-per-class", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    args.views = [int(v) for v in args.views.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    from mad.runtime import machine_info

    started = time.perf_counter()
    work = Path(args.work)
    extracted = extract_all(args, work)
    result = {"command": "python benchmarks/bench_views.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine_info("cpu"),
              "settings": {"views": args.views, "seeds": args.seeds, "videos_per_class": args.videos_per_class,
                           "val_per_class": args.val_per_class, "epochs": args.epochs, "placement": "shifted",
                           "flip": "no", "crop_scale": "0.08,1", "crop_ratio": "3/4,4/3", "arch": "madapter"},
              "extract_seconds": extracted["extract_seconds"],
              "results": train_all(args, work, extracted["stores"])}
    result["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "views_shifted.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"{result['seconds']:.0f} s; wrote {out / 'views_shifted.json'}")


if __name__ == "__main__":
    main()
