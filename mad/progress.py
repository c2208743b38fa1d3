"""Progress for a person at a terminal and for a log file.

On a terminal (stdout is a tty) progress is a rich bar redrawn in place. Anywhere else
(Slurm, nohup, CI, a pipe) a redrawn bar leaves nothing readable: rich draws it once, at
the end, or (FORCE_COLOR set) as carriage returns and ANSI codes. There progress is plain
lines instead, `PlainProgress`, and rich text is printed with no colour, no control codes
and no wrapping (`make_console`). The one progress module: extraction's `VideoProgress`,
training's `EpochLog`, and `passing_bar` (reading a store into RAM) all draw through it.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def plain() -> bool:
    """True when stdout is not a terminal: progress is written as plain lines."""
    return not sys.stdout.isatty()


def make_console(quiet: bool = False, stderr: bool = False, highlight: bool = False) -> Console:
    """A rich Console for messages; into a file or pipe it writes plain text (no codes, lines unwrapped)."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(quiet=quiet, stderr=stderr, highlight=highlight)
    # force_terminal=False and no colour system also when FORCE_COLOR is set: a log file gets plain text.
    return Console(quiet=quiet, stderr=stderr, highlight=False, color_system=None, force_terminal=False,
                   soft_wrap=True)


def passing_bar(enabled: bool = True) -> Progress:
    """A bar that clears itself when done: on a terminal only (none in a log)."""
    return Progress(transient=True, disable=not enabled or plain())


def format_seconds(seconds: float) -> str:
    """h:mm:ss, as rich's time columns show it."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class PlainProgress:
    """One plain line per 1/`steps` of the total (10%), at least every `interval` seconds, and at the end.

        extract 6/12 (50%)  14.12 videos/s  ETA 0:00:00  0 failed

    `processed` counts every video handled (as the bar's done/total), `done` those that succeeded (the rate).
    """

    def __init__(self, label: str, total: int, steps: int = 10, interval: float = 300.0, unit: str = "videos"):
        self.label, self.total, self.steps, self.interval, self.unit = label, total, steps, interval, unit
        self.started = self.last_time = time.perf_counter()
        self.last_step = 0  # the last of the `steps` steps printed
        self.processed = self.done = self.failed = 0
        self.printed = 0  # `processed` when the last line was printed

    def update(self, processed: int, done: int, failed: int) -> None:
        self.processed, self.done, self.failed = processed, done, failed
        step = processed * self.steps // self.total if self.total else 0  # integers: 30/100 is step 3, exactly
        now = time.perf_counter()
        if step > self.last_step or now - self.last_time >= self.interval or processed >= self.total:
            self.last_step = step
            self.emit(now)

    def emit(self, now: float | None = None) -> None:
        if self.printed == self.processed:  # nothing new since the last line
            return
        now = time.perf_counter() if now is None else now
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        per_item = elapsed / self.processed
        eta = format_seconds(per_item * (self.total - self.processed))
        percent = 100 * self.processed / self.total if self.total else 100.0
        print(f"{self.label} {self.processed}/{self.total} ({percent:.0f}%)  {rate:.2f} {self.unit}/s  "
              f"ETA {eta}  {self.failed} failed", flush=True)
        self.printed, self.last_time = self.processed, now

    def stop(self) -> None:
        """The last line, if the counts moved since the one before (e.g. a run stopped early)."""
        self.emit()


class VideoProgress:
    """Videos done/total, videos/s, ETA, failures so far: a rich bar on a terminal, plain lines elsewhere."""

    def __init__(self, total: int, enabled: bool, label: str = "extract"):
        self.progress = self.lines = None
        self.failed = self.done = 0
        self.started = time.perf_counter()
        if not enabled:
            return
        if plain():
            self.lines = PlainProgress(label, total)
            return
        self.progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} videos/s"),
            TimeRemainingColumn(), TextColumn("[red]{task.fields[failed]} failed"),
        )
        self.task = self.progress.add_task("extract", total=total, rate="-", failed=0)
        self.progress.start()

    def advance(self, n: int = 1, failed: bool = False) -> None:
        self.failed += failed
        self.done += 0 if failed else n
        if self.lines is not None:
            self.lines.update(self.done + self.failed, self.done, self.failed)
        if self.progress is None:
            return
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=n, rate=f"{rate:.2f}", failed=self.failed)

    def stop(self) -> None:
        if self.lines is not None:
            self.lines.stop()
        if self.progress is not None:
            self.progress.stop()


class EpochLog:
    """Training progress fed by the epoch loop: a rich bar per epoch on a terminal, one plain line per
    epoch elsewhere (Slurm, nohup, CI), nothing when quiet."""

    def __init__(self, quiet: bool, epochs: int, steps_per_epoch: int):
        self.console = make_console(quiet)
        self.epochs, self.steps = epochs, steps_per_epoch
        self.plain = plain()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
                                 disable=quiet or self.plain)
        self.task = None

    def print(self, text: str) -> None:
        self.console.print(text)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def step(self, status: str) -> None:
        if self.plain:
            return
        if self.task is None:
            self.task = self.progress.add_task(f"epoch {len(self.progress.tasks) + 1}", total=self.steps, status="")
        self.progress.update(self.task, advance=1, status=status)

    def epoch_done(self, row: dict) -> None:
        val = f"  val {row['val/acc/top1']:.3f}" if "val/acc/top1" in row else ""
        status = (f"loss {row['train/loss']:.4f}  acc {row['train/acc']:.3f}{val}  "
                  f"{row['clips_per_second']:.0f} clips/s")
        if self.plain:
            self.print(f"epoch {row['epoch']}/{self.epochs}  {status}  {row['epoch_seconds']:.1f} s")
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=self.steps, status="")
        self.progress.update(self.task, description=f"epoch {row['epoch']}/{self.epochs}", status=status)
        self.task = None
