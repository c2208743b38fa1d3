"""DDP under torchrun for training from the cache (NCCL on GPU, gloo on CPU); a no-op outside torchrun.

Every rank holds the data and the same seeded model; each global batch is split
into contiguous per-rank slices, and the loss is weighted so the averaged gradient
equals the one-process gradient of the whole batch. Rank 0 alone writes files.
Under torchrun DDP is on even with one process (`--nproc-per-node 1`): that is how
a one-GPU machine checks the NCCL path a multi-GPU server takes.
"""

from __future__ import annotations

import atexit
import os

import torch


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these in every process it starts."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def _destroy() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class Distributed:
    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1 or launched_by_torchrun()
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if self.active and not torch.distributed.is_initialized():
            if device.type == "cuda":
                # before the process group: NCCL's barrier and collectives use the current device, and
                # without this every rank would create a context on GPU 0 (and NCCL could hang there)
                torch.cuda.set_device(self.device(device))
            torch.distributed.init_process_group(self.backend)
            # torch warns at exit (and NCCL can hang there) when the group is never destroyed
            atexit.register(_destroy)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        if self.active and device.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def wrap(self, model):
        if not self.active:
            return model
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None  # one GPU per process
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def share(self, levels, labels):
        """This rank's contiguous slice of a global batch."""
        if not self.active:
            return levels, labels
        b = len(labels)
        part = slice(self.rank * b // self.world, (self.rank + 1) * b // self.world)
        return [x[part] for x in levels], labels[part]

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        # NCCL reduces only tensors on the GPU; gloo those in host memory
        where = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"
        t = torch.tensor(values, dtype=torch.float64, device=where)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
            else:
                torch.distributed.barrier()
