"""What the code asks of the machine: devices, precisions, workers that end with their parent, and a
description of both machine and versions for results files."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from mad.errors import MadError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device on a machine without one is an error."""
    device = str(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MadError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise MadError(f"--device {device!r}: use cpu, cuda, cuda:N or auto") from None


def exit_with_parent(parent_pid: int, *_worker_id) -> None:
    """End this worker process when `parent_pid` ends, however it ends (SIGKILL or the OOM killer too).

    A DataLoader's `worker_init_fn` (as `partial(exit_with_parent, os.getpid())`): without it a worker
    whose parent was killed while it was still starting stays forever, holding the resource tracker's
    pipe so that the tracker stays too (torch's own check takes the parent's pid after it has started).
    Linux: the kernel sends SIGKILL when the parent dies (PR_SET_PDEATHSIG; it fires when the *thread*
    that spawned the worker ends, so create loaders on a thread that lives as long as they do). Elsewhere
    a daemon thread checks the parent every second. Then a parent already gone is caught by getppid().
    """
    if not _set_parent_death_signal():
        threading.Thread(target=_watch_parent, args=(parent_pid,), name="mad-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # died before the signal was set: nothing will send it now
        os._exit(1)


def _set_parent_death_signal() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        PR_SET_PDEATHSIG = 1
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(1)


def dtype_of(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise MadError(f"precision {precision!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[precision]


def branch_autocast(precision: str, device: torch.device):
    """The autocast a branch step runs under: bf16 for `precision` bf16, and for auto on CUDA; else none."""
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable; free pages where there is no /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def versions() -> dict:
    """Versions of the packages whose behaviour a store or a figure depends on."""
    from importlib.metadata import PackageNotFoundError, version

    import mad

    found = {"python": platform.python_version(), "mad": mad.__version__, "torch": torch.__version__}
    for package in ("open_clip_torch", "zarr", "av", "numpy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def machine_info(device: str | torch.device = "cpu") -> dict:
    """CPU model, cores, memory, torch threads, and the GPU where one is used."""
    device = str(device)
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"device": "cuda" if device.startswith("cuda") else "cpu", "cpu": cpu, "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        total = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        if total:
            info["ram_gib"] = round(int(total.group(1)) / 2**20, 1)
    except OSError:
        pass
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def sha256_file(path) -> str:
    """The file's sha256, hex (a checkpoint's identity in manifests and runs)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
