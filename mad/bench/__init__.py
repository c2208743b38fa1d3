"""Benchmarks: figures and ratios measured side by side (`mad bench ...`)."""

import os
import platform


def machine_info(device) -> dict:
    """CPU model, cores, library versions and the GPU name where one is used."""
    import av
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "av": av.__version__}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
