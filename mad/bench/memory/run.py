"""`run_benchmark`: every mode in its own process, the budget search, the report."""

from __future__ import annotations

import shlex
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from mad.bench.memory.config import MODES, REFERENCE_MODE, BenchConfig, BenchError, resolve_config
from mad.bench.memory.harness import find_max_batch, run_child
from mad.bench.memory.report import add_ratios, print_table, write_report
from mad.options import Range, check_number
from mad.runtime import machine_info, versions


def run_benchmark(model: str = "ViT-B-16", frames: int = 8, batch: int = 8, layers: str = "4,8,12",
                  device: str = "auto", precision: str = "bf16", steps: int = 5, budget_gb: float | None = None,
                  out: str | Path = "benchmarks/results", classes: int = 174, branch_width: int = 384,
                  threads: int = 0, modes: tuple[str, ...] = MODES, command: str | None = None,
                  probe_timeout: float = 300.0, quiet: bool = False, cell_size: str | int = "auto") -> dict:
    """Run every mode in its own process, print the table, write JSON and PNG into `out`; return the report."""
    check_number("budget_gb", budget_gb, Range(low=0, low_open=True))  # None: not given
    cfg = resolve_config(model, frames, batch, layers, device, precision, steps, classes, branch_width, threads,
                         cell_size)
    rows = []
    for mode in modes:
        if not quiet:
            print(f"{mode}: batch {cfg.batch} x {cfg.frames} frames ...", file=sys.stderr, flush=True)
        row = run_child(cfg, mode)
        if "peak_bytes" not in row:  # CUDA out of memory
            raise BenchError(f"{mode} does not fit in memory at batch {cfg.batch}: try a smaller --batch")
        rows.append(row)
    add_ratios(rows)
    report = {
        "benchmark": "memory",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command or shlex.join(sys.argv),
        "machine": machine_info(cfg.device),
        "versions": versions(),
        "config": asdict(cfg),
        "memory_measure": rows[0]["memory_measure"],
        "reference_mode": REFERENCE_MODE,
        "weights": "random (memory and time do not depend on weight values)",
        "data_loading": "excluded: each step reads one batch already in memory (counted); no decoding or cache reads",
        "modes": rows,
    }
    if budget_gb:
        report["budget"] = {"gib": budget_gb, "modes": {}}
        for mode in modes:
            if not quiet:
                print(f"{mode}: largest batch within {budget_gb:g} GiB ...", file=sys.stderr, flush=True)

            def probe(b: int, mode=mode) -> dict:
                probe_cfg = BenchConfig(**{**asdict(cfg), "batch": b, "steps": 1})
                return run_child(probe_cfg, mode, limit_gb=budget_gb, timeout=probe_timeout)

            report["budget"]["modes"][mode] = find_max_batch(probe)
    write_report(report, out)
    if not quiet:
        print_table(report)
        print(f"wrote {report['files']['json']} and {report['files']['png']}")
    return report
