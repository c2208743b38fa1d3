"""A 4-configuration sweep (2 lr x 2 weight decays): stacked vs one after another in lockstep vs 4 `mad train`.

    PYTHONPATH=. python benchmarks/bench_stack.py [--repeats 3] [--epochs 3] [--videos-per-class 8]

Three sides, each driven through the command line as a user runs it, from one compact store of the
demo's synthetic videos streamed from disk (`--in-ram no`), under `mad.bench.tree` (wall seconds,
bytes the process tree read through read(), peak resident memory of the tree):

    stacked      mad sweep --grid 'lr=A,B weight_decay=C,D'         (one read, one stacked model of 4)
    lockstep     the same with --max-stack 1                         (one read, the 4 step one after another)
    4 x train    mad train, once per grid point, one after another   (4 reads, 4 start-ups)

The sides run back to back in a rotating order (a shared machine drifts); every figure is min / median
/ max over the repeats, and the ratios are taken within a repeat. A step micro-benchmark beside them
times one training step of the 4 members in-process, stacked (vmap) vs one after another, on a batch
of the same store: what stacking saves once reading and start-up are out of the picture.
Writes benchmarks/results/stack_cpu.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import torch

from mad.bench.sweep import build_store
from mad.bench.tree import run_measured
from mad.runtime import machine_info

GRID = [dict(lr=lr, weight_decay=wd) for lr in (1e-3, 5e-4) for wd in (0.05, 0.01)]
SIDES = ("stacked", "lockstep", "train")


def commands(cache: str, val: str, out: Path, args) -> dict[str, list[list[str]]]:
    mad = [sys.executable, "-m", "mad"]
    common = ["--cache", cache, "--val", val, "--epochs", str(args.epochs), "--in-ram", "no",
              "--batch-size", str(args.batch_size), "--device", "cpu"]
    grid = (f"width={args.width}; heads={args.heads}; dropout={args.dropout}; "
            f"lr={','.join(dict.fromkeys(str(p['lr']) for p in GRID))} "
            f"; weight_decay={','.join(dict.fromkeys(str(p['weight_decay']) for p in GRID))}")
    sweep = [*mad, "sweep", "--grid", grid, *common]
    return {"stacked": [[*sweep, "--out", str(out / "stacked")]],
            "lockstep": [[*sweep, "--max-stack", "1", "--out", str(out / "lockstep")]],
            "train": [[*mad, "train", *common, "--width", str(args.width), "--heads", str(args.heads),
                       "--dropout", str(args.dropout), "--lr", str(p["lr"]), "--weight-decay", str(p["weight_decay"]),
                       "--out", str(out / f"train-{i}")] for i, p in enumerate(GRID)]}


def run_side(cmds: list[list[str]], work: Path, tag: str) -> dict:
    total = {"seconds": 0.0, "rchar": 0, "peak_tree_rss": 0}
    for i, cmd in enumerate(cmds):
        shutil.rmtree(cmd[cmd.index("--out") + 1], ignore_errors=True)
        measured = run_measured(cmd, work / f"{tag}-{i}.json", work / f"{tag}-{i}.log")
        if measured["returncode"] != 0:
            sys.exit(f"{shlex.join(cmd)} failed: {(work / f'{tag}-{i}.log').read_text()[-2000:]}")
        total["seconds"] += measured["seconds"]
        total["rchar"] += measured["rchar"]
        total["peak_tree_rss"] = max(total["peak_tree_rss"], measured["peak_tree_rss"])
    return total


def spread(values) -> dict:
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "max": values[-1]}


def step_benchmark(cache: str, args, repeats: int = 5, steps: int = 3) -> dict:
    """Seconds of one training step of the 4 grid members: one stacked model vs 4 models one after another."""
    from mad.adapt.config import TrainConfig, resolve
    from mad.adapt.layers import dropout_key
    from mad.adapt.families import build_model, family
    from mad.adapt.stacked import Stack
    from mad.adapt.step import make_optimizer, train_step
    from mad.cache.dataset import open_tokens
    from mad.cache.store import Store

    store = Store.open(cache)
    data = open_tokens(store, "yes", 0, progress=False)
    cfg = TrainConfig(cache=cache, width=args.width, heads=args.heads, dropout=args.dropout, batch_size=args.batch_size)
    cfg, branch = resolve(cfg, store.manifest, len(store.class_names) or 2, cache)
    arrays, labels, _, _ = next(iter(data.train_batches(args.batch_size, 0, 1)))
    inputs = family(cfg.arch).inputs(data.to_device(arrays, "cpu"), data.manifest)

    def members():
        out = []
        for p in GRID:
            model = build_model(branch).train()
            c = types.SimpleNamespace(weight_decay=p["weight_decay"], clip_grad=cfg.clip_grad,
                                      label_smoothing=cfg.label_smoothing)
            out.append(types.SimpleNamespace(model=model, optimizer=make_optimizer(model, p["lr"], p["weight_decay"]),
                                             cfg=c, branch=branch, autocast=None))
        return out
    stack, alone = Stack(members()), members()
    key = torch.tensor(1)

    def stacked():
        stack.step(inputs, labels, key.expand(len(GRID)), 1 / len(labels))

    def one_by_one():
        for m in alone:
            with dropout_key(key):
                train_step(lambda: m.model(inputs), labels, m.optimizer, m.model.parameters(), None,
                           m.cfg.label_smoothing, m.cfg.clip_grad)
    timings = {"stacked": [], "one_by_one": []}
    for fn in (stacked, one_by_one):  # warm-up
        fn()
    for r in range(repeats):
        for name, fn in (("stacked", stacked), ("one_by_one", one_by_one))[:: 1 if r % 2 == 0 else -1]:
            started = time.perf_counter()
            for _ in range(steps):
                fn()
            timings[name].append((time.perf_counter() - started) / steps)
    data.close()
    ratios = [a / b for a, b in zip(timings["stacked"], timings["one_by_one"])]
    return {"members": len(GRID), "batch_size": args.batch_size, "steps_per_timing": steps, "repeats": repeats,
            "seconds_per_step": {k: spread(v) for k, v in timings.items()},
            "stacked_over_one_by_one": spread(ratios)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--videos-per-class", type=int, default=8)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--store", help="a compact store built before (its train/ and val/); default: build the "
                        "demo's with --videos-per-class")
    parser.add_argument("--out", default="benchmarks/results/stack_cpu.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mad-bench-stack-") as tmp:
        work = Path(tmp)
        if args.store:  # a demo store built before: <store>/train and <store>/val
            cache, val = f"{args.store}/train", f"{args.store}/val"
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*random weights.*")
                cache, val = build_store(work, args.videos_per_class, 2)
        from mad.cache.dataset import usable_videos
        from mad.cache.store import Store
        clips = len(usable_videos(Store.open(cache)))
        step = step_benchmark(cache, args)
        print("step:", json.dumps(step["seconds_per_step"]), json.dumps(step["stacked_over_one_by_one"]))
        runs = []
        for repeat in range(args.repeats):
            order = SIDES[repeat % 3:] + SIDES[:repeat % 3]
            cmds = commands(cache, val, work / f"r{repeat}", args)
            for side in order:
                measured = run_side(cmds[side], work, f"r{repeat}-{side}")
                runs.append({"repeat": repeat, "side": side, **measured})
                print(repeat, side, f"{measured['seconds']:.1f}s", f"{measured['rchar'] / 1e6:.1f} MB")
        shown = commands("STORE/train", "STORE/val", Path("OUT"), args)
    by = {(r["repeat"], r["side"]): r for r in runs}
    results = {side: {f: spread([r[f] for r in runs if r["side"] == side]) for f in ("seconds", "rchar",
                                                                                     "peak_tree_rss")}
               for side in SIDES}
    for a, b in (("stacked", "train"), ("lockstep", "train"), ("stacked", "lockstep")):
        results[f"{a}_over_{b}"] = {f: spread([by[(r, a)][f] / by[(r, b)][f] for r in range(args.repeats)])
                                    for f in ("seconds", "rchar")}
    result = {"command": "PYTHONPATH=. python benchmarks/bench_stack.py " + shlex.join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "machine": machine_info("cpu"),
              "settings": {"clips": clips, "grid": GRID, "store": "compact", "streamed": True, **vars(args)},
              "commands": {side: [shlex.join(c[1:]).replace("-m mad", "mad", 1) for c in cmds]
                           for side, cmds in shown.items()},
              "step": step, "results": results, "runs": runs,
              "done_when": {"sweep_not_slower_than_4_trains": results["stacked_over_train"]["seconds"]["median"] <= 1}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key in ("stacked_over_train", "lockstep_over_train", "stacked_over_lockstep"):
        print(key, {f: f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})" for f, v in results[key].items()})


if __name__ == "__main__":
    main()
