"""What a whole process tree reads and holds: run a command under this wrapper, get its bytes read and peak memory.

    python -m mad.bench.tree --report tree.json -- mad train --cache ...

The wrapper starts the command, waits for it and for every process it leaves behind (the wrapper is a
child subreaper, so an orphaned grandchild is reparented to it and reaped here too), then reads
/proc/self/io. Linux adds a reaped child's I/O counters, its own reaped children's included, to its
parent's, so after the wait /proc/self/io counts the whole tree (DataLoader reader processes and all).
The wrapper's own reads (its start-up, the memory sampling below) are taken out: they are the counters of
its own live threads (/proc/self/task/<tid>/io), which /proc/self/io also holds.

Two counters, both reported:
    rchar       bytes passed through read() and its kin: every file the tree reads (also a store in the page
                cache, and Python's own modules), and pipes
    read_bytes  bytes fetched from a block device (page-cache misses, also of mapped libraries): 0 for a store
                already in the page cache, so it depends on what ran before
`mad bench sweep` compares rchar (a small store stays in the page cache; every pass over it still costs its
bytes through read()); read_bytes is reported beside it. On 6.18 (this project's machine, 2026-12) a child
reading a 5 MB cached file through `cat` adds 5.0 MB to the wrapper's rchar and 0 to its read_bytes.

Peak memory: the tree's resident set (the sum of every live descendant's RSS from /proc/<pid>/status,
sampled every `interval` seconds; shared pages count once per process), and the largest single process's
peak (ru_maxrss of the reaped children).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36
COUNTERS = ("rchar", "read_bytes")


def read_io(path: str = "/proc/self/io") -> dict[str, int]:
    """The counters of one /proc io file (every field, as ints)."""
    with open(path) as f:
        return {name: int(value) for name, value in (line.split(": ") for line in f.read().splitlines())}


def own_threads_io() -> dict[str, int]:
    """The sum of this process's live threads' own counters: what it read itself, not its reaped children."""
    total = dict.fromkeys(COUNTERS, 0)
    for tid in os.listdir("/proc/self/task"):
        try:
            counters = read_io(f"/proc/self/task/{tid}/io")
        except FileNotFoundError:  # a thread that ended meanwhile
            continue
        for name in COUNTERS:
            total[name] += counters[name]
    return total


def children_of() -> dict[int, list[int]]:
    """parent pid -> its children's pids, for every process /proc shows."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_rss(root: int) -> int:
    """Bytes resident in `root` and all its descendants now."""
    tree, total, pending = children_of(), 0, [root]
    while pending:
        pid = pending.pop()
        pending.extend(tree.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status") as f:
                rss = next((line for line in f if line.startswith("VmRSS:")), None)
        except OSError:
            continue
        if rss is not None:
            total += int(rss.split()[1]) * 1024
    return total


class PeakSampler(threading.Thread):
    """Samples the RSS of the wrapper's descendants until stopped; keeps the largest."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.peak, self.samples = interval, 0, 0
        self.stopping = threading.Event()

    def run(self):
        me = os.getpid()
        while not self.stopping.is_set():
            self.peak = max(self.peak, tree_rss(me) - tree_rss_self())
            self.samples += 1
            self.stopping.wait(self.interval)


def tree_rss_self() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def measure(command: list[str], interval: float = 0.2, stdout=None, stderr=None, env=None) -> dict:
    """Run `command` as this process's child and measure its tree. Meant to run in a process of its own (the
    `python -m mad.bench.tree` wrapper): it counts every child this process ever reaped."""
    if sys.platform != "linux":
        raise OSError("mad.bench.tree reads /proc: Linux only")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # orphans of the tree are reaped here, their reads counted
    sampler = PeakSampler(interval)
    sampler.start()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env)
    returncode = process.wait()
    while True:  # the orphans the command left behind (reparented here), until none is left
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    seconds = time.perf_counter() - started
    whole, own = read_io(), own_threads_io()  # the sampler is still alive: its /proc reads are in `own`
    sampler.stopping.set()
    sampler.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    counted = {name: whole[name] - own[name] for name in COUNTERS}
    return {"command": command, "returncode": returncode, "seconds": seconds,
            "cpu_seconds": usage.ru_utime + usage.ru_stime, **counted,
            "peak_tree_rss": sampler.peak, "peak_process_rss": usage.ru_maxrss * 1024,
            "rss_samples": sampler.samples}


def run_measured(command: list[str], report: Path, log: Path | None = None, interval: float = 0.2,
                 env=None) -> dict:
    """Run `command` under the wrapper (a fresh Python process) and return its measurement; the command's
    output goes to `log` (default: discarded)."""
    wrapper = [sys.executable, "-m", "mad.bench.tree", "--report", str(report), "--interval", str(interval)]
    if log is not None:
        wrapper += ["--log", str(log)]
    subprocess.run([*wrapper, "--", *command], check=True, env=env)
    return json.loads(Path(report).read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mad.bench.tree", description=__doc__.splitlines()[0])
    parser.add_argument("--report", required=True, help="JSON file to write the measurement to.")
    parser.add_argument("--log", help="File for the command's stdout and stderr (default: this process's).")
    parser.add_argument("--interval", type=float, default=0.2, help="Seconds between memory samples.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run (write it after --)")
    if args.log:
        with open(args.log, "w") as log:
            result = measure(command, args.interval, stdout=log, stderr=subprocess.STDOUT)
    else:
        result = measure(command, args.interval)
    Path(args.report).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
