"""Peak memory of one mode's process: CUDA allocator statistics, or the resident set on CPU.

Imported by the mode processes: torch and the standard library only.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import resource
import sys
import threading
import time
from pathlib import Path

import torch

OVER_LIMIT_EXIT = 3  # a CPU probe that crossed its memory limit and stopped itself


def proc_status_kib(field: str) -> int | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def return_free_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise), so RSS tracks live memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes the allocator's retained slack
        pass


class MemoryMeter:
    """Peak memory of this process's training, relative to just before the model was built.

    CUDA: `max_memory_allocated` (tensors only; not the CUDA context or the caching
    allocator's slack). CPU: resident set size, which counts everything the process
    touched (weights, activations, optimizer state, allocator slack), in pages.
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.device = device
        return_free_memory()
        self.baseline = self.current()
        if self.cuda:
            self.method = "CUDA max_memory_allocated over the timed steps"
        elif proc_status_kib("VmHWM") is not None:
            self.method = ("CPU peak RSS (VmHWM) over the timed steps minus RSS before the model was built "
                           "(glibc mmap threshold 64 KiB, so RSS follows live memory)")
        else:
            self.method = "CPU peak RSS since process start (ru_maxrss) minus RSS before the model was built"

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device)
        rss = proc_status_kib("VmRSS")
        return rss * 1024 if rss is not None else self._maxrss()

    @staticmethod
    def _maxrss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        return_free_memory()
        try:  # Linux >= 4.0: writing 5 resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "CPU peak RSS since process start (VmHWM, not resettable here) minus RSS before the build"

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        hwm = proc_status_kib("VmHWM")
        return (hwm * 1024 if hwm is not None else self._maxrss()) - self.baseline

    def limit(self, limit_bytes: int, mode: str) -> None:
        """Budget probes. CUDA: cap the allocator, so a batch that does not fit raises OutOfMemoryError.
        CPU: a thread ends the process once its RSS crosses the limit, so a probe that does not fit can
        never take the (shared) machine's memory with it."""
        if self.cuda:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), self.device)
            return
        if proc_status_kib("VmRSS") is None:
            return

        def watch():
            while True:
                rss = proc_status_kib("VmRSS")
                if rss is not None and rss * 1024 - self.baseline > limit_bytes:
                    print(json.dumps({"mode": mode, "fits": False, "over_limit": True}), flush=True)
                    os._exit(OVER_LIMIT_EXIT)
                time.sleep(0.02)

        threading.Thread(target=watch, daemon=True).start()
