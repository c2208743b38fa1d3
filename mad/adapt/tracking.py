"""Experiment trackers: `mad train --log tensorboard` mirrors metrics.jsonl into TensorBoard.

The run folder stays the source of truth. A tracker gets each epoch's metrics.jsonl row
once it is written, and logs every number in it under the same name at step = epoch (a resumed
run logs its earlier epochs again, from metrics.jsonl, so the tracker always shows the run folder's numbers):

    runs/<name>/tensorboard/events.out.tfevents.*    (tensorboard --logdir runs)

TensorBoard is optional (`pip install 'mad[tensorboard]'`); asking for it without the
package fails before any data is read.
"""

from __future__ import annotations

from pathlib import Path

from mad.errors import MadError

TRACKERS = ("tensorboard",)


class TrackingError(MadError):
    """A --log request that cannot be served."""


def parse_log(spec: str | None) -> list[str]:
    """'none' -> [], 'tensorboard' -> ['tensorboard'] (a comma-separated list, for trackers to come)."""
    names = [name.strip() for name in (spec or "none").split(",") if name.strip()]
    names = [name for name in names if name != "none"]
    for name in names:
        if name not in TRACKERS:
            raise TrackingError(f"--log {spec!r}: {name!r} is not a tracker; use none or {', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def check_log(spec: str | None) -> list[str]:
    """The trackers asked for, after checking their packages are installed."""
    names = parse_log(spec)
    if "tensorboard" in names:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise TrackingError("--log tensorboard needs the tensorboard package: "
                                "pip install tensorboard (or pip install 'mad[tensorboard]')") from None
    return names


class Trackers:
    """Every tracker of one run; `log(row)` after each metrics.jsonl line. Use as a context manager."""

    def __init__(self, spec: str | None, run: Path, history: list[dict] = ()):
        self.writers = []
        for name in check_log(spec):
            if name == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                # purge_step=1 hides every event logged before (a resumed run's, or one a killed run wrote
                # past its last checkpoint); the history is logged again below, from metrics.jsonl.
                self.writers.append(SummaryWriter(log_dir=str(Path(run) / "tensorboard"), purge_step=1))
        for row in history:  # a resumed run: its epochs so far, also when it ran without this tracker
            self.log(row)

    def log(self, row: dict) -> None:
        """Every number of an epoch's row but the epoch itself, at step = epoch."""
        for writer in self.writers:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, global_step=row["epoch"])
            writer.flush()  # visible at once in a running TensorBoard

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
