"""What the code asks of the machine: devices, precisions, and a description of both for results files."""

from __future__ import annotations

import os
import platform
import re
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
