"""`mad bench sweep`: K configurations in one `mad sweep` vs the same K as `mad train` runs one after another.

Both sides are driven through the command line, as a user runs them, from one compact store streamed
(`--in-ram no`, so every epoch's reads reach the store). For each K the grid is K points of lr x
weight decay (the branch's other settings fixed); each command runs under `mad.bench.tree`, which
counts what its whole process tree read (/proc/self/io after reaping every child: DataLoader readers
included) and samples the tree's resident memory.

    store bytes   rchar minus each process's start-up reads (Python, torch, mad: ~200 MB a process,
                  the same every run). The start-up is calibrated for `mad train` and for `mad sweep` at
                  each K: a run of E epochs and one of 2E; (2E - E) is E epochs of data, E - that is the
                  start-up.
    throughput    clips x configurations per second: K x E x training clips / the wall seconds of the
                  side's commands (start-up included: a user pays it)
    memory        peak resident set of the tree (sum over its processes), the largest of the side's runs

Each K's two sides run back to back, their order alternating between K's and repeats (timings on a
shared machine drift); every figure is min / median / max over the repeats.
"""

from __future__ import annotations

import compileall
import datetime
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import mad
from mad.bench.tree import run_measured
from mad.errors import MadError
from mad.options import check_counts

MODES = ("lockstep", "sequential")
FIGURES = ("seconds", "cpu_seconds", "rchar", "read_bytes", "store_bytes", "clips_configs_per_second",
           "peak_tree_rss", "processes")
LRS = (1e-3, 5e-4, 2e-3, 2.5e-4, 4e-3, 1.25e-4, 8e-3, 6.25e-5)
WEIGHT_DECAYS = (0.05, 0.01)


class BenchSweepError(MadError):
    """The benchmark cannot run (message says why)."""


def parse_ks(ks: str) -> list[int]:
    try:
        values = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        raise BenchSweepError(f"--ks {ks!r}: write configuration counts, e.g. 1,2,4,8") from None
    if not values or min(values) < 1:
        raise BenchSweepError(f"--ks {ks!r}: write configuration counts of at least 1, e.g. 1,2,4,8")
    if max(values) > len(LRS) * len(WEIGHT_DECAYS):
        raise BenchSweepError(f"--ks {ks!r}: at most {len(LRS) * len(WEIGHT_DECAYS)} configurations (the grid's "
                              f"{len(LRS)} learning rates x {len(WEIGHT_DECAYS)} weight decays)")
    return values


def grid_points(k: int) -> list[dict]:
    """K points of a learning rate x weight decay grid: 2 weight decays when K is even and >= 4."""
    decays = WEIGHT_DECAYS[:2] if k % 2 == 0 and k >= 4 else WEIGHT_DECAYS[:1]
    lrs = LRS[: k // len(decays)]
    return [{"lr": lr, "weight_decay": wd} for lr in lrs for wd in decays]


def commands(k: int, cache: str, val: str, out: Path, epochs: int, fixed: dict, sweep_workers: bool
             ) -> dict[str, list[list[str]]]:
    """The commands of each side: one `mad sweep` of the K points, and K `mad train` runs of the same points."""
    mad_cmd = [sys.executable, "-m", "mad"]
    common = ["--cache", cache, "--val", val, "--epochs", str(epochs), "--in-ram", "no",
              "--batch-size", str(fixed["batch_size"]), "--device", fixed["device"]]
    points = grid_points(k)
    lrs = ",".join(dict.fromkeys(str(p["lr"]) for p in points))
    wds = ",".join(dict.fromkeys(str(p["weight_decay"]) for p in points))
    grid = f"width={fixed['width']} heads={fixed['heads']} lr={lrs} weight_decay={wds}"
    sweep = [*mad_cmd, "sweep", "--grid", grid, *common, "--out", str(out / "sweep")]
    if sweep_workers:
        sweep += ["--workers", str(fixed["workers"])]
    trains = [[*mad_cmd, "train", *common, "--workers", str(fixed["workers"]), "--width", str(fixed["width"]),
               "--heads", str(fixed["heads"]), "--lr", str(p["lr"]), "--weight-decay", str(p["weight_decay"]),
               "--out", str(out / f"train-{i}"), "--overwrite"] for i, p in enumerate(points)]
    return {"lockstep": [sweep], "sequential": trains}


def sweep_accepts(option: str) -> bool:
    """Whether the `mad sweep` on this checkout takes `option` (it gains options as the sweep grows)."""
    shown = subprocess.run([sys.executable, "-m", "mad", "sweep", "--help"], capture_output=True, text=True)
    return option in shown.stdout


def run_side(cmds: list[list[str]], work: Path, tag: str) -> dict:
    """Run a side's commands one after another, each measured; their sums (peak memory: the largest)."""
    total = dict.fromkeys(("seconds", "cpu_seconds", "rchar", "read_bytes"), 0)
    peak = 0
    for i, cmd in enumerate(cmds):
        for folder in cmd[cmd.index("--out") + 1:][:1]:
            shutil.rmtree(folder, ignore_errors=True)  # every run starts afresh (a sweep would resume)
        log = work / f"{tag}-{i}.log"
        measured = run_measured(cmd, work / f"{tag}-{i}.json", log)
        if measured["returncode"] != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise BenchSweepError(f"{shlex.join(cmd)} failed (exit {measured['returncode']}): {' | '.join(tail)}")
        for name in total:
            total[name] += measured[name]
        peak = max(peak, measured["peak_tree_rss"])
    return {**total, "peak_tree_rss": peak, "processes": len(cmds)}


def calibrate(cmd: list[str], epochs: int, work: Path, tag: str) -> dict:
    """Start-up bytes of one process of `cmd` (made for `epochs`): from runs of E and 2E epochs."""
    at = cmd.index("--epochs") + 1
    once = run_side([cmd], work, f"{tag}-E")
    twice = run_side([[*cmd[:at], str(2 * epochs), *cmd[at + 1:]]], work, f"{tag}-2E")
    data = twice["rchar"] - once["rchar"]
    return {"rchar_E": once["rchar"], "rchar_2E": twice["rchar"], "data_rchar_per_epoch": data / epochs,
            "startup_rchar": once["rchar"] - data, "seconds_E": once["seconds"], "seconds_2E": twice["seconds"]}


def build_store(work: Path, videos_per_class: int, val_per_class: int) -> tuple[str, str]:
    """A small compact store of the demo's synthetic videos (its small random-weight ViT), train and val."""
    from mad.demo import DemoConfig, extract_demo

    caches = extract_demo(DemoConfig(out=str(work / "store"), videos_per_class=videos_per_class,
                                     val_per_class=val_per_class, progress=False))
    return str(caches["train"]), str(caches["val"])


def spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "max": values[-1]}


def bench_sweep(ks: str = "1,2,4,8", repeats: int = 3, epochs: int = 2, cache: str | None = None,
                val: str | None = None, out: str | None = "benchmarks/results", smoke: bool = False,
                videos_per_class: int = 8, val_per_class: int = 2, width: int = 128, heads: int = 4,
                batch_size: int = 16, workers: int = 2, device: str = "cpu", command: str = "") -> dict:
    """Measure both sides for every K, `repeats` times; print the table, write JSON and markdown into `out`."""
    from mad.adapt.config import TrainConfig
    from mad.cache.dataset import usable_videos
    from mad.cache.store import Store

    if smoke:  # the harness end to end in about a minute: not figures to quote
        ks, repeats, epochs, videos_per_class, val_per_class = "1,2", 1, 1, 2, 1
        width, batch_size = 32, 4
        if sweep_accepts("--workers"):  # spawning readers costs more than the whole tiny epoch on 2 cores
            workers = 0
    k_values = parse_ks(ks)
    check_counts(repeats=repeats, epochs=epochs, videos_per_class=videos_per_class, val_per_class=val_per_class,
                 width=width, heads=heads, batch_size=batch_size)
    if (cache is None) != (val is None):
        raise BenchSweepError("--cache and --val go together (a compact store's train and val splits), or neither")
    fixed = {"width": width, "heads": heads, "batch_size": batch_size, "workers": workers, "device": device}
    sweep_workers = sweep_accepts("--workers")
    if not sweep_workers and workers != TrainConfig().workers:  # both sides must read with as many readers
        raise BenchSweepError(f"--workers {workers}: this mad sweep takes no --workers (it reads with "
                              f"{TrainConfig().workers}); leave --workers at {TrainConfig().workers}")
    with tempfile.TemporaryDirectory(prefix="mad-bench-sweep-") as tmp:
        work = Path(tmp)
        if cache is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*random weights.*")
                cache, val = build_store(work, videos_per_class, val_per_class)
        store = Store.open(cache)
        if store.manifest.storage != "compact":
            raise BenchSweepError(f"--cache {cache}: a {store.manifest.storage} store; the benchmark streams a "
                                  f"compact one (mad extract --store compact)")
        clips = len(usable_videos(store))  # one view of each per epoch
        compileall.compile_dir(Path(mad.__file__).parent, quiet=1)  # no run reads sources a later one reads compiled
        first = commands(1, cache, val, work / "calibrate", epochs, fixed, sweep_workers)
        # a sweep's start-up grows with K (more modules and run folders), so it is calibrated at every K
        calibration = {"train": calibrate(first["sequential"][0], epochs, work, "cal-train"),
                       "sweep": {str(k): calibrate(commands(k, cache, val, work / "calibrate", epochs, fixed,
                                                            sweep_workers)["lockstep"][0], epochs, work, f"cal-k{k}")
                                 for k in k_values}}
        runs = []
        for repeat in range(repeats):
            for j, k in enumerate(k_values):
                cmds = commands(k, cache, val, work / f"k{k}", epochs, fixed, sweep_workers)
                order = MODES if (repeat + j) % 2 == 0 else MODES[::-1]
                for position, mode in enumerate(order):
                    side = run_side(cmds[mode], work, f"r{repeat}-k{k}-{mode}")
                    side.update(repeat=repeat, k=k, mode=mode, ran=position + 1,
                                store_bytes=side["rchar"] - side["processes"] * (
                                    calibration["train"]["startup_rchar"] if mode == "sequential"
                                    else calibration["sweep"][str(k)]["startup_rchar"]),
                                clips_configs_per_second=k * epochs * clips / side["seconds"])
                    runs.append(side)
    results, acceptance = summarise(runs, k_values, cache, val, epochs, fixed, sweep_workers)
    from mad.runtime import machine_info

    result = {"command": command, "date": datetime.date.today().isoformat(), "machine": machine_info(device),
              "smoke": smoke,
              "settings": {"cache": cache, "val": val, "clips": clips, "epochs": epochs, "ks": k_values,
                           "repeats": repeats, **fixed, "store": "compact", "streamed": True,
                           "sweep_takes_workers": sweep_workers, "bytes_counter": "rchar",
                           "sweep_module": _sweep_kind()},
              "calibration": calibration, "results": results, "acceptance": acceptance, "runs": runs}
    print_result(result)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = f"bench_sweep_{'gpu' if device.startswith('cuda') else 'cpu'}{'_smoke' if smoke else ''}"
        (Path(out) / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (Path(out) / f"{name}.md").write_text(markdown(result))
    return result


def summarise(runs: list[dict], k_values: list[int], cache: str, val: str, epochs: int, fixed: dict,
              sweep_workers: bool) -> tuple[dict, dict | None]:
    """Per K: each side's figures (min / median / max over repeats), lockstep / sequential of each repeat's
    pair, the commands; and the K=4 acceptance of issue 22."""
    results = {}
    for k in k_values:
        row = {mode: {f: spread([r[f] for r in runs if r["k"] == k and r["mode"] == mode]) for f in FIGURES}
               for mode in MODES}
        pairs = [(a, b) for a in runs for b in runs if a["k"] == b["k"] == k and a["repeat"] == b["repeat"]
                 and a["mode"] == "lockstep" and b["mode"] == "sequential"]
        row["lockstep_over_sequential"] = {
            f: spread([a[f] / b[f] for a, b in pairs if b[f]]) for f in ("store_bytes", "rchar", "seconds",
                                                                        "cpu_seconds", "peak_tree_rss")}
        row["commands"] = {mode: [shlex.join(c[1:]).replace("-m mad", "mad", 1)
                                  for c in commands(k, cache, val, Path("OUT"), epochs, fixed, sweep_workers)[mode]]
                           for mode in MODES}
        results[str(k)] = row
    acceptance = None
    if "4" in results:
        ratio = results["4"]["lockstep_over_sequential"]
        acceptance = {"k": 4, "store_bytes_ratio_max": ratio["store_bytes"]["max"],
                      "reads_at_most_a_third": ratio["store_bytes"]["max"] <= 1 / 3,
                      "seconds_ratio_median": ratio["seconds"]["median"],
                      "not_slower": ratio["seconds"]["median"] <= 1.0}
    return results, acceptance


def _sweep_kind() -> str:
    """Which sweep this checkout's `mad sweep` is: lockstep when mad.adapt.lockstep exists, its same-shape
    configurations stacked into one model when mad.adapt.stacked does."""
    adapt = Path(mad.__file__).parent / "adapt"
    if not (adapt / "lockstep.py").exists():
        return "sequential"
    return "lockstep, stacked" if (adapt / "stacked.py").exists() else "lockstep"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def rows(result: dict) -> list[list[str]]:
    """One row per K and side: the medians, with min-max where they spread."""
    table = []
    for k, row in result["results"].items():
        for mode in MODES:
            f = row[mode]
            table.append([k, mode if mode == "sequential" else "one mad sweep", _mb(f["store_bytes"]["median"]),
                          _mb(f["rchar"]["median"]),
                          f"{f['seconds']['median']:.1f} ({f['seconds']['min']:.1f}-{f['seconds']['max']:.1f})",
                          f"{f['cpu_seconds']['median']:.1f}", f"{f['clips_configs_per_second']['median']:.1f}",
                          f"{f['peak_tree_rss']['median'] / 2**30:.2f}"])
        ratio = row["lockstep_over_sequential"]
        table.append([k, "sweep / sequential", f"{ratio['store_bytes']['median']:.2f}x",
                      f"{ratio['rchar']['median']:.2f}x",
                      f"{ratio['seconds']['median']:.2f}x ({ratio['seconds']['min']:.2f}-"
                      f"{ratio['seconds']['max']:.2f})", f"{ratio['cpu_seconds']['median']:.2f}x" if "cpu_seconds" in ratio
                      else "", "", f"{ratio['peak_tree_rss']['median']:.2f}x"])
    return table


HEADER = ["K", "side", "store MB read", "all MB read (rchar)", "s (min-max)", "CPU s", "clips x configs / s",
          "peak tree RSS GiB"]


def title(result: dict) -> str:
    s = result["settings"]
    return (f"mad bench sweep: K configurations (lr x weight decay) streamed from a compact store of {s['clips']} "
            f"clips, {s['epochs']} epoch(s), batch {s['batch_size']}, branch width {s['width']}, {s['device']}; "
            f"mad sweep is {s['sweep_module']} here; medians of {s['repeats']} repeat(s)")


def print_result(result: dict) -> None:
    from rich.table import Table

    from mad.progress import make_console
    from mad.tables import print_table

    table = Table(title=title(result))
    for column in HEADER:
        table.add_column(column, justify="left" if column == "side" else "right")
    for row in rows(result):
        table.add_row(*row)
    console = make_console()
    print_table(table, console)
    if result["acceptance"]:
        a = result["acceptance"]
        console.print(f"K=4: the sweep reads {a['store_bytes_ratio_max']:.2f}x the store bytes of the 4 runs "
                      f"(target <= 0.33: {'met' if a['reads_at_most_a_third'] else 'not met'}), takes "
                      f"{a['seconds_ratio_median']:.2f}x their time (target <= 1: "
                      f"{'met' if a['not_slower'] else 'not met'})")


def markdown(result: dict) -> str:
    lines = [f"# {title(result)}", "", f"Command: `{result['command']}` ({result['date']}, "
             f"{result['machine']['cpu']}, {result['machine']['cores']} cores)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    c = result["calibration"]
    lines += ["", f"Store bytes: rchar minus each process's start-up reads (calibrated from E and 2E epochs: "
                  f"`mad train` {_mb(c['train']['startup_rchar'])} MB, `mad sweep` "
                  f"{', '.join(f'K={k} ' + _mb(v['startup_rchar']) for k, v in c['sweep'].items())} MB; one configuration's epoch reads {_mb(c['train']['data_rchar_per_epoch'])} MB of train "
                  f"and val store). Throughput includes start-up, as a user pays it.", ""]
    if result["acceptance"]:
        a = result["acceptance"]
        lines += [f"K=4 acceptance (issue 22): store bytes ratio (max over repeats) "
                  f"{a['store_bytes_ratio_max']:.2f} (<= 0.33: {'met' if a['reads_at_most_a_third'] else 'not met'})"
                  f"; time ratio (median) {a['seconds_ratio_median']:.2f} (<= 1: "
                  f"{'met' if a['not_slower'] else 'not met'})", ""]
    return "\n".join(lines)
