"""How long `mad demo` takes, alone and beside another CPU-bound process, and what it shows.

    python benchmarks/bench_demo_time.py --out benchmarks/results [--repeats 3] [--beside none,torch]

Each run is a fresh `python -m mad demo --out <tmp>` process (videos drawn, extracted, three archs trained),
timed as a whole (imports included). `--beside torch` runs a second process next to it for the whole run:
plain PyTorch, two threads, matrix products in a loop, OpenMP left at its default (spinning) wait policy, as
a user's other job would be. Writes demo_time.json (every run: wall seconds, the demo's own seconds, each
arch's last-epoch val top-1, the load average before it) and demo_time.md (min / median / max per mode).
Run it on an otherwise idle machine: the "none" mode is the idle figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HOG = """
import torch, time
torch.set_num_threads(2)
x = torch.randn(384, 384)
while True:
    for _ in range(20):
        y = torch.tanh(x @ x)
"""


def one_run(work: Path, beside: str) -> dict:
    hog = None
    if beside == "torch":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
        hog = subprocess.Popen([sys.executable, "-c", HOG], env=env)
        time.sleep(3)  # the other process is busy before the demo starts
    load = os.getloadavg()[0]
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "mad", "demo", "--out", str(work)], capture_output=True,
                              text=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"mad demo failed ({done.returncode}):\n{done.stderr[-2000:]}")
    report = json.loads((work / "demo.json").read_text())
    return {"beside": beside, "wall_seconds": round(wall, 1), "demo_seconds": round(report["seconds"], 1),
            "load_before": round(load, 2), "epochs": report["config"]["epochs"],
            "val_top1_last": {arch: r["val_top1_last"] for arch, r in report["results"].items()}}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def table(report: dict) -> str:
    lines = [f"# `mad demo`: time alone and beside another process", "",
             f"Command: `{report['command']}`. Machine: {report['machine']['cpu']}, {report['machine']['cores']} "
             f"cores. Each run a fresh `python -m mad demo` process (videos, extraction, {report['runs'][0]['epochs']} "
             "epochs each of madapter, meanpool, linear); wall seconds include Python's start-up. 'torch' = beside "
             "a plain PyTorch process (2 threads, matrix products, OpenMP's default spinning wait).", "",
             "| beside | runs | wall s min / median / max | madapter val top-1 (per run) | meanpool | linear |",
             "|---|---:|---|---|---|---|"]
    for mode, summary in report["modes"].items():
        runs = [r for r in report["runs"] if r["beside"] == mode]
        accs = {arch: ", ".join(f"{r['val_top1_last'][arch]:.3f}" for r in runs) for arch in runs[0]["val_top1_last"]}
        w = summary["wall_seconds"]
        lines.append(f"| {mode} | {len(runs)} | {w['min']:.0f} / {w['median']:.0f} / {w['max']:.0f} | "
                     f"{accs.get('madapter', '')} | {accs.get('meanpool', '')} | {accs.get('linear', '')} |")
    if "ratio_median" in report:
        lines += ["", f"Beside / alone, medians: **{report['ratio_median']:.2f}x**."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--beside", default="none,torch", help="Comma-separated: none, torch.")
    parser.add_argument("--out", type=Path, default=None, help="Folder for demo_time.json and .md.")
    args = parser.parse_args()
    from mad.runtime import machine_info

    modes = [m.strip() for m in args.beside.split(",") if m.strip()]
    runs = []
    with tempfile.TemporaryDirectory(prefix="mad-demo-time-") as tmp:
        for mode in modes:
            for i in range(args.repeats):
                row = one_run(Path(tmp) / f"{mode}-{i}", mode)
                print(json.dumps(row), flush=True)
                runs.append(row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {"command": "python benchmarks/bench_demo_time.py " + " ".join(sys.argv[1:]), "commit": commit,
              "machine": machine_info("cpu"), "runs": runs,
              "modes": {m: {"wall_seconds": spread([r["wall_seconds"] for r in runs if r["beside"] == m])}
                        for m in modes}}
    if {"none", "torch"} <= set(modes):
        report["ratio_median"] = (report["modes"]["torch"]["wall_seconds"]["median"]
                                  / report["modes"]["none"]["wall_seconds"]["median"])
    print(table(report))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "demo_time.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "demo_time.md").write_text(table(report))


if __name__ == "__main__":
    main()
