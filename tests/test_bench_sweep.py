"""`mad bench sweep`'s measuring: a process tree's bytes read, counted after its children are reaped."""

from __future__ import annotations

import sys

import pytest

from mad.bench.sweep import BenchSweepError, grid_points, parse_ks
from mad.bench.tree import run_measured


def test_tree_counts_a_grandchild_reading_a_known_file(tmp_path):
    data = tmp_path / "data.bin"
    data.write_bytes(b"x" * 3_000_000)
    reader = f"open({str(data)!r}, 'rb').read()"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {reader!r}], check=True)"
    empty = run_measured([sys.executable, "-c", "pass"], tmp_path / "empty.json")
    measured = run_measured([sys.executable, "-c", parent], tmp_path / "tree.json")
    assert measured["returncode"] == 0
    # the grandchild's 3 MB, plus two Python start-ups (each about one empty run's reads)
    extra = measured["rchar"] - 2 * empty["rchar"]
    assert 3_000_000 <= extra < 3_000_000 + 0.5 * empty["rchar"] + 200_000, (measured, empty)


def test_grid_points_and_ks():
    assert [len(grid_points(k)) for k in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert {p["weight_decay"] for p in grid_points(4)} == {0.05, 0.01}
    assert parse_ks("1,2,4,8") == [1, 2, 4, 8]
    for bad in ("0", "a", "", "99"):
        with pytest.raises(BenchSweepError):
            parse_ks(bad)


def test_reader_counts_that_the_sweep_cannot_match_are_refused_before_any_work(monkeypatch):
    import mad.bench.sweep as bench

    monkeypatch.setattr(bench, "sweep_accepts", lambda option: False)
    monkeypatch.setattr(bench, "build_store", lambda *a: pytest.fail("built a store"))
    with pytest.raises(BenchSweepError, match="--workers 0: this mad sweep takes no --workers"):
        bench.bench_sweep(workers=0, out=None)


@pytest.mark.slow
def test_smoke_from_the_command_line(tmp_path):
    """`mad bench sweep --smoke` end to end: both sides ran, and the K=2 sweep read less of the store."""
    import json
    import subprocess

    run = subprocess.run([sys.executable, "-m", "mad", "bench", "sweep", "--smoke", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "bench_sweep_cpu_smoke.json").read_text())
    assert result["smoke"] and set(result["results"]) == {"1", "2"}
    assert len(result["runs"]) == 4 and {r["mode"] for r in result["runs"]} == {"lockstep", "sequential"}
    two = result["results"]["2"]
    assert two["lockstep"]["store_bytes"]["median"] < two["sequential"]["store_bytes"]["median"]
    assert (tmp_path / "bench_sweep_cpu_smoke.md").read_text().startswith("# mad bench sweep")
