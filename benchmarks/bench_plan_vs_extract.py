"""`mad plan`'s extraction time against `mad extract` on the same clips, for both storage modes.

    PYTHONPATH=. python benchmarks/bench_plan_vs_extract.py --videos ../shared/data/k2/train --limit 16 \\
        --model ViT-B-16 --rounds 2 --out benchmarks/results

Random weights (speed does not depend on them), the extraction's defaults otherwise (batch 4, its
decode workers, this machine's torch threads). Per round: `mad plan` on the clips (its probe), then
`mad extract` into a fresh store in each mode (full first in odd rounds, compact first in even ones).
Measured seconds per video: after the first batch (what a long run sees: the plan predicts no
start-up), and over the whole run. The previous plan's formula (decode + model, + the compact
arrays; no writing, no overlap) is given from the same probe.
The load average (1 min) before and after each step is recorded: the machine is shared.
Writes plan_vs_extract_cpu_<model>.json and plan_vs_extract.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mad.bench import video_subset  # noqa: E402
from mad.extract.run import ExtractConfig, extract  # noqa: E402
from mad.plan import MODES, PlanConfig, plan  # noqa: E402
from mad.runtime import machine_info  # noqa: E402


def load() -> float:
    return round(os.getloadavg()[0], 2)


def one_round(videos: Path, root: Path, args, order: tuple) -> dict:
    loads = {"before_plan": load()}
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        planned = plan(PlanConfig(videos=str(videos), model=args.model, layers=args.layers, frames=args.frames,
                                  batch_size=args.batch_size, probe=args.probe))
    plan_seconds = time.perf_counter() - started
    split, probe = planned["splits"]["train"], planned["probe"]
    decode, model = probe["decode_per_clip"], probe["model_per_view"]
    previous = {"full": decode + model, "compact": decode + model + probe["arrays_per_view"]["compact"]}
    result = {"plan_seconds": plan_seconds, "probe": probe, "order": list(order), "modes": {}}
    for mode in order:
        loads[f"before_{mode}"] = load()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = extract(ExtractConfig(videos=str(videos), out=str(root / mode), model=args.model, pretrained="none",
                                      layers=args.layers, frames=args.frames, batch_size=args.batch_size, store=mode,
                                      progress=False))
        steady = (s["seconds"] - s["first_batch_seconds"]) / (s["done_now"] - s["first_batch_clips"])
        predicted = split["modes"][mode]["extraction_seconds"] / split["num_videos"]
        result["modes"][mode] = {
            "predicted_seconds_per_video": predicted, "measured_seconds_per_video": steady,
            "predicted_over_measured": predicted / steady,
            "whole_run_seconds_per_video": s["seconds"] / s["done_now"],
            "first_batch_seconds": s["first_batch_seconds"],
            "videos": s["done_now"], "previous_formula_seconds_per_video": previous[mode],
            "previous_formula_over_measured": previous[mode] / steady}
    loads["after"] = load()
    result["load_average_1min"] = loads
    return result


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    lines = [f"# `mad plan` against `mad extract` ({s['model']}, {report['machine']['device']})", "",
             "Command:", "```", report["command"], "```",
             f"{report['date']}; {s['clips']} clips of {s['videos']}, {s['model']} random weights, "
             f"layers {s['layers']}, "
             f"T={s['frames']}, batch {s['batch_size']}, the extraction's default decode workers, "
             f"{report['machine']['cores']} cores, {report['machine']['torch_threads']} torch threads. "
             "Measured: seconds per video after the first batch (what a long run sees; the plan predicts no "
             "start-up). The previous plan's formula (decode + model, + the compact arrays) from the same probe.",
             "", "| round (order) | store | predicted s/video | measured s/video | predicted / measured "
             "| whole run s/video | previous formula / measured | load (1 min) before plan, extract, after |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(report["rounds"], 1):
        loads = r["load_average_1min"]
        for mode, m in r["modes"].items():
            lines.append(f"| {i} ({' then '.join(r['order'])}) | {mode} | {m['predicted_seconds_per_video']:.2f} "
                         f"| {m['measured_seconds_per_video']:.2f} | **{m['predicted_over_measured']:.2f}** "
                         f"| {m['whole_run_seconds_per_video']:.2f} | {m['previous_formula_over_measured']:.2f} "
                         f"| {loads['before_plan']}, {loads[f'before_{mode}']}, {loads['after']} |")
    p = report["rounds"][0]["probe"]
    for mode in MODES:
        ratios = [r["modes"][mode]["predicted_over_measured"] for r in report["rounds"]]
        lines += ["", f"{mode}: predicted / measured " + ", ".join(f"{x:.2f}" for x in ratios)
                  + f" (target within 1.5x: {'met' if all(1 / 1.5 <= x <= 1.5 for x in ratios) else 'missed'})"]
    lines += ["", f"Probe of round 1, seconds: decode {p['decode_per_clip']:.3f} per clip ({p['workers']} worker); per "
              f"video-view model {p['model_per_view']:.3f}, arrays full {p['arrays_per_view']['full']:.3f} / compact "
              f"{p['arrays_per_view']['compact']:.3f}, writing full {p['write_per_view']['full']:.3f} / compact "
              f"{p['write_per_view']['compact']:.3f}. Figures: `{report['json']}`.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", required=True)
    parser.add_argument("--limit", type=int, default=16)
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--layers", default="4,8,12")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--probe", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mad-plan-vs-extract-") as folder:
        videos = video_subset(args.videos, args.limit, Path(folder) / "videos")
        rounds = [one_round(videos, Path(folder) / f"round{i}", args, MODES if i % 2 == 0 else MODES[::-1])
                  for i in range(args.rounds)]
    name = f"plan_vs_extract_{machine_info()['device']}_{Path(args.model).stem}.json"
    report = {"benchmark": "plan_vs_extract", "command": shlex.join(["python", *sys.argv]),
              "date": datetime.date.today().isoformat(), "machine": machine_info(), "json": name,
              "settings": {"videos": args.videos, "clips": args.limit, "model": args.model, "layers": args.layers,
                           "frames": args.frames, "batch_size": args.batch_size, "probe": args.probe,
                           "weights": "random"},
              "rounds": rounds}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, out / "plan_vs_extract.md")
    print((out / "plan_vs_extract.md").read_text())


if __name__ == "__main__":
    main()
