"""Training the branch from the cache: no image model is ever built here.

`train` opens the caches and calls `train_on`, which sets a run up and loops over
epochs: `train_one_epoch` (the step is `mad.adapt.step.train_step`: AdamW with
weight decay on matrices only, linear warmup then cosine decay per step, label
smoothing, gradient clipping, bf16 autocast on CUDA and on CPU with --precision
bf16), then `validate` on the first cached view of each val video (`mad eval`
adds the multi-view score). The data order of epoch e depends only on (seed, e),
so a resumed run continues exactly where the interrupted one stopped.

    runs/<name>/config.json        this config, the branch's config, the caches' manifests
    runs/<name>/metrics.jsonl      one line per epoch (written after last.pt: a line = a resumable epoch)
    runs/<name>/model.safetensors  best by val top-1 (the last epoch without a val cache)
    runs/<name>/last.pt            state after the last completed epoch
    runs/<name>/summary.json       what train() returns
    runs/<name>/curves.png, confusion.png
    runs/<name>/tensorboard/       with --log tensorboard: metrics.jsonl's numbers as TensorBoard scalars
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch

import mad
from mad.adapt.checkpoint import load_model, restore_training_state, save_model, save_training_state
from mad.adapt.distributed import Distributed
from mad.adapt.evaluate import accuracy, confusion_matrix, predict_probs
from mad.adapt.madapter import ARCHS, TEMPORAL, BranchConfig, build_model, check_branch, count_parameters
from mad.adapt.plots import plot_confusion, plot_curves
from mad.adapt.step import CLIP_GRAD, LABEL_SMOOTHING, make_optimizer, make_scheduler, train_step
from mad.adapt.tracking import Trackers, check_log
from mad.cache.dataset import CachedTokens, open_tokens
from mad.cache.manifest import Manifest, training_keys
from mad.cache.store import Store
from mad.errors import MadError
from mad.options import (FRACTION, NON_NEGATIVE, SEED, Range, at_least, check_choices, check_device,
                         check_ranges)
from mad.progress import make_console, plain
from mad.runtime import branch_autocast, resolve_device

_BRANCH = BranchConfig()
# What an arch trains with where a setting is not given (`TrainConfig.for_arch`, `with_arch_defaults`): EVL's
# official ViT-B/16 recipe (AdamW 4e-4, weight decay 0.05 as ours, dropout 0.5); its width, heads and depth 0
# resolve from the cache: q/k/v width D, D / 64 heads, one decoder layer per cached EVL block (README "EVL").
ARCH_DEFAULTS = {"evl": dict(lr=4e-4, dropout=0.5, width=0, heads=0, depth=0)}


class TrainError(MadError):
    """A training request that cannot be served (message names the file and says why)."""


@dataclass
class TrainConfig:
    cache: str = "cache"  # training cache (store folder or URL)
    val: str | None = None  # validation cache; without one the last epoch is kept
    arch: str = _BRANCH.arch  # madapter, meanpool, linear or evl (use `for_arch` for its defaults)
    width: int = _BRANCH.width
    depth: int = _BRANCH.depth
    heads: int = _BRANCH.heads
    temporal: str = _BRANCH.temporal
    motion: bool = _BRANCH.motion
    correlation: int = _BRANCH.correlation
    cell_size: str = str(_BRANCH.cell_size)  # auto, 1 (every patch), 2, ...
    dropout: float = _BRANCH.dropout
    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    batch_size: int = 32
    label_smoothing: float = LABEL_SMOOTHING
    clip_grad: float = CLIP_GRAD  # max gradient norm; 0 turns clipping off
    seed: int = 0
    out: str | None = None  # run folder; default runs/<arch>, runs/<arch>-2, ...
    device: str = "auto"
    precision: str = "auto"  # bf16 autocast for the branch: auto = on CUDA only; bf16 = on any device; fp32 = never
    workers: int = 2  # reader processes when the cache is streamed
    in_ram: str = "auto"  # auto, yes or no
    resume: bool = False  # continue the run in `out` from its last completed epoch
    overwrite: bool = False  # replace the run in `out`
    log: str = "none"  # trackers mirroring metrics.jsonl: none or tensorboard (comma-separated)
    init: str | None = None  # evl: an official EVL checkpoint to start from (mad.adapt.evl_checkpoint)

    # What each number and each named choice may be (width, depth, heads and arch: `check_branch`)
    RANGES: ClassVar[dict] = {"epochs": at_least(1), "batch_size": at_least(1), "lr": Range(low=0, note="0: weights stay"),
                              "weight_decay": NON_NEGATIVE, "warmup_epochs": NON_NEGATIVE, "dropout": FRACTION,
                              "label_smoothing": FRACTION, "clip_grad": Range(low=0, note="0: off"), "seed": SEED,
                              "correlation": at_least(0, "0: off"), "workers": at_least(0, "0: read in this process")}
    CHOICES: ClassVar[dict] = {"precision": ("auto", "bf16", "fp32"), "in_ram": ("auto", "yes", "no"),
                               "temporal": TEMPORAL, "arch": ARCHS}

    def __post_init__(self):
        self.check()

    def check(self) -> "TrainConfig":
        """Refuse, in one line naming the option, a setting that cannot be served: before any data is read."""
        check_ranges(self, self.RANGES)
        check_choices(self, self.CHOICES)
        # without a store: as many levels as --depth asks for (the store's own count is checked when it is opened)
        unopened = dataclasses.replace(self.branch(), num_levels=max(_BRANCH.num_levels, self.depth + 1))
        try:
            check_branch(unopened)
        except ValueError as e:  # its message starts with the setting's name: make it the option's
            name, _, rest = str(e).partition(" ")
            raise TrainError(f"--{name.replace('_', '-')} {rest}") from None
        check_device(self.device)
        if self.resume and self.overwrite:
            raise TrainError("--resume and --overwrite contradict each other: pick one")
        if self.resume and not self.out:
            raise TrainError("--resume needs --out: the run folder to continue")
        if self.init and self.arch != "evl":
            raise TrainError(f"--init {self.init}: an official EVL checkpoint, for --arch evl only")
        check_log(self.log)  # a tracker whose package is missing fails here, before any data is read
        return self

    def branch(self, manifest: Manifest | None = None, num_classes: int = _BRANCH.num_classes) -> BranchConfig:
        """The branch these settings train on tokens described by `manifest` (BranchConfig's defaults without)."""
        data = {} if manifest is None else dict(num_levels=len(manifest.levels_for(self.arch)),
                                                in_width=manifest.width, num_tokens=manifest.tokens,
                                                num_frames=manifest.frames)
        if manifest is not None and self.arch == "evl" and manifest.evl:
            data.update(qk_heads=manifest.evl["heads"], qk_eps=manifest.evl["ln_eps"])
        return BranchConfig(arch=self.arch, num_classes=num_classes, width=self.width, depth=self.depth,
                            heads=self.heads, dropout=self.dropout, temporal=self.temporal, motion=self.motion,
                            correlation=self.correlation, cell_size=self.cell_size, **data)

    @classmethod
    def for_arch(cls, arch: str, **settings) -> "TrainConfig":
        """A config for `arch` whose settings not in `settings` are the arch's defaults (`ARCH_DEFAULTS`)."""
        return cls(arch=arch, **{**ARCH_DEFAULTS.get(arch, {}), **settings})

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """A config saved in a run's config.json (older names read too; unknown keys left out)."""
        values = {{"grid_pool": "cell_size"}.get(k, k): v for k, v in values.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def with_arch_defaults(cfg: TrainConfig | dict, given=()) -> TrainConfig:
    """`cfg` (a config or all its values) with its arch's defaults for every setting not in `given` (what a
    command line or a grid set); checked once, on the final values."""
    values = dict(cfg) if isinstance(cfg, dict) else asdict(cfg)
    arch = values.get("arch", _BRANCH.arch)
    return TrainConfig(**{**values, **{k: v for k, v in ARCH_DEFAULTS.get(arch, {}).items() if k not in given}})


# Settings that may change when a run is resumed: they do not change its numbers.
RESUMABLE_KEYS = ("device", "workers", "in_ram", "resume", "overwrite", "out", "log")
RUN_FILES = ("config.json", "metrics.jsonl", "model.safetensors", "last.pt", "summary.json", "curves.png",
             "confusion.png")
RUN_FOLDERS = ("tensorboard",)


def train(cfg: TrainConfig, on_epoch_end: Callable[[dict], None] | None = None, quiet: bool = False) -> dict:
    """Train on `cfg.cache`, validate on `cfg.val`; return the summary (best val metrics)."""
    cfg.check()
    train_store = Store.open(cfg.cache)
    val_store = Store.open(cfg.val) if cfg.val else None
    if val_store is not None:
        train_store.manifest.check_pair(val_store.manifest, cfg.val, f"the training cache {cfg.cache}",
                                        training_keys([cfg.arch]))
    for store in (train_store, val_store):  # what the stores' manifests and the run folder refuse: before reading
        if store is not None:
            branch_for(cfg, store)
    check_run_dir(cfg)
    train_data = val_data = None
    try:
        train_data = open_tokens(train_store, cfg.in_ram, cfg.workers, progress=not quiet, archs=(cfg.arch,))
        val_data = (open_tokens(val_store, cfg.in_ram, cfg.workers, progress=not quiet, archs=(cfg.arch,))
                    if val_store else None)
        return train_on(cfg, train_data, val_data, on_epoch_end, quiet)
    finally:
        for data in (train_data, val_data):
            if data is not None:
                data.close()


def train_on(cfg: TrainConfig, train_data: CachedTokens, val_data: CachedTokens | None = None,
             on_epoch_end: Callable[[dict], None] | None = None, quiet: bool = False) -> dict:
    """Train from already opened data (what `sweep` calls once per configuration): set up, then the epochs."""
    cfg.check()
    cfg = dataclasses.replace(cfg)  # prepare_run_dir fills in `out`; leave the caller's config as it was
    device = resolve_device(cfg.device)
    dist = Distributed(device)
    device = dist.device(device)
    if dist.active and cfg.out is None:
        raise TrainError("under torchrun, name the run folder with --out (every rank must agree on it)")
    if val_data is not None:
        branch_for(cfg, val_data)  # data opened for other archs (a sweep's)
    branch = branch_for(cfg, train_data, count_classes(train_data, val_data))
    if dist.main:  # after every check: a refused run leaves no folder
        prepare_run_dir(cfg)
    dist.barrier()
    run = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model = build_model(branch)
    if branch.arch == "evl":  # the frozen backbone weights that recompute its q, k: the store carries them
        model.load_frozen(train_data.frozen)
    if cfg.init and not (cfg.resume and (run / "last.pt").exists()):  # a resumed run starts from its last.pt
        from mad.adapt.evl_checkpoint import load_official

        load_official(model, cfg.init)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = math.ceil(train_data.num_videos / cfg.batch_size)
    scheduler = make_scheduler(optimizer, round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    log = EpochLog(quiet or not dist.main, cfg.epochs, steps_per_epoch)
    log.print(describe_branch(branch, model, cfg.cell_size))

    start_epoch, history = 0, []
    if cfg.resume and (run / "last.pt").exists():
        start_epoch = restore_training_state(run / "last.pt", model, optimizer, scheduler, device)
        history = read_history(run, start_epoch)
        log.print(f"resuming {run} after epoch {start_epoch}/{cfg.epochs}")
    elif dist.main:
        config = {"train": asdict(cfg), "model": branch.to_dict(), "parameters": count_parameters(model),
                  "mad_version": mad.__version__, "cache_manifest": train_data.manifest.to_dict(),
                  "val_manifest": val_data.manifest.to_dict() if val_data else None}
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (run / "metrics.jsonl").write_text("")
    key = "val/acc/top1" if val_data is not None else "epoch"  # without val data the last epoch is the best
    best = max(history, key=lambda row: row[key]) if history else None

    info = {"class_names": train_data.class_names, "manifest": train_data.manifest.to_dict(), "arch": cfg.arch}
    trained = dist.wrap(model)  # DDP under torchrun, else the model itself
    trackers = Trackers(cfg.log if dist.main else None, run, history)
    with log, trackers:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            started = time.perf_counter()
            row = {"epoch": epoch, **train_one_epoch(trained, optimizer, scheduler, train_data, cfg, epoch, device,
                                                     dist, log.step)}
            if val_data is not None:
                row.update(validate(model, val_data, cfg.batch_size * 2, device, cfg.arch))
            row["epoch_seconds"] = time.perf_counter() - started
            log.epoch_done(row)
            if best is None or row[key] > best[key]:
                best = row
                if dist.main:
                    save_model(model, run / "model.safetensors", branch,
                               {**info, "epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val/")}})
            if dist.main:  # checkpoints and metrics: rank 0 only
                save_training_state(run / "last.pt", epoch, model, optimizer, scheduler)
                with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a line means the epoch is resumable
                    f.write(json.dumps(row) + "\n")
                trackers.log(row)  # after metrics.jsonl: a tracker never shows an epoch the run folder lacks
            history.append(row)
            if on_epoch_end is not None:
                on_epoch_end(row)

    dist.barrier()  # rank 0's files are complete before anyone returns
    if not dist.main:
        return {"run": str(run), "rank": dist.rank}
    summary = finish(run, cfg, history, best, val_data or train_data, "val" if val_data else "train", device)
    log.print(f"[bold]{run}[/]: {summary_line(summary)}")
    return summary


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


def train_one_epoch(model, optimizer, scheduler, data: CachedTokens, cfg: TrainConfig, epoch: int, device,
                    dist: Distributed | None = None, report: Callable[[str], None] = lambda text: None) -> dict:
    """One pass over the training data: {"lr", "train/loss", "train/acc", "clips_per_second"}.

    Under DDP each rank trains on its slice of every global batch; the figures are summed over ranks.
    """
    dist = dist or Distributed(device)
    autocast = branch_autocast(cfg.precision, device)
    model.train()
    started = time.perf_counter()
    loss_sum, correct, seen, lr = 0.0, 0, 0, optimizer.param_groups[0]["lr"]
    for arrays, labels, _, _ in data.train_batches(cfg.batch_size, cfg.seed, epoch):
        global_batch = len(labels)
        arrays, labels = dist.share(arrays, labels)
        inputs = data.to_model(arrays, device, cfg.arch)
        labels = labels.to(device)
        loss, logits = train_step(lambda: model(inputs), labels, optimizer, model.parameters(), autocast,
                                  cfg.label_smoothing, cfg.clip_grad, loss_weight=dist.world / global_batch)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        loss_sum += loss.item() * global_batch / dist.world  # this rank's summed loss
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
        report(f"loss {loss_sum / seen:.4f}  {seen / (time.perf_counter() - started):.0f} clips/s")
    seconds = time.perf_counter() - started
    loss_sum, correct, seen = dist.sum(loss_sum, correct, seen)
    return {"lr": lr, "train/loss": loss_sum / seen, "train/acc": correct / seen, "clips_per_second": seen / seconds}


def validate(model, data: CachedTokens, batch_size: int, device, arch: str = "madapter") -> dict:
    """val/acc/top1, top5, mean1 on the first cached view of every video."""
    probs = predict_probs(model, data, batch_size, device, arch=arch)[:, 0]
    return {f"val/{k}": v for k, v in accuracy(probs, data.labels).items()}


class EpochLog:
    """Training progress fed by the epoch loop: a rich bar per epoch on a terminal, one plain line per
    epoch elsewhere (Slurm, nohup, CI: `mad.progress`), nothing when quiet."""

    def __init__(self, quiet: bool, epochs: int, steps_per_epoch: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = make_console(quiet)
        self.epochs, self.steps = epochs, steps_per_epoch
        self.plain = plain()
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
                                 disable=quiet or self.plain)
        self.task = None

    def print(self, text: str) -> None:
        self.console.print(text)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def step(self, status: str) -> None:
        if self.plain:
            return
        if self.task is None:
            self.task = self.progress.add_task(f"epoch {len(self.progress.tasks) + 1}", total=self.steps, status="")
        self.progress.update(self.task, advance=1, status=status)

    def epoch_done(self, row: dict) -> None:
        val = f"  val {row['val/acc/top1']:.3f}" if "val/acc/top1" in row else ""
        status = (f"loss {row['train/loss']:.4f}  acc {row['train/acc']:.3f}{val}  "
                  f"{row['clips_per_second']:.0f} clips/s")
        if self.plain:
            self.print(f"epoch {row['epoch']}/{self.epochs}  {status}  {row['epoch_seconds']:.1f} s")
            return
        if self.task is None:
            self.task = self.progress.add_task("", total=self.steps, status="")
        self.progress.update(self.task, description=f"epoch {row['epoch']}/{self.epochs}", status=status)
        self.task = None


def branch_for(cfg: TrainConfig, source, num_classes: int = _BRANCH.num_classes) -> BranchConfig:
    """The branch `cfg` trains on `source` (a Store or its opened CachedTokens), or a TrainError naming it."""
    source.manifest.check_serves(cfg.arch, source.location)
    branch = fit_to_store(cfg.branch(source.manifest, num_classes), source, cfg)
    try:
        return check_branch(branch)
    except ValueError as e:
        raise TrainError(f"{source.location}: {e}") from None


def fit_to_store(branch: BranchConfig, data, cfg: TrainConfig) -> BranchConfig:
    """The branch as a compact store can serve it: its cells and correlation come from the store.

    A compact store holds what the branch reads for one cell size and one correlation
    radius; other settings are refused in one line (correlation 0 is served: the stored
    matches are left unread).
    """
    m = data.manifest
    if m.storage != "compact" or branch.arch != "madapter":
        return branch
    fixed = m.compact
    remedy = "extract a full store (mad extract --store full) or a compact one with that setting"
    if cfg.cell_size != "auto" and str(cfg.cell_size) != str(fixed["cell_size"]):
        cell = fixed["cell_size"]
        raise TrainError(f"{data.location}: a compact store with cells of {cell}x{cell} patches cannot serve "
                         f"--cell-size {cfg.cell_size}; {remedy}")
    if branch.correlation not in (0, fixed["correlation"]):
        raise TrainError(f"{data.location}: a compact store with correlation radius {fixed['correlation']} cannot "
                         f"serve --correlation {branch.correlation}; {remedy}")
    return dataclasses.replace(branch, cell_size=fixed["cell_size"], correlation_groups=fixed["correlation_groups"])


def describe_branch(branch: BranchConfig, model, cell_setting: str) -> str:
    text = f"{branch.arch}: {count_parameters(model):,} trainable parameters"
    side = math.isqrt(branch.num_tokens - 1)
    if branch.arch == "madapter" and int(branch.cell_size) > 1:
        cells = -(-side // int(branch.cell_size))
        text += f", patch grid {side}x{side} averaged to {cells}x{cells} cells (--cell-size {cell_setting})"
    if branch.arch == "evl":
        text += (f", {branch.depth} decoder layers (q/k/v width {branch.width}, heads {branch.heads}) over the last "
                 f"{branch.depth} cached blocks, their q/k recomputed from frozen backbone weights")
    return text


def finish(run: Path, cfg: TrainConfig, history: list[dict], best: dict, scored: CachedTokens, which: str,
           device) -> dict:
    """Plots and summary.json from the finished history and the saved best model."""
    plot_curves(history, run / "curves.png")
    model, _ = load_model(run / "model.safetensors", device)
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


# --------------------------------------------------------------------------- pieces


def count_classes(train_data: CachedTokens, val_data: CachedTokens | None) -> int:
    largest = int(train_data.labels.max())
    if val_data is not None:
        largest = max(largest, int(val_data.labels.max()))
    names = train_data.class_names
    if names and largest >= len(names):
        raise TrainError(f"{train_data.location}: label {largest} but only {len(names)} class names")
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
    """Refuse, writing nothing, a run folder that holds another run (or one resumed with other settings)."""
    run = Path(cfg.out) if cfg.out else None
    if run is not None and run.exists() and not run.is_dir():
        raise TrainError(f"{run}: a file, not a run folder; choose another --out")
    if run is None or not (run / "config.json").exists() or cfg.overwrite:
        return
    if not cfg.resume:
        raise TrainError(f"{run}: a run already exists here; pass --resume to continue it, "
                         f"--overwrite to replace it, or another --out")
    saved = asdict(config_from_run(run))
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in asdict(cfg).items()
               if k not in RESUMABLE_KEYS and saved.get(k) != v]
    if changed:
        raise TrainError(f"{run}/config.json: cannot resume with different settings ({'; '.join(changed)})")


def read_history(run: Path, epoch: int) -> list[dict]:
    """metrics.jsonl up to `epoch` (later lines, from an epoch whose last.pt was not written, are dropped)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    history = [row for row in rows if row["epoch"] <= epoch]
    (run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    return history


def config_from_run(run) -> TrainConfig:
    """The TrainConfig saved in a run's config.json (to resume it with the same settings)."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise TrainError(f"{path}: no run to resume here")
    return TrainConfig.from_dict(json.loads(path.read_text())["train"])
