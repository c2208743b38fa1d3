"""DDP under torchrun for training from the cache (NCCL on GPU, gloo on CPU); a no-op in one process.

Every rank holds the data and the same seeded model; each global batch is split
into contiguous per-rank slices, and the loss is weighted so the averaged gradient
equals the one-process gradient of the whole batch. Rank 0 alone writes files.
"""

from __future__ import annotations

import os

import torch


class Distributed:
    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        if self.active and device.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def wrap(self, model):
        return torch.nn.parallel.DistributedDataParallel(model) if self.active else model

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
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()
