"""`mad report`: one self-contained HTML page for training runs and sweeps.

    write_report(["runs/sweep", "runs/b16"], "report.html")

A sweep folder expands to the runs in it. The page holds, with no server, no network and
nothing outside the file (images are base64 PNG/JPEG, the little script and style inline):
- a leaderboard of every run (arch, best val top-1/top-5/mean class as training logged them on
  the first cached view, multi-view top-1, parameters, epochs), sortable by clicking a header;
- per run: loss and accuracy curves from metrics.jsonl; and, scoring the run's best model
  (model.safetensors) on its val cache with every cached view averaged (as `mad eval`'s
  multi-view): the confusion matrix, per-class accuracy, and the worst-scored val videos (lowest
  probability of the true class) with a strip of the frames the cache sampled from each,
  decoded from the video's path and the cache's recorded frame numbers.

A folder that is neither a run nor a sweep, a run whose model or val cache is gone, or a val
cache the model cannot read is an error (ReportError, one line). A video that is no longer on
disk (or no longer decodes) only loses its frame strip: a note says why, the report is written.
A run trained without a val cache gets its curves and a note instead of the scores.
Nothing is written into the run folders.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import mad
from mad.errors import MadError

WORST_VIDEOS = 8     # worst-scored val videos shown per run
STRIP_FRAMES = 8     # frames per strip (evenly chosen from the cached ones when there are more)
THUMB_HEIGHT = 64    # pixels


class ReportError(MadError):
    """Runs that cannot be reported (message names the folder or file and says why)."""


@dataclass
class Run:
    """One run folder as the page shows it."""

    path: Path
    name: str
    config: dict
    history: list[dict]                       # metrics.jsonl rows
    best: dict | None = None                  # the history row with the best val top-1 (or the last)
    multi_top1: float | None = None           # val, every cached view averaged
    curves: str | None = None                 # base64 PNG
    confusion: str | None = None              # base64 PNG
    per_class: list[dict] = field(default_factory=list)
    worst: list[dict] = field(default_factory=list)
    trained_views: list[dict] = field(default_factory=list)  # train-view stores: `mad.report_views`
    notes: list[str] = field(default_factory=list)

    @property
    def train(self) -> dict:
        """The run's settings by name, its branch's as resolved (config.json's "train" and "model")."""
        return {**self.config.get("train", {}), **self.config.get("model", {})}


def write_report(run_dirs, out="report.html", device: str = "auto", worst: int = WORST_VIDEOS,
                 batch_size: int = 64) -> Path:
    """Write the report of `run_dirs` (run or sweep folders) to `out`; return its path."""
    runs = build_report(run_dirs, device, worst, batch_size)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(runs), encoding="utf-8")
    return out


def build_report(run_dirs, device: str = "auto", worst: int = WORST_VIDEOS, batch_size: int = 64) -> list[Run]:
    """Everything the page shows, run by run, best val top-1 first."""
    from mad.report_views import trained_views
    from mad.runtime import resolve_device

    if worst < 0:
        raise ReportError(f"--worst {worst}: give a number of videos, 0 or more")

    runs = [read_run(path, name) for path, name in find_runs(run_dirs)]
    device = resolve_device(device)
    caches = {}  # val cache location -> opened tokens: a sweep's runs share one
    try:
        for run in runs:
            if not run.history:  # a run just started (e.g. the current one of a sweep): no model yet either
                run.notes.append("no epoch finished yet: nothing to show")
                continue
            run.curves = curves_image(run.history)
            score_run(run, caches, device, worst, batch_size)
            run.trained_views = trained_views(run.train["cache"], run.train["seed"], run.history[-1]["epoch"])
    finally:
        for data in caches.values():
            data.close()
    runs.sort(key=lambda run: -_top1(run))
    return runs


# --------------------------------------------------------------------------- finding and reading runs


def find_runs(dirs) -> list[tuple[Path, str]]:
    """(run folder, name shown) for each run folder given and each run inside each sweep folder given."""
    found, seen = [], set()
    for given in map(Path, dirs):
        if not given.is_dir():
            raise ReportError(f"{given}: no such folder")
        if is_run(given):
            runs = [(given, given.name)]
        else:
            inside = sorted(p for p in given.iterdir() if p.is_dir() and is_run(p))
            if not inside:
                raise ReportError(f"{given}: not a run folder (no config.json from mad train) "
                                  f"nor a sweep folder (no run folders in it)")
            runs = [(p, f"{given.name}/{p.name}") for p in inside]
        for path, name in runs:
            if path.resolve() not in seen:  # a sweep and one of its runs both given: show it once
                seen.add(path.resolve())
                found.append((path, name))
    names = [name for _, name in found]
    return [(path, str(path) if names.count(name) > 1 else name) for path, name in found]


def is_run(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "metrics.jsonl").is_file()


def read_run(path: Path, name: str) -> Run:
    try:
        config = json.loads((path / "config.json").read_text())
        history = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: cannot read its config.json or metrics.jsonl ({e})") from None
    if not isinstance(config, dict) or "train" not in config:
        raise ReportError(f"{path}/config.json: not a mad training config (no 'train' settings)")
    key = "val/acc/top1" if history and "val/acc/top1" in history[0] else "epoch"
    best = max(history, key=lambda row: row[key]) if history else None
    return Run(path, name, config, history, best)


def _top1(run: Run) -> float:
    return run.best.get("val/acc/top1", -1.0) if run.best else -1.0


# --------------------------------------------------------------------------- scores on the val cache


def score_run(run: Run, caches: dict, device, worst: int, batch_size: int) -> None:
    """Confusion matrix, per-class accuracy and worst videos of the run's best model on its val cache."""
    import torch

    from mad.adapt.checkpoint import load_model
    from mad.adapt.evaluate import accuracy, confusion_matrix, predict_probs
    from mad.cache.dataset import open_tokens
    from mad.cache.manifest import Manifest
    from mad.cache.store import Store

    val = run.train.get("val")
    if not val:
        run.notes.append("trained without a val cache: no confusion matrix, per-class accuracy or worst videos")
        return
    model_path = run.path / "model.safetensors"
    if not model_path.is_file():
        raise ReportError(f"{model_path}: the run's model is gone (no file); it is needed to score {val}")
    if not Store.exists(val):
        raise ReportError(f"{run.path}: its val cache {val} is gone (no zarr.json there; the path is as "
                          f"given to mad train, so run mad report from the same folder)")
    model, info = load_model(model_path, device)
    if val not in caches:
        caches[val] = open_tokens(Store.open(val), "auto", progress=False)
    data = caches[val]
    if info.get("manifest"):
        Manifest.from_dict(info["manifest"], str(model_path)).check_pair(
            data.manifest, val, f"the training cache of {model_path}")
    num_classes = info["branch"].num_classes
    if int(data.labels.max()) >= num_classes:
        raise ReportError(f"{val}: label {int(data.labels.max())} is outside {model_path}'s {num_classes} classes")

    probs = predict_probs(model, data, batch_size, device, all_views=True, arch=info["branch"].arch).mean(dim=1)
    labels = data.labels
    names = info.get("class_names") or data.class_names or [str(c) for c in range(num_classes)]
    run.multi_top1 = accuracy(probs, labels)["acc/top1"]
    matrix = confusion_matrix(probs.argmax(dim=1), labels, num_classes)
    run.confusion = confusion_image(matrix, names, f"val, all views: top-1 {run.multi_top1:.3f}")
    run.per_class = [{"name": names[c], "videos": int(matrix[c].sum()), "correct": int(matrix[c, c]),
                      "accuracy": matrix[c, c] / matrix[c].sum()}
                     for c in range(num_classes) if matrix[c].sum()]
    run.per_class.sort(key=lambda row: (row["accuracy"], row["name"]))

    true_prob = probs[torch.arange(len(labels)), labels]
    frame_index = Store.open(val).frame_index()[data.videos]  # [V, clips, T]: the frames each view saw
    for position in true_prob.argsort()[:worst].tolist():
        predicted = int(probs[position].argmax())
        strip, note = frame_strip(data.manifest.videos_root, data.paths[position], frame_index[position, 0])
        run.worst.append({"path": data.paths[position], "true": names[int(labels[position])],
                          "true_prob": float(true_prob[position]), "predicted": names[predicted],
                          "predicted_prob": float(probs[position, predicted]), "strip": strip, "note": note})


# --------------------------------------------------------------------------- images


def _png(figure_writer) -> str:
    """base64 PNG of what `figure_writer(file)` saves (the matplotlib plots in mad.adapt.plots)."""
    buffer = io.BytesIO()
    figure_writer(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def curves_image(history: list[dict]) -> str:
    from mad.adapt.plots import plot_curves

    return _png(lambda f: plot_curves(history, f))


def confusion_image(matrix: np.ndarray, names: list[str], title: str) -> str:
    from mad.adapt.plots import plot_confusion

    return _png(lambda f: plot_confusion(matrix, names, f, title))


def frame_strip(videos_root: str | None, path: str, frame_index: np.ndarray, count: int = STRIP_FRAMES,
                height: int = THUMB_HEIGHT) -> tuple[str | None, str | None]:
    """(base64 JPEG of `count` sampled frames side by side, None) or (None, why there is none)."""
    from PIL import Image

    from mad.extract.decode import DecodeError, decode_frames

    if not videos_root:
        return None, "the cache does not record its videos folder"
    video = Path(videos_root) / path
    if not video.is_file():
        return None, f"video no longer on disk: {video}"
    chosen = frame_index[np.linspace(0, len(frame_index) - 1, min(count, len(frame_index))).round().astype(int)]
    try:
        frames = decode_frames(str(video), chosen, height)  # short side `height`
    except DecodeError as e:
        return None, f"{video}: {e}"
    thumbs = [Image.fromarray(f).resize((max(1, round(f.shape[1] * height / f.shape[0])), height)) for f in frames]
    strip = Image.new("RGB", (sum(t.width for t in thumbs) + 2 * (len(thumbs) - 1), height), "white")
    x = 0
    for thumb in thumbs:
        strip.paste(thumb, (x, 0))
        x += thumb.width + 2
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode(), None


# --------------------------------------------------------------------------- the page


def render(runs: list[Run]) -> str:
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["num"] = lambda value, digits=3: "–" if value is None else f"{value:.{digits}f}"
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return env.from_string(PAGE).render(runs=runs, version=mad.__version__, created=created)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>mad report: {{ runs | length }} run{{ "s" if runs | length != 1 }}</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em auto; max-width: 1200px; padding: 0 1em; color: #222; }
  table { border-collapse: collapse; margin: .5em 0; }
  th, td { border-bottom: 1px solid #ddd; padding: .25em .6em; text-align: right; }
  th:first-child, td:first-child, .text { text-align: left; }
  #leaderboard th { cursor: pointer; user-select: none; background: #f4f4f4; }
  section.run { border-top: 2px solid #444; margin-top: 2em; }
  .note { color: #8a4b00; }
  .scroll { max-height: 24em; overflow-y: auto; display: inline-block; }
  img.plot { max-width: 100%; }
  .muted { color: #777; font-size: 90%; }
  .figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
</style>
</head>
<body>
<h1>mad report</h1>
<p class="muted">{{ runs | length }} run{{ "s" if runs | length != 1 }}; mad {{ version }}, {{ created }}.
Val top-1, top-5 and mean class: the best epoch as training logged it (first cached view of each val video).
Multi-view top-1, confusion matrices, per-class accuracy and worst videos: the run's best model on its val cache,
every cached view averaged (as <code>mad eval</code>'s multi-view).</p>

<h2>Leaderboard</h2>
<table id="leaderboard">
<thead><tr><th>run</th><th class="text">arch</th><th>val top-1</th><th>val top-5</th><th>val mean class</th>
<th>multi-view top-1</th><th>parameters</th><th>epochs</th><th>best epoch</th></tr></thead>
<tbody>
{% for run in runs %}{% set best = run.best or {} %}
<tr><td data-value="{{ run.name }}"><a href="#run-{{ loop.index }}">{{ run.name }}</a></td>
<td class="text">{{ run.train.arch }}</td>
<td data-value="{{ best.get('val/acc/top1', -1) }}">{{ best.get('val/acc/top1') | num }}</td>
<td data-value="{{ best.get('val/acc/top5', -1) }}">{{ best.get('val/acc/top5') | num }}</td>
<td data-value="{{ best.get('val/acc/mean1', -1) }}">{{ best.get('val/acc/mean1') | num }}</td>
<td data-value="{{ run.multi_top1 if run.multi_top1 is not none else -1 }}">{{ run.multi_top1 | num }}</td>
<td data-value="{{ run.config.get('parameters', 0) }}">{{ "{:,}".format(run.config.get('parameters', 0)) }}</td>
<td data-value="{{ run.history | length }}">{{ run.history | length }}/{{ run.train.epochs }}</td>
<td data-value="{{ best.get('epoch', 0) }}">{{ best.get('epoch', '–') }}</td></tr>
{% endfor %}
</tbody>
</table>

{% for run in runs %}
<section class="run" id="run-{{ loop.index }}">
<h2>{{ run.name }}</h2>
<p class="muted">{{ run.path }} · {{ run.train.arch }} · train cache {{ run.train.cache }}
· val cache {{ run.train.val or "none" }} · lr {{ run.train.lr }}, batch {{ run.train.batch_size }},
width {{ run.train.width }}, seed {{ run.train.seed }}</p>
{% for note in run.notes %}<p class="note">{{ note }}</p>{% endfor %}
<div class="figures">
{% if run.curves %}<img class="plot" alt="training curves of {{ run.name }}" src="data:image/png;base64,{{ run.curves }}">{% endif %}
{% if run.confusion %}<img class="plot" alt="confusion matrix of {{ run.name }}" src="data:image/png;base64,{{ run.confusion }}">{% endif %}
</div>
{% if run.per_class %}
<h3>Per-class accuracy (val, all views; worst first)</h3>
<div class="scroll"><table class="per-class">
<thead><tr><th>class</th><th>videos</th><th>correct</th><th>accuracy</th></tr></thead>
<tbody>{% for row in run.per_class %}
<tr><td>{{ row.name }}</td><td>{{ row.videos }}</td><td>{{ row.correct }}</td><td>{{ row.accuracy | num }}</td></tr>
{% endfor %}</tbody></table></div>
{% endif %}
{% if run.worst %}
<h3>Worst-scored val videos (lowest probability of the true class)</h3>
<table class="worst">
<thead><tr><th>video</th><th class="text">true class (p)</th><th class="text">predicted (p)</th>
<th class="text">sampled frames</th></tr></thead>
<tbody>{% for video in run.worst %}
<tr><td class="text">{{ video.path }}</td>
<td class="text">{{ video.true }} ({{ video.true_prob | num }})</td>
<td class="text">{{ video.predicted }} ({{ video.predicted_prob | num }})</td>
<td class="text">{% if video.strip %}<img class="strip" alt="frames of {{ video.path }}" src="data:image/jpeg;base64,{{ video.strip }}">{% else %}<span class="note">{{ video.note }}</span>{% endif %}</td></tr>
{% endfor %}</tbody></table>
{% endif %}
{% if run.trained_views %}
<h3>Train views: the one each video was trained on in epoch {{ run.history[-1].epoch }} (&#10003;), as the model saw it</h3>
<table class="views"><tbody>{% for video in run.trained_views %}{% for view in video.views %}
<tr><td class="text">{% if loop.first %}{{ video.path }}{% endif %}</td><td>{{ "&#10003;" | safe if view.trained }} view {{ view.view }}</td>
<td class="text">crop {{ view.box }}{{ ", flipped" if view.flipped }}</td>
<td class="text">{% if view.strip %}<img class="strip" alt="view {{ view.view }} of {{ video.path }}" src="data:image/jpeg;base64,{{ view.strip }}">{% else %}<span class="note">{{ view.note }}</span>{% endif %}</td></tr>
{% endfor %}{% endfor %}</tbody></table>
{% endif %}
</section>
{% endfor %}

<script>
// Click a leaderboard header to sort by that column (numbers high to low first, names A to Z).
document.querySelectorAll("#leaderboard th").forEach(function (header, column) {
  var descending = column !== 0;
  header.addEventListener("click", function () {
    var body = document.querySelector("#leaderboard tbody");
    var rows = Array.from(body.rows);
    var value = function (row) { return row.cells[column].dataset.value; };
    rows.sort(function (a, b) {
      var x = value(a), y = value(b), order = column === 0 ? x.localeCompare(y) : Number(x) - Number(y);
      return descending ? -order : order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    descending = !descending;
  });
});
</script>
</body>
</html>
"""
