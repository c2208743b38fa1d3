"""Every option of `mad train`, `mad sweep`, `mad extract` and `mad plan` refuses a bad value in one line,
exit 2, before any work: no traceback, nothing written (a property-based test draws the values).

Also the exit-code policy (user error 2, nothing processed 1) and the refusals' wording: what differs,
in a few words, never a dump of the store's settings.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import string
import tempfile
import warnings

import pytest
import typer.main
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mad.adapt.train import TrainConfig
from mad.cli import app
from mad.extract.run import ExtractConfig
from mad.options import Range, at_least
from mad.plan import PlanConfig
from mad.plan_sweep import SweepPlanConfig
from tests.helpers import TINY_MODEL, extract_config
from tests.helpers.cache import make_cache

RUNNER = CliRunner()


@contextlib.contextmanager
def empty_folder():
    """Run inside a new empty folder (where a command's default --out would be made)."""
    before = os.getcwd()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        try:
            yield folder
        finally:
            os.chdir(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A synthetic cache and a folder of 6 small clips: what a command would read if it did not refuse first."""
    from mad.synthetic import make_demo_videos

    root = tmp_path_factory.mktemp("inputs")
    make_cache(root / "cache", videos_per_class=2)
    videos = make_demo_videos(root / "videos", videos_per_class=1, val_per_class=0, num_frames=8, size=64)["train"]
    return {"cache": str(root / "cache"), "videos": str(videos)}


# ---- what to draw -----------------------------------------------------------------------------

WORDS = st.text(alphabet=string.ascii_letters + string.digits + ",:._", max_size=8)
NOT_AN_INT = st.sampled_from(["abc", "1.5", "", "2k", "one"])
NOT_A_NUMBER = st.sampled_from(["abc", "", "1e", "one", "0x", "1,5"])


def out_of(allowed: Range) -> st.SearchStrategy[str]:
    """Numbers outside `allowed` and strings that are no number of its kind, as typed on a command line."""
    if allowed.integer:
        numbers = st.integers(-10**12, 10**12)
        wrong = NOT_AN_INT
    else:
        numbers = st.floats(-1e12, 1e12, allow_nan=False) | st.sampled_from([math.nan, math.inf, -math.inf])
        wrong = NOT_A_NUMBER
    if allowed.high is not None:
        numbers = numbers | (st.integers(int(allowed.high) + 1, 2**70) if allowed.integer else
                             st.floats(allowed.high, 1e30))
    return numbers.filter(lambda x: x not in allowed).map(repr) | wrong


def not_one_of(choices) -> st.SearchStrategy[str]:
    named = {str(c) for c in choices}
    if all(isinstance(c, int) for c in choices):
        return st.integers(-100, 100).map(str).filter(lambda v: v not in named) | NOT_AN_INT
    return WORDS.filter(lambda v: v not in named)


LAYERS = st.sampled_from(["0", "a", "", ",", "1,x", "1.5", "2,0", "4-8"])
LAYERS_OF_TINY = LAYERS | st.sampled_from(["5", "-5", "1,99"])  # the tiny model has blocks 1..4
CELL_SIZE = st.sampled_from(["0", "-1", "x", "1.5", "", "auto2"]) | st.integers(-1000, 0).map(str)
DEVICE = st.sampled_from(["foo", "gpu", "cuda:x", "cuda:99", "cpu:x", "", "CPU"])
LOG = st.sampled_from(["foo", "wandb", "tensorboard,x", "none,y"])
BRANCH_SIZE = st.integers(-1000, 0).map(str) | NOT_AN_INT  # --width, --depth, --heads of madapter: >= 1


def numbers_and_choices(config) -> dict:
    """option -> strategy, from a config's own RANGES and CHOICES."""
    drawn = {"--" + name.replace("_", "-"): out_of(allowed) for name, allowed in config.RANGES.items()}
    drawn.update({"--" + name.replace("_", "-"): not_one_of(choices)
                  for name, choices in getattr(config, "CHOICES", {}).items()})
    return drawn


def bad_grid() -> st.SearchStrategy[str]:
    """A --grid with one refused point: a value out of a setting's range, or a malformed item."""
    out_of_range = st.sampled_from(sorted(TrainConfig.RANGES.items())).flatmap(
        lambda item: out_of(item[1]).filter(lambda v: " " not in v and "," not in v and v)
        .map(lambda v: f"{item[0]}={v}"))
    malformed = st.sampled_from(["", "lr", "lr=", "=1", "foo=1", "cache=x", "out=y", "arch=vit", "lr=1e-3,,",
                                 "motion=maybe", "epochs=1.5", "width=0", "dropout=1", "lr=-1"])
    return out_of_range | malformed


def bad_space() -> st.SearchStrategy[str]:
    """A --space that cannot be searched: an empty or reversed range, a bound out of the setting's range."""
    return st.sampled_from(["lr=uniform:0.3:0.1", "lr=loguniform:0:1", "dropout=uniform:0:2", "foo=uniform:0:1",
                            "width=uniform:1.5:9", "lr=uniform:a:b", "lr=", "arch=uniform:0:1", ";"])


TRAIN = {**numbers_and_choices(TrainConfig), "--width": BRANCH_SIZE, "--depth": BRANCH_SIZE,
         "--heads": BRANCH_SIZE, "--cell-size": CELL_SIZE, "--device": DEVICE, "--log": LOG}
EXTRACT = {**numbers_and_choices(ExtractConfig), "--layers": LAYERS_OF_TINY, "--cell-size": CELL_SIZE,
           "--device": DEVICE, "--branches": st.sampled_from(["foo", "madapter,bar", "evl2", "mad adapter"]),
           "--evl-layers": out_of(at_least(1)),
           "--crop-scale": st.sampled_from(["0,1", "0.5,1.5", "1,0.5", "x", "", "0.5", "-1,1", "nan,1", "1/0,1"]),
           "--crop-ratio": st.sampled_from(["0,1", "2,1", "x", "", "-1,2", "1", "1,2,3"]),
           "--shard": st.sampled_from(["x", "1/1", "2/1", "-1/2", "1/0", "1/2/3", "a/b", ""])}
COMMANDS = {
    # command: (arguments it is valid with, the options' bad values, options whose values are names of files,
    # folders or models: checked when used)
    "train": (lambda i: ["--cache", i["cache"]], TRAIN, {"--cache", "--val", "--out", "--init"}),
    "sweep": (lambda i: ["--grid", "lr=1e-3", "--cache", i["cache"]],
              {**{k: TRAIN[k] for k in ("--epochs", "--batch-size", "--device", "--seed", "--in-ram", "--workers",
                                         "--log")},
               "--grid": bad_grid(), "--space": bad_space(), "--trials": st.sampled_from(["0", "-3", "abc", "1.5"]),
               "--sampler": st.sampled_from(["cmaes", "grid", "", "TPE"]),
               "--pruner": st.sampled_from(["median", "", "halving,hyperband"]),
               "--at-once": st.sampled_from(["0", "-1", "x"]), "--max-stack": st.sampled_from(["0", "-2", "x"]),
               "--study-name": st.sampled_from(["", " "])},
              {"--cache", "--val", "--out", "--storage"}),
    "extract": (lambda i: ["--videos", i["videos"], "--model", TINY_MODEL, "--pretrained", "none", "--layers", "1,2"],
                EXTRACT, {"--videos", "--out", "--model", "--pretrained", "--labels"}),
    "plan": (lambda i: ["--num-videos", "10", "--model", TINY_MODEL, "--layers", "1,2", "--probe", "0"],
             {**EXTRACT, **numbers_and_choices(PlanConfig), **numbers_and_choices(SweepPlanConfig)},  # extract's too
             {"--videos", "--out", "--model", "--pretrained", "--labels"}),
}
# config fields that are no option of the command line
NOT_ON_THE_COMMAND_LINE = {"--correlation-groups"}
COMMAND_OPTIONS = [(name, flag) for name, (_, drawn, _) in sorted(COMMANDS.items()) for flag in sorted(drawn)
                   if flag not in NOT_ON_THE_COMMAND_LINE]
# warnings a user never sees (Python ignores them outside __main__); any other would be a second line
UNSEEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def cli_options(command: str) -> dict[str, bool]:
    """Every option of `mad <command>` (its first name) -> whether it is a flag."""
    params = typer.main.get_command(app).commands[command].params
    return {p.opts[0]: bool(getattr(p, "is_flag", False)) for p in params}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_that_takes_a_value_has_values_drawn_for_it(command):
    _, drawn, names = COMMANDS[command]
    takes_value = {flag for flag, is_flag in cli_options(command).items() if not is_flag}
    assert takes_value - names == set(drawn) - NOT_ON_THE_COMMAND_LINE


def assert_refused(result, flag: str, folder: str) -> None:
    """exit 2, exactly one stderr line naming the option, no traceback, nothing written in `folder`."""
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not an escaped exception
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1, (result.exit_code, result.stderr)
    assert lines[0].startswith("error: ") and flag in lines[0], lines
    assert os.listdir(folder) == [], os.listdir(folder)


@pytest.mark.parametrize("command,flag", COMMAND_OPTIONS)
@settings(max_examples=4, deadline=None, database=None)
@given(data=st.data())
def test_a_bad_value_of_any_option_is_one_line_exit_2_and_writes_nothing(inputs, command, flag, data):
    valid, drawn, _ = COMMANDS[command]
    value = data.draw(drawn[flag], label=flag)
    with empty_folder() as folder, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = RUNNER.invoke(app, [command, *valid(inputs), flag, value])  # defaults write here (runs/, cache/)
        assert_refused(result, flag, folder)
    assert [str(w.message) for w in caught if not issubclass(w.category, UNSEEN)] == []


@pytest.mark.parametrize("args,flag", [
    (["train", "--lr", "-1"], "--lr"), (["train", "--dropout", "2"], "--dropout"),
    (["sweep", "--grid", "lr=-1"], "--grid"), (["train", "--epochs", "abc"], "--epochs"),
    (["train", "--resume"], "--resume"), (["train", "--resume", "--overwrite", "--out", "r"], "--resume"),
])
def test_the_issues_examples_are_refused_before_any_run_folder(inputs, args, flag):
    with empty_folder() as folder:
        result = RUNNER.invoke(app, [*args, "--cache", inputs["cache"]])
        assert_refused(result, flag, folder)


def test_usage_errors_are_one_line_not_a_panel():
    for args, expected in [(["train", "--epochs", "abc"], "error: Invalid value for '--epochs': "),
                           (["train", "--nope"], "error: No such option: --nope; see "),
                           (["extract"], "error: Missing option '--videos'; see "),
                           (["nosuch"], "error: No such command 'nosuch'; see ")]:
        result = RUNNER.invoke(app, args)
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith(expected), result.stderr


# ---- exit codes: 2 the command is wrong, 1 nothing could be processed ------------------------------


def test_exit_codes_user_error_2_nothing_processed_1(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").write_bytes(b"not a video")
    (videos / "b.mp4").write_bytes(b"")
    common = ["extract", "--videos", str(videos), "--model", TINY_MODEL, "--pretrained", "none", "--layers", "1,2",
              "--workers", "0", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = RUNNER.invoke(app, [*common, "--out", str(tmp_path / "store")])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error: no video could be extracted; reasons in ")
    result = RUNNER.invoke(app, [*common, "--out", str(tmp_path / "other"), "--frames", "0"])
    assert result.exit_code == 2 and not (tmp_path / "other").exists()


# ---- refusals say what differs, briefly ----------------------------------------------------------


def test_resuming_into_a_store_of_other_layers_says_which_in_a_few_words(tmp_path):
    from mad.extract.run import extract
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "v", videos_per_class=1, val_per_class=0, num_frames=8, size=64)["train"]
    out = tmp_path / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract(extract_config(videos, out, store="compact", layers="1,2", limit=1))
        result = RUNNER.invoke(app, ["extract", "--videos", str(videos), "--out", str(out), "--model", TINY_MODEL,
                                     "--pretrained", "none", "--layers", "1", "--workers", "0", "--precision", "fp32"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {out} was made with different settings (--layers: 1,2 in the store, 1 given); "
        "use another --out, or --overwrite to start over")


def test_a_val_cache_of_other_settings_is_refused_in_a_few_words(tmp_path):
    from mad.adapt.train import train

    make_cache(tmp_path / "train", videos_per_class=2, layers=(2, 4))
    make_cache(tmp_path / "val", videos_per_class=2, layers=(1, 4), width=16)
    with pytest.raises(Exception) as error:
        train(TrainConfig(cache=str(tmp_path / "train"), val=str(tmp_path / "val"), out=str(tmp_path / "run")),
              quiet=True)
    assert str(error.value) == (f"{tmp_path / 'val'}: does not match the training cache {tmp_path / 'train'} on "
                                "--layers: 1,4 here, 2,4 there; width (--model): 16 here, 32 there")
    assert not (tmp_path / "run").exists()


def test_compact_settings_are_compared_by_option_not_by_record_layout():
    from mad.cache.manifest import IDENTITY_KEYS
    from tests.helpers.cache import synthetic_manifest

    layout = [{"name": "cells0", "dtype": "int8", "shape": [8, 16, 64], "offset": 0}] * 40
    ours, theirs = synthetic_manifest(), synthetic_manifest(layers=(1,))
    ours.storage = theirs.storage = "compact"
    ours.compact = {"cell_size": 2, "correlation": 1, "correlation_groups": 4, "layout": layout, "record_bytes": 9}
    theirs.compact = {**ours.compact, "correlation": 2, "layout": layout[:20], "record_bytes": 5}
    assert ours.differences(theirs, IDENTITY_KEYS) == [("--layers", "2,4", "1"), ("--correlation", "1", "2")]


# ---- what is printed: once, and saying which epoch -------------------------------------------------


def test_an_unknown_pretrained_tag_is_printed_once_not_also_logged(tmp_path, inputs, caplog):
    with caplog.at_level(logging.INFO):
        result = RUNNER.invoke(app, ["extract", "--videos", inputs["videos"], "--out", str(tmp_path / "s"),
                                     "--model", TINY_MODEL, "--pretrained", "nosuchtag", "--layers", "1,2"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not a known tag" in result.stderr
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_info_says_unlabelled(tmp_path):
    make_cache(tmp_path / "c", videos_per_class=1, unlabelled=(0, 1), class_names=[], labelled_by="none")
    result = RUNNER.invoke(app, ["info", str(tmp_path / "c")])
    assert result.exit_code == 0
    (line,) = [line for line in result.output.splitlines() if line.strip().startswith("classes")]
    assert "unlabelled" in line and "0:" not in line


def test_summaries_say_best_or_last():
    from mad.adapt.sweep import leaderboard_table
    from mad.adapt.train import summary_line

    summary = {"epochs": 30, "best_epoch": 12, "train/loss": 0.25, "train/acc": 0.95, "val/acc/top1": 0.8,
               "val/acc/top5": 0.99, "val/acc/mean1": 0.79, "last/val/acc/top1": 0.75, "seconds": 3.0,
               "parameters": 10}
    assert summary_line(summary) == ("best epoch 12 (kept): val top-1 0.8000, top-5 0.9900, mean class 0.7900; "
                                     "last epoch 30: train loss 0.2500, train acc 0.9500, val top-1 0.7500")
    no_val = {k: v for k, v in summary.items() if not k.startswith(("val/", "last/"))}
    assert summary_line(no_val).startswith("last epoch 30: train loss 0.2500")
    table = leaderboard_table([{"lr": 0.1, **summary}], ["lr"], "val/acc/top1")
    headers = [column.header for column in table.columns]
    assert table.title == "sweep leaderboard (by best val/acc/top1)"
    assert {"best top1", "best top5", "best mean1", "last train acc", "last train loss"} <= set(headers)


def test_an_output_path_the_system_refuses_is_one_line(tmp_path, inputs):
    (tmp_path / "afile").write_text("")
    for args in (["train", "--cache", inputs["cache"], "--out", str(tmp_path / "afile")],
                 ["sweep", "--grid", "lr=1e-3", "--cache", inputs["cache"], "--out", str(tmp_path / "afile")],
                 ["demo", "--out", str(tmp_path / "afile")],
                 ["extract", "--videos", inputs["videos"], "--out", str(tmp_path / "afile"), "--model", TINY_MODEL,
                  "--pretrained", "none", "--layers", "1,2"],
                 ["extract", "--videos", inputs["videos"], "--out", str(tmp_path / "s"), "--model", TINY_MODEL,
                  "--pretrained", str(tmp_path / "afile"), "--layers", "1,2"]):  # an empty checkpoint file
        result = RUNNER.invoke(app, args)
        assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
        assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, (args, result.stderr)
        assert str(tmp_path / "afile") in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
