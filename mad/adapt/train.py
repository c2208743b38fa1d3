"""Training the branch from the cache: no image model is ever built here.

`train` opens the caches, resolves the run's config once against their manifests
(`mad.adapt.config.resolve`) and calls `train_on`: a one-member lockstep
(`mad.adapt.lockstep`), whose step is `mad.adapt.step.train_step` (AdamW with weight
decay on matrices only, linear warmup then cosine decay per step, label smoothing,
gradient clipping, bf16 autocast on CUDA and on CPU with --precision bf16), then a
validation on the first cached view of each val video (`mad eval` adds the multi-view
score). The data order of epoch e depends only on (seed, e), and dropout masks on
(seed, epoch, batch), so a resumed run continues exactly where the interrupted one
stopped. The run folder it writes: `mad.adapt.rundir`.
"""

from __future__ import annotations

from typing import Callable

from mad.adapt.branch import BranchConfig
from mad.adapt.config import TrainConfig, TrainError, check_options, config_from_run, resolve  # noqa: F401
from mad.adapt.families import pair_keys, reads
from mad.adapt.lockstep import train_lockstep
from mad.adapt.rundir import (RESUMABLE_KEYS, RUN_FILES, RUN_FOLDERS, check_run_dir, finish,  # noqa: F401
                              prepare_run_dir, read_history, summary_line)
from mad.cache.dataset import CachedTokens, open_tokens, usable_videos
from mad.cache.store import Store
from mad.runtime import resolve_device


def train(cfg: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None, quiet: bool = False,
          given=None) -> dict:
    """Train on `cfg.cache`, validate on `cfg.val`; return the summary (best val metrics). `given`: the
    settings the user set (the arch's preset fills the others; None: all were given)."""
    check_options(cfg)
    train_store = Store.open(cfg.cache)
    val_store = Store.open(cfg.val) if cfg.val else None
    if val_store is not None:
        train_store.manifest.check_pair(val_store.manifest, cfg.val, f"the training cache {cfg.cache}",
                                        pair_keys([cfg.arch]))
    cfg, branch = resolve(cfg, train_store.manifest, count_classes(train_store, val_store), cfg.cache, given)
    check_run_dir(cfg)  # what the run folder refuses: before reading, writing nothing
    train_data = val_data = None
    try:
        pin = resolve_device(cfg.device).type == "cuda"  # streamed batches cross to the GPU asynchronously
        train_data = open_tokens(train_store, cfg.in_ram, cfg.workers, progress=not quiet,
                                 arrays=reads([cfg.arch], train_store.manifest, cfg.cache), pin_memory=pin)
        val_data = (open_tokens(val_store, cfg.in_ram, cfg.workers, progress=not quiet,
                                arrays=reads([cfg.arch], val_store.manifest, cfg.val), pin_memory=pin)
                    if val_store else None)
        return train_on(cfg, branch, train_data, val_data, on_epoch_end, quiet)
    finally:
        for data in (train_data, val_data):
            if data is not None:
                data.close()


def train_on(cfg: TrainConfig, branch: BranchConfig, train_data: CachedTokens, val_data: CachedTokens | None = None,
             on_epoch_end: Callable[[dict], None] | None = None, quiet: bool = False) -> dict:
    """Train the resolved `branch` (`mad.adapt.config.resolve`) from already opened data (what `sweep` calls
    once per configuration): a one-member lockstep (`mad.adapt.lockstep`), so a run
    alone and in a sweep write the same numbers."""
    hook = (lambda i, row: on_epoch_end(row)) if on_epoch_end is not None else None
    return train_lockstep([(cfg, branch)], train_data, val_data, on_epoch_end=hook, quiet=quiet)[0]


# --------------------------------------------------------------------------- pieces


def count_classes(train_store: Store, val_store: Store | None) -> int:
    """The classes the head scores: the store's class names, or the largest label of a usable video + 1."""
    largest = max(int(store.labels()[usable_videos(store)].max()) for store in (train_store, val_store) if store)
    names = train_store.class_names
    if names and largest >= len(names):
        raise TrainError(f"{train_store.location}: label {largest} but only {len(names)} class names")
    return len(names) if names else largest + 1


