"""`mad report`: the page in a real headless browser, its numbers against `mad eval`, missing videos, errors.

The runs train on small synthetic caches (tests.helpers.cache) whose recorded video paths point at
real mp4s written here, so the frame strips decode real files. The browser is Debian's chromium
(`.ci/run` installs it); elsewhere the browser tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from mad.adapt.evaluate import evaluate
from mad.adapt.sweep import sweep
from mad.adapt.train import TrainConfig, train
from mad.cache.dataset import open_tokens
from mad.errors import MadError
from mad.report import ReportError, build_report, write_report
from mad.synthetic import write_video
from tests.helpers.browser import find_chromium, load_page
from tests.helpers.cache import make_cache

CHROMIUM = find_chromium()


def chromium() -> str:
    """The browser, or skip where it is absent (a user's machine); CI installs it, so there it must be."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run should have installed it (apt-get install chromium)")
        pytest.skip("chromium is not installed (Debian: apt-get install chromium): the report's browser test "
                    "needs a real browser")
    return CHROMIUM


def write_clip(path, seed: int, frames: int = 12) -> None:
    """A small mp4: a plain colour per video and a white bar moving 4 px per frame."""
    video = np.zeros((frames, 48, 64, 3), np.uint8)
    video[..., seed % 3] = 60 + 20 * seed
    for t in range(frames):
        video[t, 10:30, 4 * t:4 * t + 12] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, video)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A sweep of two runs and two lone runs (one without val); the val cache has 2 clips per video."""
    root = tmp_path_factory.mktemp("report")
    videos = root / "videos"
    # Unbalanced (5 and 3 labelled videos), so val top-1 and mean class accuracy differ.
    val = make_cache(root / "val", videos_per_class=5, clips=2, seed=3, unlabelled=(1, 3), videos_root=str(videos))
    make_cache(root / "train", videos_per_class=8, videos_root=str(videos))
    for i, path in enumerate(val.paths()):
        write_clip(videos / path, i)
    caches = dict(cache=str(root / "train"), val=str(root / "val"))
    base = TrainConfig(epochs=2, width=16, heads=2, workers=0, batch_size=8, device="cpu", in_ram="yes")
    sweep(caches["cache"], caches["val"], "arch=madapter,linear", str(root / "sweep"), base, quiet=True)
    for name, options in {"solo": dict(arch="meanpool", **caches), "noval": dict(cache=caches["cache"])}.items():
        cfg = TrainConfig(**{**base.__dict__, **options, "out": str(root / name)})
        train(cfg, quiet=True)
    return root


def summaries(*folders) -> dict[str, dict]:
    """{name shown in the report: summary.json} for the runs in `folders` (sweeps expanded as the report does)."""
    found = {}
    for folder in folders:
        if (folder / "summary.json").exists():
            found[folder.name] = json.loads((folder / "summary.json").read_text())
        else:
            for run in sorted(folder.glob("*/summary.json")):
                found[f"{folder.name}/{run.parent.name}"] = json.loads(run.read_text())
    return found


LEADERBOARD = "[...document.querySelectorAll('#leaderboard tbody tr')].map(r => [...r.cells].map(c => c.innerText.trim()))"


@pytest.mark.slow
@pytest.mark.e2e
def test_report_loads_in_headless_chromium_without_errors_and_shows_every_run(runs, tmp_path):
    out = write_report([runs / "sweep", runs / "solo", runs / "noval"], tmp_path / "report.html", device="cpu",
                       worst=8)
    expected = summaries(runs / "sweep", runs / "solo", runs / "noval")
    assert len(expected) == 4
    page = load_page(chromium(), out, {
        "rows": LEADERBOARD,
        "images": "[...document.images].map(i => [i.className, i.naturalWidth, i.naturalHeight])",
        "headings": "[...document.querySelectorAll('section.run h2')].map(h => h.innerText)",
        "sorted_by_name": "document.querySelector('#leaderboard th').click(); " + LEADERBOARD + ".map(r => r[0])",
    })
    assert page.errors == []
    # Self-contained: the page itself, then nothing but its own embedded images.
    assert page.requests[0] == out.resolve().as_uri()
    assert all(url.startswith("data:image/") for url in page.requests[1:]), page.requests
    rows = {row[0]: row for row in page.values["rows"]}
    assert set(rows) == set(expected) == set(page.values["headings"])
    assert any(s["val/acc/top1"] != s["val/acc/mean1"] for s in expected.values() if "val/acc/top1" in s)
    for name, summary in expected.items():
        top1 = f"{summary['val/acc/top1']:.3f}" if "val/acc/top1" in summary else "–"
        assert rows[name][1:3] == [summary["arch"], top1], rows[name]
        assert rows[name][6] == f"{summary['parameters']:,}"
    assert [row[0] for row in page.values["rows"]][-1] == "noval"  # ranked by val top-1; no val last
    assert page.values["sorted_by_name"] == sorted(expected)  # the page's own script ran
    images = page.values["images"]
    assert all(width > 0 and height > 0 for _, width, height in images)  # every embedded image decodes
    kinds = [kind for kind, _, _ in images]
    assert kinds.count("plot") == 4 + 3  # curves of every run, confusion of the three with a val cache
    assert kinds.count("strip") == 3 * 8  # the 8 labelled val videos, all shown with frames, for each scored run
    assert all(height == 64 for kind, _, height in images if kind == "strip")


@pytest.mark.slow
@pytest.mark.e2e
def test_browser_check_fails_on_a_script_error_or_an_outside_request(runs, tmp_path):
    page = write_report([runs / "solo"], tmp_path / "report.html", device="cpu", worst=2).read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("</body>", "<script>document.querySelector('#nothing').click();</script></body>"))
    errors = load_page(chromium(), broken).errors
    assert len(errors) == 1 and "TypeError" in errors[0]
    logged = tmp_path / "logged.html"
    logged.write_text(page.replace("</body>", "<script>console.error('bad');</script></body>"))
    assert load_page(chromium(), logged).errors == ["console: bad"]
    outside = tmp_path / "outside.html"
    outside.write_text(page.replace("</body>", '<img src="https://example.invalid/x.png"></body>'))
    assert "https://example.invalid/x.png" in load_page(chromium(), outside).requests


def test_scores_match_mad_eval_and_worst_videos_have_the_lowest_true_probability(runs):
    from mad.adapt.checkpoint import load_model

    report = {run.name: run for run in build_report([runs / "solo", runs / "sweep"], device="cpu", worst=3)}
    data = open_tokens(str(runs / "val"), "yes", progress=False)
    for name, path in [("solo", runs / "solo"), ("sweep/01-arch=madapter", runs / "sweep" / "01-arch=madapter")]:
        run = report[name]
        result = evaluate(path, runs / "val", device="cpu", progress=False)
        assert run.multi_top1 == pytest.approx(result["multi_view"]["acc/top1"])
        confusion = np.array(result["confusion"])
        assert {row["name"]: (row["videos"], row["correct"]) for row in run.per_class} == {
            name: (int(confusion[c].sum()), int(confusion[c, c])) for c, name in enumerate(result["class_names"])}
        # The worst videos by hand: each view through the model, softmaxes averaged.
        model, _ = load_model(path / "model.safetensors")
        with torch.no_grad():
            probs = torch.stack([model([a[:, view] for a in data.arrays]).softmax(-1) for view in range(2)]).mean(0)
        true_prob = probs[torch.arange(len(data.labels)), data.labels]
        lowest = true_prob.argsort()[:3].tolist()
        assert [video["path"] for video in run.worst] == [data.paths[i] for i in lowest]
        assert [video["true_prob"] for video in run.worst] == pytest.approx(true_prob[lowest].tolist(), abs=1e-5)
        assert all(video["strip"] and video["note"] is None for video in run.worst)
    data.close()


def test_a_video_gone_from_disk_loses_only_its_frame_strip(runs, tmp_path):
    first = build_report([runs / "solo"], device="cpu", worst=8)[0]
    gone = runs / "videos" / first.worst[0]["path"]
    moved = tmp_path / "moved.mp4"
    shutil.move(gone, moved)
    try:
        run = build_report([runs / "solo"], device="cpu", worst=8)[0]
        assert run.worst[0]["strip"] is None and run.worst[0]["note"] == f"video no longer on disk: {gone}"
        assert all(video["strip"] for video in run.worst[1:])
        assert f"video no longer on disk: {gone}" in write_report([runs / "solo"], tmp_path / "r.html").read_text()
    finally:
        shutil.move(moved, gone)


def test_runs_without_val_cache_or_finished_epoch_get_a_note(runs, tmp_path):
    run = build_report([runs / "noval"], device="cpu")[0]
    assert run.curves and run.confusion is None and run.worst == []
    assert run.notes == ["trained without a val cache: no confusion matrix, per-class accuracy or worst videos"]
    started = tmp_path / "sweep" / "02-just-started"  # a sweep's current run: config.json, no epoch, no model
    shutil.copytree(runs / "solo", tmp_path / "sweep" / "01-done")
    started.mkdir()
    shutil.copy(runs / "solo" / "config.json", started)
    (started / "metrics.jsonl").write_text("")
    done, new = build_report([tmp_path / "sweep"], device="cpu")
    assert done.name == "sweep/01-done" and done.worst and not done.notes
    assert new.name == "sweep/02-just-started" and new.notes == ["no epoch finished yet: nothing to show"]
    assert new.curves is None and new.best is None
    assert "no epoch finished yet" in write_report([tmp_path / "sweep"], tmp_path / "r.html", device="cpu").read_text()


def test_decode_frames_gives_the_frames_extraction_decoded(tmp_path):
    from mad.extract.decode import decode_clip, decode_frames

    write_clip(tmp_path / "clip.mp4", 1, frames=20)
    clip = decode_clip(str(tmp_path / "clip.mp4"), frames=4, clips=2, size=32)
    for c in range(2):
        frames = decode_frames(str(tmp_path / "clip.mp4"), clip.frame_index[c], 32)  # [4, 32, 42, 3]: no crop
        left = (frames.shape[2] - 32 + 1) // 2
        assert np.array_equal(frames[:, :, left:left + 32].transpose(0, 3, 1, 2), clip.frames[c])


def test_errors_are_one_line_and_name_the_folder(runs, tmp_path):
    from typer.testing import CliRunner

    from mad.cli import app

    with pytest.raises(ReportError, match=f"^{tmp_path / 'nope'}: no such folder$"):
        build_report([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="empty: not a run folder .* nor a sweep folder"):
        build_report([tmp_path / "empty"])
    copy = shutil.copytree(runs / "solo", tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    config["train"]["val"] = str(tmp_path / "gone")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ReportError, match=f"copy: its val cache {tmp_path / 'gone'} is gone"):
        build_report([copy])
    (copy / "model.safetensors").unlink()
    with pytest.raises(ReportError, match="model.safetensors: the run's model is gone"):
        build_report([copy])
    with pytest.raises(ReportError, match="--worst -1: give a number of videos"):
        build_report([runs / "solo"], worst=-1)
    assert issubclass(ReportError, MadError)

    runner = CliRunner()
    result = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert result.exit_code == 2 and result.output.strip().splitlines()[-1].startswith(
        f"error: {tmp_path / 'empty'}: not a run folder")
    result = runner.invoke(app, ["report", str(runs / "noval"), "--out", str(tmp_path / "cli.html")])
    assert result.exit_code == 0, result.output
    assert "noval" in (tmp_path / "cli.html").read_text()
