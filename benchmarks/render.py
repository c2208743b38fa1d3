"""Render docs/benchmarks/*.md and the README's headline table from benchmarks/results/*.json.

    python benchmarks/render.py           # rewrite the pages and the README table
    python benchmarks/render.py --check   # exit 1 when anything rendered is stale

Every number on those pages comes from a JSON here; edit the JSON (or rerun its command), never the page.
A JSON whose name matches no page below goes to docs/benchmarks/other.md.

Figures quoted in prose (README.md and the hand-written pages under docs/) are rendered too, each between
two HTML comments that no reader sees:

    <!--fig demo_time.json {spread(d["modes"]["none"]["wall_seconds"], 0)}-->110 / 119 / 125<!--/fig-->

the first names the JSON (as `d`) and an f-string body; what sits between them is its value, rewritten here.
"""
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PAGES_DIR = ROOT / "docs" / "benchmarks"
README = ROOT / "README.md"
NOTES = ROOT / "benchmarks" / "notes"  # <stem>.md: how to read page <stem>, its figures through <!--fig--> markers
BEGIN, END = "<!-- headline figures: rendered by benchmarks/render.py -->", "<!-- end headline figures -->"

# page stem -> (title, JSON name prefixes)
PAGES = {
    "extract": ("Extraction throughput", ("extract_",)),
    "train": ("Training from the cache vs online", ("train_", "branch_step_")),
    "memory": ("Training memory", ("memory_",)),
    "storage": ("Storage: compact vs full store, the plan, quantisers", ("storage_", "plan_", "quantisers")),
    "demo": ("The demo's task: time, families, ablation", ("demo_", "ablation_")),
    "evl": ("EVL on the same cache", ("evl_",)),
    "sweep": ("Sweeps: measured (mad bench sweep) and predicted (mad plan --sweep)", ("bench_sweep_", "plan_sweep_",
                                                                                   "stack_")),
    "views": ("Augmented train views", ("views_",)),
}


def page_of(name: str) -> str:
    """The page whose longest prefix `name` starts with (plan_sweep_ goes to sweep, not storage's plan_)."""
    matches = [(len(prefix), stem) for stem, (_, prefixes) in PAGES.items() for prefix in prefixes
               if name.startswith(prefix)]
    return max(matches)[1] if matches else "other"


def _get(data, path):
    for key in path.split("."):
        data = data[int(key)] if isinstance(data, list) else data[key]
    return data


def _mean_runs(runs, key="val_top1_last"):
    return statistics.mean(r[key] for r in runs)


# (figure, JSON, how to read it, page): the README's short table
HEADLINES = [
    ("`mad demo` wall time, idle 2-core CPU (s, min / median / max)", "demo_time.json",
     lambda d: _spread(d["modes"]["none"]["wall_seconds"], 0), "demo"),
    ("demo task val top-1, madapter / evl / meanpool / linear (3 seeds, mean)", "demo_archs.json",
     lambda d: " / ".join(f"{_mean_runs(d['demo'][a]['runs']):.3f}" for a in ("madapter", "evl", "meanpool", "linear")),
     "demo"),
    ("full extract / CPU-time bound, ViT-B-16 (min / median / max)", "extract_cpu_ViT-B-16.json",
     lambda d: _spread(d["full_after_first_batch_over_cpu_time_bound"], 2), "extract"),
    ("training peak memory, M-adapter from the cache / an in-backbone adapter, ViT-B-16 / ViT-L-14 (CPU RSS)",
     "memory_cpu_ViT-B-16.json",
     lambda d: " / ".join(f"{_cached_ratio(json.loads((RESULTS / n).read_text())):.3f}x"
                          for n in ("memory_cpu_ViT-B-16.json", "memory_cpu_ViT-L-14.json")), "memory"),
    ("online without decoding (ViT + branch on decoded frames) / cache streamed, per step, ViT-B-16", "train_cpu_ViT-B-16_compact.json",
     lambda d: _spread(d["online_decoded_over_stream"], 1) + "x", "train"),
    ("streamed / in-RAM epoch", "train_cpu_ViT-B-16_compact.json",
     lambda d: _spread(d["stream_over_ram"], 2) + "x", "train"),
    ("compact / full bytes per video-view, ViT-B-16", "storage_cpu_ViT-B-16.json",
     lambda d: f"1/{1 / d['compact_over_full']['bytes']:.1f}", "storage"),
    ("Kinetics-400 train + val store, compact / full (TB)", "plan_ViT-B-16_k400.json",
     lambda d: f"{d['total']['compact']['bytes_on_disk'] / 1e12:.2f} / {d['total']['full']['bytes_on_disk'] / 1e12:.2f}",
     "storage"),
    ("`mad sweep` of 4 configurations (stacked) / 4 `mad train` runs, CPU: store bytes read; time (min / median / max)",
     "bench_sweep_cpu.json", lambda d: (f"{d['results']['4']['lockstep_over_sequential']['store_bytes']['median']:.2f}x; "
                                        f"{_spread(d['results']['4']['lockstep_over_sequential']['seconds'], 2)}x"),
     "sweep"),
    ("*predicted* by `mad plan --sweep` at its assumed H100 and disk rates, not measured: Kinetics-400, 100 configurations "
     "x 30 epochs, extraction included, "
     "lockstep / one by one (h)", "plan_sweep_k400.json",
     lambda d: f"{d['total_seconds']['lockstep'] / 3600:.1f} / {d['total_seconds']['one_by_one'] / 3600:.1f}", "sweep"),
]


def _cached_ratio(d):
    return next(m["peak_vs_reference"] for m in d["modes"] if m["mode"] == "madapter-cached")


def _fmt(x, digits=4):
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def _spread(x, digits=3):
    if isinstance(x, dict) and {"min", "median", "max"} <= set(x):
        return " / ".join(f"{x[k]:.{digits}f}" for k in ("min", "median", "max"))
    return f"{x:.{digits}f}"


def _is_numbers(v):
    return isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _rows(data, prefix=""):
    """Every figure as (path, value): {min, median, max} and lists of numbers as min / median / max."""
    if isinstance(data, dict) and {"min", "median", "max"} <= set(data):
        yield prefix, " / ".join(_fmt(data[k]) for k in ("min", "median", "max")) + " (min / median / max)"
        return
    if _is_numbers(data) and len(data) > 1:
        yield prefix, (f"{_fmt(min(data))} / {_fmt(statistics.median(data))} / {_fmt(max(data))} "
                       f"(min / median / max of {len(data)})")
        return
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _rows(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _rows(v, f"{prefix}[{i}]")
    else:
        yield prefix, _fmt(data)


def _section(path: Path) -> str:
    data = json.loads(path.read_text())
    out = [f"## `{path.name}`", ""]
    out.append(f"Command: `{data.get('command', 'not recorded')}`" + (f" ({data['date']})" if "date" in data else ""))
    machine = data.get("machine")
    if isinstance(machine, dict):
        out.append("")
        out.append("Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    out += ["", "| figure | value |", "|---|---|"]
    for key, value in _rows({k: v for k, v in data.items() if k not in ("command", "date", "machine")}):
        out.append(f"| `{key}` | {str(value).replace('|', '/')} |")
    return "\n".join(out) + "\n"


FIG = re.compile(r"<!--fig (\S+\.json) (.*?)-->(.*?)<!--/fig-->")


def prose_pages() -> list[Path]:
    """README.md and every hand-written docs page (the generated ones are rendered whole)."""
    docs = PAGES_DIR.parent
    return [README, *sorted(NOTES.glob("*.md")), *sorted(p for p in docs.rglob("*.md")
                            if not p.is_relative_to(PAGES_DIR) and not p.is_relative_to(docs / "reference"))]


def _find(items: list, **match):
    """The one item of `items` (dicts) with every key = value of `match`: find(d["modes"], mode="full-finetune")."""
    found = [x for x in items if all(x.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} items match {match}")
    return found[0]


def _pick(mapping: dict, prefix: str):
    """The value whose key starts with `prefix` (keys such as "no motion input (--no-motion)" hold "--")."""
    found = [v for k, v in mapping.items() if k.startswith(prefix)]
    if len(found) != 1:
        raise KeyError(f"{len(found)} keys start with {prefix!r}")
    return found[0]


def _mean_min_max(x: dict, key: str = "val_top1_last", digits: int = 3) -> str:
    """"0.983 (0.958-1.000)" from x[key_mean], x[key_min], x[key_max]."""
    return f"{x[key + '_mean']:.{digits}f} ({x[key + '_min']:.{digits}f}-{x[key + '_max']:.{digits}f})"


def _sci(x: float, digits: int = 1) -> str:
    """2.5e-4, as a person writes it (Python's format gives 2.5e-04)."""
    mantissa, exponent = f"{x:.{digits}e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def render_figures(text: str, where: str = "") -> str:
    """`text` with the value of every <!--fig FILE EXPR--> marker re-rendered from its JSON."""
    cache = {}

    def one(match):
        name, expr = match.group(1), match.group(2)
        if "|" in expr:  # a table would split the marker into cells
            raise SystemExit(f"error: {where}: <!--fig {name} {expr}-->: no | in a marker; one marker per table cell")
        if name not in cache:
            if not (RESULTS / name).exists():
                raise SystemExit(f"error: {where}: <!--fig {name} ...-->: no benchmarks/results/{name}")
            cache[name] = json.loads((RESULTS / name).read_text())
        helpers = {"d": cache[name], "spread": _spread, "mean": statistics.mean, "median": statistics.median,
                   "mean_runs": _mean_runs,
                   "pick": _pick, "mean_min_max": _mean_min_max, "find": _find, "sci": _sci}
        try:
            value = eval(f"f\"\"\"{expr}\"\"\"", helpers)  # noqa: S307 - the repository's own pages
        except Exception as e:  # noqa: BLE001 - name the marker whatever went wrong
            raise SystemExit(f"error: {where}: <!--fig {name} {expr}-->: {type(e).__name__}: {e}") from None
        return f"<!--fig {name} {expr}-->{value}<!--/fig-->"

    return FIG.sub(one, text)


def _written_by(write, data: dict, name: str) -> str:
    """What a benchmark's own table writer (which writes `name` into a folder) makes of `data`."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        made = write(data, Path(tmp))
        return made if isinstance(made, str) else (Path(tmp) / name).read_text()


def script_tables() -> dict:
    """benchmarks/results/*.md that a benchmark script writes beside its JSON, re-rendered from that JSON by the
    script's own function: a hand edit of those tables (or a JSON changed without them) is stale too."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    writers = {  # table -> (its JSON, the script's writer: data, folder -> text, or writes <folder>/<table>)
        "demo_time.md": ("demo_time.json", lambda d, out: importlib.import_module("bench_demo_time").table(d)),
        "demo_archs.md": ("demo_archs.json", lambda d, out: importlib.import_module("bench_demo_archs").write_table(d, out)),
        "ablation_demo.md": ("ablation_demo.json",
                             lambda d, out: importlib.import_module("bench_ablation").write_table(d, out)),
        "plan_vs_extract.md": ("plan_vs_extract_cpu_ViT-B-16.json", lambda d, out: importlib.import_module(
            "bench_plan_vs_extract").write_markdown(d, out / "plan_vs_extract.md")),
    }
    for sweep in RESULTS.glob("bench_sweep_*.json"):
        writers[sweep.with_suffix(".md").name] = (sweep.name, lambda d, out: importlib.import_module(
            "mad.bench.sweep").markdown(d))
    return {RESULTS / table: _written_by(write, json.loads((RESULTS / source).read_text()), table)
            for table, (source, write) in writers.items() if (RESULTS / source).exists()}


def render_pages() -> dict:
    files = sorted(RESULTS.glob("*.json"))
    placed = {stem: [] for stem in PAGES}
    placed["other"] = []
    for f in files:
        placed[page_of(f.name)].append(f)
    pages = {}
    for stem, members in placed.items():
        if not members:
            continue
        title = PAGES[stem][0] if stem in PAGES else "Other results"
        head = (f"# {title}\n\nRendered by `python benchmarks/render.py` from "
                + ", ".join(f"`benchmarks/results/{m.name}`" for m in members)
                + "; do not edit by hand.\n\n")
        notes = NOTES / f"{stem}.md"
        if notes.exists():  # the reading first (its source: benchmarks/notes/), then every figure of each JSON
            head += (render_figures(notes.read_text(), str(notes)).rstrip("\n")
                     + f"\n\n*Reading from `benchmarks/notes/{stem}.md`; every figure of each JSON follows.*\n\n")
        pages[PAGES_DIR / f"{stem}.md"] = head + "\n".join(_section(m) for m in members)
    return pages


def render_headlines() -> str:
    lines = [BEGIN, "", "| figure | value | details |", "|---|---|---|"]
    for label, name, read, page in HEADLINES:
        data = json.loads((RESULTS / name).read_text())
        lines.append(f"| {label} | **{read(data)}** | [{page}](docs/benchmarks/{page}.md) |")
    return "\n".join(lines + ["", END])


def render_readme(text: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: README.md lacks the markers {BEGIN!r} ... {END!r}")
    before, rest = text.split(BEGIN, 1)
    return before + render_headlines() + rest.split(END, 1)[1]


def main(check: bool) -> int:
    wanted = render_pages() | script_tables()
    for page in prose_pages():
        wanted[page] = render_figures(page.read_text(), str(page))
    wanted[README] = render_readme(wanted[README])
    stale = [p for p, t in wanted.items() if not p.exists() or p.read_text() != t]
    if check:
        for p in stale:
            print(f"stale: {p}")
        return 1 if stale else 0
    PAGES_DIR.mkdir(parents=True, exist_ok=True)
    for p in stale:
        p.write_text(wanted[p])
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main("--check" in sys.argv))
