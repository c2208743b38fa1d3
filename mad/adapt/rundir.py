"""A run folder: created, refused, read back and finished (what `mad train` and every sweep member share).

    runs/<name>/config.json        the run's config, the branch's config, the caches' manifests
    runs/<name>/metrics.jsonl      one line per epoch (written after last.pt: a line = a resumable epoch)
    runs/<name>/model.safetensors  best by val top-1 (the last epoch without a val cache)
    runs/<name>/last.pt            state after the last completed epoch
    runs/<name>/summary.json       what the run returns
    runs/<name>/curves.png, confusion.png
    runs/<name>/tensorboard/       with --log tensorboard: metrics.jsonl's numbers as TensorBoard scalars
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from mad.adapt.branch import count_parameters
from mad.adapt.checkpoint import load_model
from mad.adapt.config import TrainConfig, TrainError, config_from_run, same_setting
from mad.adapt.evaluate import accuracy, confusion_matrix, predict_probs
from mad.adapt.plots import plot_confusion, plot_curves
from mad.cache.dataset import CachedTokens

# Settings that may change when a run is resumed: they do not change its numbers.
RESUMABLE_KEYS = ("device", "workers", "in_ram", "resume", "overwrite", "out", "log")
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "last.pt", "summary.json", "curves.png",
             "model.safetensors.partial", "last.pt.partial", "confusion.png")
RUN_FOLDERS = ("tensorboard",)


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
               if k not in RESUMABLE_KEYS and not same_setting(k, saved.get(k), v)]
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


def finish(run: Path, cfg: TrainConfig, history: list[dict], best: dict, scored: CachedTokens, which: str,
           device, best_probs: torch.Tensor | None = None) -> dict:
    """Plots and summary.json from the finished history and the saved best model (`best_probs`: its
    probabilities on `scored` [V, C], kept when it was validated; else it is loaded and scored again)."""
    plot_curves(history, run / "curves.png")
    model, _ = load_model(run / "model.safetensors", device)
    probs = best_probs
    if probs is None:
        probs = predict_probs(model, scored, cfg.batch_size * 2, device, arch=cfg.arch)[:, 0]
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
