"""Training the branch from the cache: no image model is ever built here.

AdamW with weight decay on matrices only, linear warmup then cosine decay (per
step), label smoothing, gradient clipping, bf16 autocast on CUDA (and on CPU with --precision bf16). Every epoch
appends a line to metrics.jsonl, saves last.pt (model, optimizer, scheduler and
RNG state, for --resume) and, when validation top-1 improves, model.safetensors.
The data order of epoch e depends only on (seed, e), so a resumed run continues
exactly where the interrupted one stopped. Validation during training scores the
first cached view of each video (`mad eval` adds the multi-view score).

    runs/<name>/config.json        this config, the model's arguments, the cache's manifest
    runs/<name>/metrics.jsonl      one line per epoch
    runs/<name>/model.safetensors  best by val top-1 (the last epoch without a val cache)
    runs/<name>/last.pt            state after the last completed epoch
    runs/<name>/summary.json       what train() returns
    runs/<name>/curves.png, confusion.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import mad
from mad.adapt.evaluate import EvalError, accuracy, confusion_matrix, plot_confusion, predict, resolve_device
from mad.adapt.madapter import (ARCHS, TEMPORAL, CheckpointError, build_model, count_parameters, load_state,
                                 resolve_grid_pool, save_model)
from mad.cache.dataset import CachedTokens, open_tokens
from mad.cache.store import TRAINING_KEYS, Store, StoreError, manifest_differences


class TrainError(Exception):
    """A training request that cannot be served (message names the file and says why)."""


@dataclass
class TrainConfig:
    cache: str = "cache"  # training cache (store folder or URL)
    val: str | None = None  # validation cache; without one the last epoch is kept
    arch: str = "madapter"  # madapter, meanpool or linear
    width: int = 384  # branch width d
    depth: int = 1  # fusion/temporal blocks
    heads: int = 6
    temporal: str = "conv"  # conv (depthwise over T), conv3d (over T and neighbouring patches), attn or none
    motion: bool = True  # feed the blocks frame-to-frame token changes too (see madapter.Motion)
    correlation: int = 1  # radius (patches) of the match to the previous frame (madapter.Correlation); 0 = off
    grid_pool: str = "auto"  # the branch averages the patch grid in N x N cells: auto (to >= 7x7), 1 (off), 2, ...
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    batch_size: int = 32
    label_smoothing: float = 0.1
    clip_grad: float = 1.0  # max gradient norm; 0 turns clipping off
    dropout: float = 0.1
    seed: int = 0
    out: str | None = None  # run folder; default runs/<arch>, runs/<arch>-2, ...
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast for the branch: auto = on CUDA only; bf16 = on any device; fp32 = never
    workers: int = 2  # reader processes when the cache is streamed
    in_ram: str = "auto"  # auto, yes or no
    resume: bool = False  # continue the run in `out` from its last completed epoch
    overwrite: bool = False  # replace the run in `out`


# Settings that may change when a run is resumed: they do not change its numbers.
RESUMABLE_KEYS = ("device", "workers", "in_ram", "resume", "overwrite", "out")
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "last.pt", "summary.json", "curves.png",
             "confusion.png")


class _Distributed:
    """DDP under torchrun (NCCL on GPU, gloo on CPU); a no-op in a single process.

    Every rank holds the data and the same seeded model; each global batch is split
    into contiguous per-rank slices, and the loss is scaled so the averaged gradient
    equals the one-process gradient of the whole batch. Rank 0 alone writes files.
    """

    def __init__(self, device):
        import os

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.active = self.world > 1
        if self.active and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device):
        import os

        if self.active and device.type == "cuda":
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device

    def wrap(self, model):
        if not self.active:
            return model
        return torch.nn.parallel.DistributedDataParallel(model)

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


def train(cfg: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None, quiet: bool = False) -> dict:
    """Train on `cfg.cache`, validate on `cfg.val`; return the summary (best val metrics)."""
    check_config(cfg)
    cfg = dataclasses.replace(cfg)  # train_on fills in `out`; leave the caller's config as it was
    train_store = open_store(cfg.cache)
    val_store = open_store(cfg.val) if cfg.val else None
    if val_store is not None:
        check_pair(train_store, val_store)
    train_data = val_data = None
    try:
        train_data = open_tokens(train_store, cfg.in_ram, cfg.workers, progress=not quiet)
        val_data = open_tokens(val_store, cfg.in_ram, cfg.workers, progress=not quiet) if val_store else None
        return train_on(cfg, train_data, val_data, on_epoch_end, quiet)
    except StoreError as e:
        raise TrainError(str(e)) from None
    finally:
        for data in (train_data, val_data):
            if data is not None:
                data.close()


def train_on(cfg: TrainConfig, train_data: CachedTokens, val_data: CachedTokens | None = None,
             on_epoch_end: Callable[[dict], None] | None = None, quiet: bool = False) -> dict:
    """Train from already opened (usually RAM-resident) data: what `sweep` calls once per configuration."""
    check_config(cfg)
    try:
        device = resolve_device(cfg.device)
    except EvalError as e:
        raise TrainError(str(e)) from None
    dist = _Distributed(device)
    device = dist.device(device)
    if dist.active and cfg.out is None:
        raise TrainError("under torchrun, name the run folder with --out (every rank must agree on it)")
    console = Console(quiet=quiet or not dist.main, highlight=False)
    if dist.main:
        prepare_run_dir(cfg)
    dist.barrier()
    run = Path(cfg.out)
    manifest = train_data.manifest
    num_classes = count_classes(train_data, val_data)
    model_args = dict(arch=cfg.arch, num_levels=len(train_data.layers), in_width=manifest["width"],
                      num_tokens=manifest["tokens"], num_frames=manifest["frames"], num_classes=num_classes,
                      width=cfg.width, depth=cfg.depth, heads=cfg.heads, dropout=cfg.dropout, temporal=cfg.temporal,
                      motion=cfg.motion, correlation=cfg.correlation,
                      grid_pool=resolve_grid_pool(cfg.grid_pool, manifest["tokens"]))

    torch.manual_seed(cfg.seed)
    try:
        model = build_model(**model_args).to(device)
    except ValueError as e:
        raise TrainError(str(e)) from None
    if dist.main and not quiet:
        side, pool = math.isqrt(manifest["tokens"] - 1), model_args["grid_pool"]
        grid = (f", patch grid {side}x{side} pooled to {-(-side // pool)}x{-(-side // pool)} (--grid-pool {cfg.grid_pool})"
                if cfg.arch == "madapter" and pool > 1 else "")
        console.print(f"{cfg.arch}: {count_parameters(model):,} trainable parameters{grid}")
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices; not biases, norms, gates
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    steps_per_epoch = math.ceil(train_data.num_videos / cfg.batch_size)
    scheduler = make_scheduler(optimizer, round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)

    start_epoch, history = 0, []
    if cfg.resume and (run / "last.pt").exists():
        start_epoch, history = restore(run, model, optimizer, scheduler, device)
        console.print(f"resuming {run} after epoch {start_epoch}/{cfg.epochs}")
    elif dist.main:
        config = {"train": asdict(cfg), "model": model_args, "parameters": count_parameters(model),
                  "mad_version": mad.__version__, "cache_manifest": manifest,
                  "val_manifest": val_data.manifest if val_data else None}
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (run / "metrics.jsonl").write_text("")
    best = max(history, key=lambda row: row["val/acc/top1"]) if val_data and history else None
    best = history[-1] if history and not val_data else best

    info = {"class_names": train_data.class_names, "manifest": manifest, "arch": cfg.arch}
    columns = [TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn()]
    trained = dist.wrap(model)  # DDP under torchrun, else the model itself
    with Progress(*columns, console=console, disable=quiet or not dist.main) as progress:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            task = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch, status="")
            started = time.perf_counter()
            train_loss, train_acc, lr = train_epoch(trained, optimizer, scheduler, train_data, cfg, epoch, device,
                                                    lambda text: progress.update(task, advance=1, status=text), dist)
            train_seconds = time.perf_counter() - started

            row = {"epoch": epoch, "lr": lr, "train/loss": train_loss, "train/acc": train_acc}
            if val_data is not None:
                probs = predict(model, val_data, cfg.batch_size * 2, device)[:, 0]
                row.update({f"val/{k}": v for k, v in accuracy(probs, val_data.labels).items()})
            row["epoch_seconds"] = time.perf_counter() - started
            row["clips_per_second"] = train_data.num_videos / train_seconds
            val_text = f"  val {row['val/acc/top1']:.3f}" if val_data is not None else ""
            progress.update(task, status=f"loss {row['train/loss']:.4f}  acc {row['train/acc']:.3f}{val_text}  "
                                         f"{row['clips_per_second']:.0f} clips/s")

            if best is None or val_data is None or row["val/acc/top1"] > best["val/acc/top1"]:
                best = row
                if dist.main:
                    save_model(model, run / "model.safetensors", model_args,
                               {**info, "epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val/")}})
            if dist.main:  # checkpoints and metrics: rank 0 only
                torch.save({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
                           run / "last.pt")
                with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a line means the epoch is resumable
                    f.write(json.dumps(row) + "\n")
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(row)

    dist.barrier()  # rank 0's files are complete before anyone returns
    if not dist.main:
        return {"run": str(run), "rank": dist.rank}
    summary = finish(run, cfg, history, best, val_data or train_data, "val" if val_data else "train", device)
    console.print(f"[bold]{run}[/]: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()
                                                  if k.startswith("val/acc/") or k == "train/loss"))
    return summary


def train_epoch(model, optimizer, scheduler, data: CachedTokens, cfg: TrainConfig, epoch: int, device,
                report: Callable[[str], None], dist: "_Distributed | None" = None) -> tuple[float, float, float]:
    """One pass over the training data; returns (mean loss, accuracy, last learning rate).

    Under DDP each rank trains on its slice of every global batch; the figures are summed over ranks.
    """
    dist = dist or _Distributed(device)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    model.train()
    started = time.perf_counter()
    loss_sum, correct, seen = 0.0, 0, 0
    for levels, labels, _, _ in data.train_batches(cfg.batch_size, cfg.seed, epoch):
        global_batch = len(labels)
        levels, labels = dist.share(levels, labels)
        levels = [x.to(device, non_blocking=True) for x in levels]  # float16 as cached: the branch upcasts per level
        labels = labels.to(device)
        with autocast:
            logits = model(levels)
        # Sum over this rank's slice, divided by the global batch and times the ranks: DDP's gradient
        # average then equals the one-process gradient of the mean loss over the whole batch.
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing,
                               reduction="sum") * (dist.world / global_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += loss.item() * global_batch / dist.world  # this rank's summed loss
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        report(f"loss {loss_sum / seen:.4f}  {seen / (time.perf_counter() - started):.0f} clips/s")
    loss_sum, correct, seen = dist.sum(loss_sum, correct, seen)
    return loss_sum / seen, correct / seen, lr


def finish(run: Path, cfg: TrainConfig, history: list[dict], best: dict, scored: CachedTokens, which: str,
           device) -> dict:
    """Plots and summary.json from the finished history and the saved best model."""
    from mad.adapt.madapter import load_model

    plot_curves(history, run / "curves.png")
    model, _ = load_model(run / "model.safetensors", str(device))
    probs = predict(model, scored, cfg.batch_size * 2, device)[:, 0]
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


def check_config(cfg: TrainConfig) -> None:
    if cfg.arch not in ARCHS:
        raise TrainError(f"--arch {cfg.arch!r}: use one of {', '.join(ARCHS)}")
    if cfg.temporal not in TEMPORAL:
        raise TrainError(f"--temporal {cfg.temporal!r}: use one of {', '.join(TEMPORAL)}")
    if cfg.correlation < 0:
        raise TrainError(f"--correlation {cfg.correlation}: give a radius in patches, or 0 for none")
    if str(cfg.grid_pool) != "auto" and not (str(cfg.grid_pool).isdigit() and int(cfg.grid_pool) >= 1):
        raise TrainError(f"--grid-pool {cfg.grid_pool!r}: give auto, 1 (full grid) or more")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"--precision {cfg.precision!r}: use auto, bf16 or fp32")
    if cfg.in_ram not in ("auto", "yes", "no"):
        raise TrainError(f"--in-ram {cfg.in_ram!r}: use auto, yes or no")
    if cfg.arch == "madapter" and cfg.width % cfg.heads:
        raise TrainError(f"--width {cfg.width} is not divisible by --heads {cfg.heads}")
    for name in ("epochs", "batch_size", "width", "heads"):
        if getattr(cfg, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(cfg, name)})")
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume and --overwrite contradict each other: pick one")
    if cfg.resume and not cfg.out:
        raise TrainError("--resume needs --out: the run folder to continue")


def open_store(location: str) -> Store:
    try:
        return Store.open(location)
    except StoreError as e:
        raise TrainError(str(e)) from None


def check_pair(train_store: Store, val_store: Store) -> None:
    """The val cache must hold the same kind of tokens as the training cache."""
    differences = manifest_differences(train_store.manifest, val_store.manifest, TRAINING_KEYS)
    if differences:
        keys = ", ".join(d.split(":")[0] for d in differences)
        raise TrainError(f"{val_store.location}: val cache does not match the training cache "
                         f"{train_store.location} on {keys} ({'; '.join(differences)})")
    if train_store.class_names and val_store.class_names and train_store.class_names != val_store.class_names:
        raise TrainError(f"{val_store.location}: class names differ from the training cache {train_store.location}")


def count_classes(train_data: CachedTokens, val_data: CachedTokens | None) -> int:
    largest = int(train_data.labels.max())
    if val_data is not None:
        largest = max(largest, int(val_data.labels.max()))
    names = train_data.class_names
    if names and largest >= len(names):
        raise TrainError(f"{train_data.location}: label {largest} but only {len(names)} class names")
    return len(names) if names else largest + 1


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 1% of the learning rate, then cosine decay to zero, stepped every batch."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Resolve and create the run folder; refuse to mix a new run into an old one."""
    if cfg.out is None:
        base = Path("runs") / cfg.arch
        run, n = base, 1
        while (run / "config.json").exists():
            n += 1
            run = base.with_name(f"{base.name}-{n}")
        cfg.out = str(run)
    run = Path(cfg.out)
    if (run / "config.json").exists():
        if cfg.overwrite:
            for name in RUN_FILES:
                (run / name).unlink(missing_ok=True)
        elif not cfg.resume:
            raise TrainError(f"{run}: a run already exists here; pass --resume to continue it, "
                             f"--overwrite to replace it, or another --out")
        else:
            saved = json.loads((run / "config.json").read_text())["train"]
            changed = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
                       if k not in RESUMABLE_KEYS and saved.get(k) != v]
            if changed:
                raise TrainError(f"{run}/config.json: cannot resume with different settings ({'; '.join(changed)})")
    run.mkdir(parents=True, exist_ok=True)
    return run


def restore(run: Path, model, optimizer, scheduler, device) -> tuple[int, list[dict]]:
    """Load last.pt into the model, optimizer and scheduler; return (its epoch, metrics up to it)."""
    try:
        state = torch.load(run / "last.pt", map_location=device, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        raise TrainError(f"{run / 'last.pt'}: cannot be read ({str(e).splitlines()[0]})") from None
    try:
        load_state(model, state["model"], run / "last.pt")
    except CheckpointError as e:
        raise TrainError(str(e)) from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"].cpu())
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
    epoch = int(state["epoch"])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    history = [row for row in rows if row["epoch"] <= epoch]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    return epoch, history


def plot_curves(history: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(epochs, [row["train/loss"] for row in history], label="train loss")
    left.set_xlabel("epoch")
    left.set_ylabel("loss")
    left.legend()
    right.plot(epochs, [row["train/acc"] for row in history], label="train acc")
    for key, style in (("val/acc/top1", "-"), ("val/acc/mean1", "--")):  # equal on balanced val sets
        if key in history[0]:
            right.plot(epochs, [row[key] for row in history], style, label=key)
    right.set_xlabel("epoch")
    right.set_ylabel("accuracy")
    right.set_ylim(0, 1.02)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def config_from_run(run) -> TrainConfig:
    """The TrainConfig saved in a run's config.json (to resume it with the same settings)."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise TrainError(f"{path}: no run to resume here")
    saved = json.loads(path.read_text())["train"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in fields})
