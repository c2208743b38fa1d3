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
