"""A process tree as /proc shows it (Linux): who descends from a pid, and who of them is still running."""

from __future__ import annotations

import os
import signal
import time


def _stat(pid: int) -> tuple[str, int, str] | None:
    """(state, parent pid, start time) of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
    except OSError:
        return None
    return fields[0], int(fields[1]), fields[19]


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` now: pid -> start time (so a reused pid is not taken for a survivor)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(int(name))) is not None:
            children.setdefault(stat[1], []).append(int(name))
    found, stack = {}, list(children.get(pid, []))
    while stack:
        child = stack.pop()
        if (stat := _stat(child)) is not None:
            found[child] = stat[2]
            stack += children.get(child, [])
    return found


def running(processes: dict[int, str]) -> list[int]:
    """Those of `processes` (from `descendants`) still running: not gone, not a zombie, not a reused pid."""
    alive = []
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[0] != "Z" and stat[2] == started:
            alive.append(pid)
    return alive


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def survivors_of_sigkill(process, within: float) -> tuple[dict[int, str], list[str]]:
    """SIGKILL `process` (a Popen); (its descendants just before, those still running `within` s later).
    Survivors are killed before returning, so a failing test leaves no orphans behind."""
    tree = descendants(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + within
    while running(tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = running(tree)
    descriptions = {pid: command_line(pid) for pid in left}
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree, [f"{pid}: {descriptions[pid]}" for pid in left]
