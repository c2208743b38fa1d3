"""Cached tokens as training batches: RAM-resident when they fit, streamed from the store when not.

Both sources hold the done, labelled videos of one store and yield the same
batches in the same order for the same (seed, epoch), so a run gives the same
numbers whichever is used:

    training   every video once per epoch, shuffled, with one of its cached views
               (clips x crops) drawn at random
    eval       the first view of every video, or every view of every video

A batch is (arrays, labels, positions, views): `arrays` one tensor per data array
read (full stores: float16 [B, T, N, D] per cached level, shallow to deep; compact
stores: uint8 records [B, R]), `positions` the videos' indices within the source
(0..num_videos-1), `views` the view of each item. A source reads only the arrays it is
asked for (`arrays`, by name: the command layer asks the branch families which they
read); `to_device` moves a batch's arrays to the training device by name (a family
decodes compact records there: a quarter of the bytes cross to the GPU).

Streaming reads one (video, view) chunk per data array per item in DataLoader workers
started with `spawn`: zarr v3 runs an event-loop thread, and a forked copy of a
process that holds one can deadlock. Each worker opens the store itself.
"""

from __future__ import annotations

import math
import os
from functools import partial
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mad.cache.store import DONE, Store, StoreError
from mad.progress import passing_bar
from mad.runtime import available_memory, exit_with_parent

Batch = tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]


def usable_videos(store: Store) -> np.ndarray:
    """Store indices of the videos that are extracted (status done) and labelled."""
    status, labels = store.status(), store.labels()
    videos = np.flatnonzero((status == DONE) & (labels >= 0))
    if videos.size == 0:
        raise StoreError(f"{store.location}: no extracted, labelled videos "
                         f"({int((status == DONE).sum())} of {status.size} done, {int((labels >= 0).sum())} labelled)")
    return videos


def arrays_for(store: Store, names=None) -> dict[str, tuple[tuple[int, ...], str]]:
    """The data arrays `names` (name -> per-video shape, dtype), in the store's order; every one when None."""
    if names is None:
        return store.data_arrays
    missing = sorted(set(names) - set(store.data_arrays))
    if missing:
        raise StoreError(f"{store.location}: holds no array {', '.join(missing)}")
    return {name: value for name, value in store.data_arrays.items() if name in names}


def cache_bytes(store: Store, num_videos: int, arrays=None) -> int:
    """Bytes that `num_videos` videos of the data arrays `arrays` (all when None) take in memory."""
    per_video = sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in arrays_for(store, arrays).values())
    return per_video * num_videos


def epoch_order(num_videos: int, num_views: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, views) for one training epoch: a shuffle and one random view per video."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    positions = torch.randperm(num_videos, generator=generator)
    views = torch.randint(num_views, (num_videos,), generator=generator)
    return positions, views


def eval_order(num_videos: int, num_views: int, all_views: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, views) for evaluation: video by video, view 0 only or every view."""
    views_used = num_views if all_views else 1
    positions = torch.arange(num_videos).repeat_interleave(views_used)
    views = torch.arange(views_used).repeat(num_videos)
    return positions, views


class CachedTokens:
    """What both sources share: which videos, their labels, and the batch order."""

    def __init__(self, store: Store, videos: np.ndarray, arrays=None):
        self.location = store.location
        self.manifest = store.manifest
        self.layers = store.layers
        self.videos = videos  # store indices
        self.labels = torch.from_numpy(store.labels()[videos].astype(np.int64))
        paths = store.paths()
        self.paths = [paths[v] for v in videos]
        self.class_names = store.class_names
        self.num_views = self.manifest.views
        selected = arrays_for(store, arrays)
        self.array_names = list(selected)
        self.array_shapes = {name: (shape[1:], dtype) for name, (shape, dtype) in selected.items()}
        # frozen backbone weights a branch needs beside the tokens (e.g. a q/k projection): small, read once
        self.frozen = {name: torch.from_numpy(value) for name, value in store.frozen().items()}

    def to_device(self, arrays: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
        """A batch's arrays on `device`, by name (as stored: the branch upcasts or decodes)."""
        return {name: array.to(device, non_blocking=True) for name, array in zip(self.array_names, arrays)}

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[Batch]:
        return self._batches(*epoch_order(self.num_videos, self.num_views, seed, epoch), batch_size)

    def eval_batches(self, batch_size: int, all_views: bool = False) -> Iterator[Batch]:
        return self._batches(*eval_order(self.num_videos, self.num_views, all_views), batch_size)

    def _batches(self, positions, views, batch_size) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class InMemoryTokens(CachedTokens):
    """Every data array of the selected videos read once into one tensor [V, views, ...] (as stored)."""

    def __init__(self, store: Store, videos: np.ndarray | None = None, progress: bool = True, arrays=None):
        super().__init__(store, usable_videos(store) if videos is None else videos, arrays)
        self.arrays = [torch.empty((self.num_videos, self.num_views, *shape), dtype=getattr(torch, dtype))
                       for shape, dtype in self.array_shapes.values()]
        # Read whole shards (one request per shard file) and keep the selected rows.
        step = store.shard_size
        blocks = [(start, min(start + step, store.num_videos)) for start in range(0, store.num_videos, step)]
        blocks = [(a, b) for a, b in blocks if np.any((self.videos >= a) & (self.videos < b))]
        rows = {v: i for i, v in enumerate(self.videos.tolist())}
        with passing_bar(progress) as bar:
            name = os.path.basename(self.location.rstrip("/"))
            task = bar.add_task(f"reading {name}", total=len(blocks) * len(self.arrays))
            for array, array_name in zip(self.arrays, self.array_names):
                for start, stop in blocks:
                    chunk = store.read(array_name, slice(start, stop))  # [stop-start, views, ...]
                    wanted = self.videos[(self.videos >= start) & (self.videos < stop)]
                    array[[rows[v] for v in wanted.tolist()]] = torch.from_numpy(chunk[wanted - start])
                    bar.advance(task)

    def _batches(self, positions, views, batch_size) -> Iterator[Batch]:
        for i in range(0, len(positions), batch_size):
            p, v = positions[i:i + batch_size], views[i:i + batch_size]
            yield [array[p, v] for array in self.arrays], self.labels[p], p, v


class StreamingTokens(CachedTokens):
    """Reads each batch's chunks from the store in `workers` spawned DataLoader processes.

    `pin_memory` (training on CUDA): the loader copies each batch into page-locked memory on a thread, so
    `to_device`'s non_blocking copy runs asynchronously, beside the step on the previous batch."""

    def __init__(self, store: Store, videos: np.ndarray | None = None, workers: int = 2, arrays=None,
                 pin_memory: bool = False):
        super().__init__(store, usable_videos(store) if videos is None else videos, arrays)
        self.workers, self.pin_memory = workers, pin_memory
        self._reader = ChunkReader(self.location, self.array_shapes, self.videos)
        self._sampler = _ListSampler()
        self._loader = None

    def _batches(self, positions, views, batch_size) -> Iterator[Batch]:
        self._sampler.batches = [list(zip(positions[i:i + batch_size].tolist(), views[i:i + batch_size].tolist()))
                                 for i in range(0, len(positions), batch_size)]
        if self._loader is None:  # persistent workers: spawn them once, not once an epoch
            self._loader = DataLoader(
                self._reader, batch_sampler=self._sampler, num_workers=self.workers, collate_fn=_as_is,
                multiprocessing_context="spawn" if self.workers else None, persistent_workers=self.workers > 0,
                prefetch_factor=4 if self.workers else None, pin_memory=self.pin_memory,
                worker_init_fn=partial(exit_with_parent, os.getpid()),  # readers end with this process
                generator=torch.Generator(),  # its own: seeding workers must not draw from the global RNG
            )
        for levels, p, v in self._loader:
            yield levels, self.labels[p], p, v

    def close(self) -> None:
        if self._loader is not None and self._loader._iterator is not None:
            self._loader._iterator._shutdown_workers()
        self._loader = None


class ChunkReader(Dataset):
    """Item (position, view) -> one tensor per data array. Opens the store lazily, per process."""

    def __init__(self, location: str, array_shapes: dict, videos: np.ndarray):
        self.location, self.array_shapes, self.videos = location, array_shapes, videos
        self._store = None

    def __getstate__(self):  # what a spawned worker receives: no open store
        return {**self.__dict__, "_store": None}

    def __len__(self):
        return len(self.videos)

    def __getitem__(self, item):
        return _unbatch(self.__getitems__([item]))

    def __getitems__(self, items):  # a whole batch: what the DataLoader asks for (then `_as_is` collates it)
        if self._store is None:
            self._store = Store.open(self.location)  # inside the worker: Zarr must not cross a fork
        arrays = []
        for name, (shape, dtype) in self.array_shapes.items():
            # the batch's tensor, in shared memory in a reader process (as torch's default_collate
            # makes it): every chunk is decoded straight into its row, and reaches the trainer uncopied
            batch = _new_batch_tensor((len(items), *shape), getattr(torch, dtype))
            for row, (position, view) in enumerate(items):
                self._store.read(name, (int(self.videos[position]), view), out=batch[row].numpy())
            arrays.append(batch)
        positions = torch.tensor([position for position, _ in items])
        views = torch.tensor([view for _, view in items])
        return arrays, positions, views


class _ListSampler(Sampler):
    """Yields the batches the source set for the current pass (set before each iteration)."""

    def __init__(self):
        self.batches: list[list] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _as_is(batch):
    return batch  # ChunkReader.__getitems__ has made the batch already


def _unbatch(batch):
    levels, positions, views = batch
    return [level[0] for level in levels], int(positions[0]), int(views[0])


def _new_batch_tensor(shape, dtype) -> torch.Tensor:
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.tensor([], dtype=dtype).set_(storage).view(shape)


def open_tokens(store: Store | str, in_ram: str = "auto", workers: int = 2, reserve: float = 0.5,
                progress: bool = True, videos: np.ndarray | None = None, arrays=None,
                pin_memory: bool = False) -> CachedTokens:
    """The store's done, labelled videos (or the store indices `videos`) as batches of the data arrays
    `arrays` (by name; all when None): in RAM ('yes'), streamed ('no'), or in RAM when they take less than `reserve` of
    the available memory ('auto'). `pin_memory`: streamed batches in page-locked memory (for a CUDA device)."""
    if isinstance(store, str):
        store = Store.open(store)
    if in_ram not in ("auto", "yes", "no"):
        raise StoreError(f"in_ram {in_ram!r}: use auto, yes or no")
    videos = usable_videos(store) if videos is None else videos
    if in_ram == "auto":
        in_ram = "yes" if cache_bytes(store, len(videos), arrays) < reserve * available_memory() else "no"
    if in_ram == "yes":
        return InMemoryTokens(store, videos, progress=progress, arrays=arrays)
    return StreamingTokens(store, videos, workers=workers, arrays=arrays, pin_memory=pin_memory)
