"""Training the branch from the cache: no image model is ever built here.

`train` opens the caches, resolves the run's config once against their manifests
(`mad.adapt.config.resolve`) and calls `train_on`, which sets a run up and loops over
epochs (`mad.adapt.lockstep`; the step is `mad.adapt.step.train_step`: AdamW with
weight decay on matrices only, linear warmup then cosine decay per step, label
smoothing, gradient clipping, bf16 autocast on CUDA and on CPU with --precision
bf16), then `validate` on the first cached view of each val video (`mad eval`
adds the multi-view score). The data order of epoch e depends only on (seed, e),
so a resumed run continues exactly where the interrupted one stopped.

    runs/<name>/config.json        this config ("train", its resolved branch "model"), the caches' manifests
    runs/<name>/metrics.jsonl      one line per epoch (written after last.pt: a line = a resumable epoch)
    runs/<name>/model.safetensors  best by val top-1 (the last epoch without a val cache)
    runs/<name>/last.pt            state after the last completed epoch
    runs/<name>/summary.json       what train() returns
    runs/<name>/curves.png, confusion.png
    runs/<name>/tensorboard/       with --log tensorboard: metrics.jsonl's numbers as TensorBoard scalars
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from mad.adapt.checkpoint import load_model
from mad.adapt.evaluate import accuracy, confusion_matrix, predict_probs
from mad.adapt.branch import BranchConfig, count_parameters
from mad.adapt.config import TrainConfig, TrainError, check_options, config_from_run, resolve
from mad.adapt.families import pair_keys, reads
from mad.adapt.plots import plot_confusion, plot_curves
from mad.cache.dataset import CachedTokens, open_tokens, usable_videos
from mad.cache.store import Store
from mad.runtime import resolve_device

# Settings that may change when a run is resumed: they do not change its numbers.
RESUMABLE_KEYS = ("device", "workers", "in_ram", "resume", "overwrite", "out", "log")
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "last.pt", "summary.json", "curves.png",
             "model.safetensors.partial", "last.pt.partial",
             "confusion.png")
RUN_FOLDERS = ("tensorboard",)


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
    from mad.adapt.lockstep import train_lockstep  # lockstep imports this module's pieces
    hook = (lambda i, row: on_epoch_end(row)) if on_epoch_end is not None else None
    return train_lockstep([(cfg, branch)], train_data, val_data, on_epoch_end=hook, quiet=quiet)[0]


def summary_line(summary: dict) -> str:
    """What a finished run scored, saying which epoch each figure is from: the best by val top-1 (the model
    kept) and the last; without a val cache the last epoch is the one kept."""
    last = (f"last epoch {summary['epochs']}: train loss {summary['train/loss']:.4f}, "
            f"train acc {summary['train/acc']:.4f}")
    if "val/acc/top1" not in summary:
        return last + " (kept: no val cache)"
    return (f"best epoch {summary['best_epoch']} (kept): val top-1 {summary['val/acc/top1']:.4f}, "
            f"top-5 {summary['val/acc/top5']:.4f}, mean class {summary['val/acc/mean1']:.4f}; "
            f"{last}, val top-1 {summary['last/val/acc/top1']:.4f}")


def validate(model, data: CachedTokens, batch_size: int, device, arch: str) -> dict:
    """val/acc/top1, top5, mean1 on the first cached view of every video."""
    return val_figures(predict_probs(model, data, batch_size, device, arch=arch)[:, 0], data.labels)


def val_figures(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """`validate`'s figures from the probabilities [V, C] of the first view of every video."""
    return {f"val/{k}": v for k, v in accuracy(probs, labels).items()}


def finish(run: Path, cfg: TrainConfig, history: list[dict], best: dict, scored: CachedTokens, which: str,
           device, best_probs: torch.Tensor | None = None) -> dict:
    """Plots and summary.json from the finished history and the saved best model (`best_probs`: its
    probabilities on `scored` [V, C], kept when it was validated; else it is loaded and scored again)."""
    plot_curves(history, run / "curves.png")
    model, _ = load_model(run / "model.safetensors", device)
    probs = best_probs if best_probs is not None else predict_probs(model, scored, cfg.batch_size * 2, device,
                                                                    arch=cfg.arch)[:, 0]
    matrix = confusion_matrix(probs.argmax(dim=1), scored.labels, probs.shape[1])
    plot_confusion(matrix, scored.class_names, run / "confusion.png",
                   f"{which}, epoch {best['epoch']}: top-1 {accuracy(probs, scored.labels)['acc/top1']:.3f}")
    last = history[-1]
    summary = {"run": str(run), "arch": cfg.arch, "parameters": count_parameters(model), "epochs": last["epoch"],
               "best_epoch": best["epoch"], "seconds": sum(row["epoch_seconds"] for row in history),
               "train/loss": last["train/loss"], "train/acc": last["train/acc"],
               **{k: v for k, v in best.items() if k.startswith("val/")},
               **{f"last/{k}": v for k, v in last.items() if k.startswith("val/")}}
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------- pieces


def count_classes(train_store: Store, val_store: Store | None) -> int:
    """The classes the head scores: the store's class names, or the largest label of a usable video + 1."""
    largest = max(int(store.labels()[usable_videos(store)].max()) for store in (train_store, val_store) if store)
    names = train_store.class_names
    if names and largest >= len(names):
        raise TrainError(f"{train_store.location}: label {largest} but only {len(names)} class names")
    return len(names) if names else largest + 1


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Resolve and create the run folder; refuse to mix a new run into an old one."""
    check_run_dir(cfg)
    if cfg.out is None:
        base = Path("runs") / cfg.arch
        run, n = base, 1
        while (run / "config.json").exists():
            n += 1
            run = base.with_name(f"{base.name}-{n}")
        cfg.out = str(run)
    run = Path(cfg.out)
    if (run / "config.json").exists() and cfg.overwrite:
        for name in RUN_FILES:
            (run / name).unlink(missing_ok=True)
        for name in RUN_FOLDERS:
            shutil.rmtree(run / name, ignore_errors=True)
    run.mkdir(parents=True, exist_ok=True)
    return run


def check_run_dir(cfg: TrainConfig) -> None:
    """Refuse, writing nothing, a run folder that holds another run (or one resumed with other settings); `cfg`
    resolved (`mad.adapt.config.resolve`), as the run folder's config.json holds it."""
    run = Path(cfg.out) if cfg.out else None
    if run is not None and run.exists() and not run.is_dir():
        raise TrainError(f"{run}: a file, not a run folder; choose another --out")
    if run is None or not (run / "config.json").exists() or cfg.overwrite:
        return
    if not cfg.resume:
        raise TrainError(f"{run}: a run already exists here; pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")
    saved, given = _flat(config_from_run(run)), _flat(cfg)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in given.items()
               if k not in RESUMABLE_KEYS and saved.get(k) != v]
    if changed:
        raise TrainError(f"{run}/config.json: cannot resume with different settings ({'; '.join(changed)})")


def _flat(cfg: TrainConfig) -> dict:
    """Every setting of `cfg` by one name: the run's, then its branch's (those the store fixes too)."""
    return {**cfg.saved()["train"], **cfg.model.to_dict()}


def read_history(run: Path, epoch: int) -> list[dict]:
    """metrics.jsonl up to `epoch` (later lines, from an epoch whose last.pt was not written, are dropped)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    history = [row for row in rows if row["epoch"] <= epoch]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    return history
