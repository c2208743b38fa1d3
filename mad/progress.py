"""Progress for a person at a terminal and for a log file.

On a terminal (stdout is a tty) progress is a rich bar redrawn in place. Anywhere else
(Slurm, nohup, CI, a pipe) a redrawn bar leaves nothing readable: rich draws it once, at
the end, or (FORCE_COLOR set) as carriage returns and ANSI codes. There progress is plain
lines instead, `PlainProgress`, and rich text is printed with no colour, no control codes
and no wrapping (`make_console`).
"""

from __future__ import annotations

import sys
import time

from rich.console import Console


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
