"""What a run of `mad bench memory` leaves: ratios, the table on the terminal, the JSON and the chart.

rich and matplotlib are imported inside the functions that draw, never by a mode's process.
"""

from __future__ import annotations

import json
from pathlib import Path

from mad.adapt.families import family
from mad.bench.memory.config import GIB, IN_BACKBONE_MODES, REFERENCE_MODE

IN_BACKBONE_LABELS = dict(zip(IN_BACKBONE_MODES, ("full\nfine-tune", "in-backbone\nadapter")))


def mode_label(mode: str) -> str:
    """A mode's chart label: a branch family's by its registry label (`Family.label`)."""
    if mode in IN_BACKBONE_LABELS:
        return IN_BACKBONE_LABELS[mode]
    arch, _, where = mode.rpartition("-")
    return f"{family(arch).label or arch}\n{'online' if where == 'online' else 'from cache'}"


def model_name(model: str) -> str:
    """ViT-B-16 -> ViT-B-16; path/to/my-vit.json -> my-vit."""
    return Path(model).stem if model.endswith(".json") else model.replace("/", "_")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= 0.1 * GIB else f"{n_bytes / 2**20:.1f} MiB"


def add_ratios(rows: list[dict]) -> None:
    """Peak memory relative to the in-backbone adapter (None when that mode is not in the run)."""
    reference = next((r["peak_bytes"] for r in rows if r["mode"] == REFERENCE_MODE), None)
    for row in rows:
        row["peak_vs_reference"] = row["peak_bytes"] / reference if reference else None


def budget_cell(found: dict) -> str:
    """One mode's largest batch within the budget, as the table shows it."""
    if found["limited_by"] != "budget":  # a lower bound
        return f">= {found['max_batch']} ({found['limited_by']})"
    if found["first_failing_batch"] - found["max_batch"] > 1:  # bisection stopped within 1/16
        return f"{found['max_batch']} (< {found['first_failing_batch']})"
    return str(found["max_batch"])


def print_table(report: dict) -> None:
    from rich.table import Table

    from mad.tables import print_table

    cfg = report["config"]
    title = (f"Training memory: {model_name(cfg['model'])}, T={cfg['frames']}, batch {cfg['batch']}, "
             f"{report['machine']['device']}, {cfg['precision']}")
    table = Table(title=title, caption=report["memory_measure"])
    for column in ("mode", "trains", "trainable", "total params", "peak memory", "vs in-backbone", "step (median)"):
        table.add_column(column, justify="left" if column in ("mode", "trains") else "right", no_wrap=True)
    budget = report.get("budget")
    if budget:
        table.add_column(f"max batch @ {budget['gib']:g} GiB", justify="right")
    for row in report["modes"]:
        ratio = row["peak_vs_reference"]
        cells = [row["mode"], row["trains"], f"{row['trainable_parameters'] / 1e6:.2f} M",
                 f"{row['total_parameters'] / 1e6:.2f} M", gib(row["peak_bytes"]),
                 f"{ratio:.3f}x" if ratio is not None else "-", f"{row['step_seconds_median']:.3f} s"]
        if budget:
            cells.append(budget_cell(budget["modes"][row["mode"]]))
        table.add_row(*cells)
    print_table(table)


def plot_chart(report: dict, path: Path) -> None:
    """Two bar charts side by side: peak memory (with the ratio to the reference) and step time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["modes"]
    names = [mode_label(row["mode"]) for row in rows]
    colours = ["#b0413e", "#d08c3a", "#4a7fb0", "#2e8b57", "#7a5ba6", "#3f9e9a"][: len(rows)]
    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    peaks = [row["peak_bytes"] / GIB for row in rows]
    bars = ax_mem.bar(names, peaks, color=colours)
    for bar, row in zip(bars, rows):
        ratio = row["peak_vs_reference"]
        label = gib(row["peak_bytes"]) + (f"\n{ratio:.2f}x" if ratio is not None else "")
        ax_mem.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_mem.set_ylabel("peak training memory (GiB)")
    ax_mem.set_ylim(0, max(peaks) * 1.25)
    ax_mem.set_title(f"peak memory ({'CUDA max allocated' if report['machine']['device'] == 'cuda' else 'CPU RSS'})",
                     fontsize=10)
    times = [row["step_seconds_median"] for row in rows]
    bars = ax_time.bar(names, times, color=colours)
    for bar, value in zip(bars, times):
        ax_time.annotate(f"{value:.2f} s", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                         va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax_time.set_ylabel("median step time (s)")
    ax_time.set_ylim(0, max(times) * 1.2)
    ax_time.set_title("one training step (forward, backward, clipping, AdamW)", fontsize=10)
    for ax in (ax_mem, ax_time):
        ax.tick_params(axis="x", labelsize=8)
        ax.spines[["top", "right"]].set_visible(False)
    cfg = report["config"]
    machine = report["machine"].get("gpu") or report["machine"]["cpu"]
    setting = f"{model_name(cfg['model'])}, {cfg['frames']} frames, batch {cfg['batch']}, {cfg['precision']}"
    fig.suptitle(f"{setting}, {machine}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def write_report(report: dict, out: str | Path) -> dict:
    """memory_<device>_<model>.json and .png into `out`; their paths go into `report["files"]`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"memory_{report['machine']['device']}_{model_name(report['config']['model'])}"
    report["files"] = {"json": str(out / f"{stem}.json"), "png": str(out / f"{stem}.png")}
    Path(report["files"]["json"]).write_text(json.dumps(report, indent=2) + "\n")
    plot_chart(report, Path(report["files"]["png"]))
    return report["files"]
