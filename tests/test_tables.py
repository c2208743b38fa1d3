"""Tables without a terminal (Slurm logs, pipes, CI): every cell whole, not cut at 80 columns."""

from __future__ import annotations

from rich.table import Table
from typer.testing import CliRunner

from mad.cli import app
from tests.helpers import TINY_MODEL
from tests.helpers.cache import make_cache


def test_a_wide_table_off_a_terminal_keeps_every_cell(capsys):
    from mad.tables import print_table

    table = Table(title="runs")
    for column in ("run", "setting", "val top-1", "parameters"):
        table.add_column(column, justify="right" if column != "run" else "left")
    name = "demo/runs/" + "madapter-with-a-long-name-" * 4
    table.add_row(name, "lr=0.0003,width=384,arch=madapter", "[bold]0.975[/bold]", "1,234,567")
    table.add_row("linear", "lr=0.001", "0.500", "12,345")
    print_table(table)  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    assert name in out and "lr=0.0003,width=384,arch=madapter" in out and "parameters" in out
    assert "…" not in out and "[bold]" not in out and "0.975" in out
    # wider than WIDE before its last column: CSV, quoted where a cell holds a comma
    assert f'{name},"lr=0.0003,width=384,arch=madapter",0.975,"1,234,567"' in out


def test_sweep_leaderboard_off_a_terminal_keeps_arch_and_column_names(tmp_path, monkeypatch, capsys):
    import mad.adapt.sweep as sweep_module

    make_cache(tmp_path / "cache", videos_per_class=2)
    summary = {"val/acc/top1": 0.5, "val/acc/top5": 1.0, "val/acc/mean1": 0.5, "train/acc": 0.75, "train/loss": 0.7,
               "parameters": 123456, "seconds": 1.5, "epochs": 3, "best_epoch": 2, "last/val/acc/top1": 0.5}
    monkeypatch.setattr(sweep_module, "train_lockstep",
                        lambda members, *args, **kwargs: [dict(summary, run=cfg.out) for cfg, _ in members])
    sweep_module.sweep(str(tmp_path / "cache"), str(tmp_path / "cache"), "arch=madapter,meanpool lr=3e-4,1e-3",
                       str(tmp_path / "sweep"))
    out = capsys.readouterr().out
    board = out[out.index("sweep leaderboard"):]
    assert "…" not in board
    assert board.count("madapter") == 2 and board.count("meanpool") == 2 and "params" in board and "123,456" in board


def test_plan_table_off_a_terminal_is_whole():
    result = CliRunner().invoke(app, ["plan", "--num-videos", "1000", "--model", TINY_MODEL, "--layers", "2,4",
                                      "--val-videos", "100", "--val-views", "9", "--probe", "0"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and TINY_MODEL in result.output
    assert "videos x views" in result.output and "read every view" in result.output and "extraction" in result.output


def test_info_table_off_a_terminal_is_whole(tmp_path):
    root = "/data/" + "a-folder-of-videos-with-a-long-name/" * 3
    store = make_cache(tmp_path / "cache", videos_per_class=2, videos_root=root)
    result = CliRunner().invoke(app, ["info", store.location])
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and root in result.output
    assert "per done video-view" in result.output and "layers/2" in result.output
