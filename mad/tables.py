"""Tables for a person at a terminal and for a log file.

On a terminal a table is a rich Table, fitted to the window. Anywhere else (Slurm, nohup, CI,
a pipe) rich fits it to 80 columns and cuts cells (`madap…`), so there the same Table is
printed as plain text with every cell whole: aligned columns, or comma-separated values
(quoted as CSV) when the aligned columns before the last would be wider than `WIDE`.
"""

from __future__ import annotations

import csv
import io

from rich.console import Console
from rich.table import Table
from rich.text import Text

WIDE = 120  # characters of aligned columns (the last one not counted) past which a table is written as CSV


def _plain(cell) -> str:
    if isinstance(cell, Text):
        return cell.plain
    if isinstance(cell, str):
        return Text.from_markup(cell).plain
    return str(cell)


def table_lines(table: Table) -> list[str]:
    """The table as plain lines: its title, the header, one line per row, its caption."""
    header = [_plain(column.header) for column in table.columns]
    rows = [list(row) for row in zip(*([_plain(cell) for cell in column.cells] for column in table.columns))]
    body = ([header] if table.show_header else []) + rows
    widths = [max(len(line[i]) for line in body) for i in range(len(header))] if body else []
    if sum(widths[:-1]) + 2 * len(widths[:-1]) > WIDE:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows(body)
        lines = out.getvalue().splitlines()
    else:
        right = [column.justify == "right" for column in table.columns]
        lines = ["  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(line, widths, right)).rstrip()
                 for line in body]
    title = [_plain(table.title)] if table.title else []
    caption = [_plain(table.caption)] if table.caption else []
    return title + lines + caption


def print_table(table: Table, console: Console | None = None) -> None:
    """A rich table on a terminal; elsewhere `table_lines`, so no cell is cut."""
    from mad.progress import make_console

    console = console or make_console()
    isatty = getattr(console.file, "isatty", None)
    if isatty is not None and isatty():
        console.print(table)
        return
    for line in table_lines(table):
        console.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
