"""Lockstep training: several resolved configurations step on each batch, read once.

`train_lockstep(members, train_data, val_data)` splits the members into reading groups by
what changes the batches (batch_size and seed: the data order of epoch e depends only on
(seed, e)); within a group each training batch is read and moved to the device once and
every member takes its step on it. `mad train` is a one-member lockstep, so a
configuration trained in a sweep writes the same metrics.jsonl as trained alone.

Each member keeps its own model, AdamW, schedule, label smoothing and gradient clipping,
and its own random state: the global torch RNG is swapped in and out around each member's
step, so its dropout masks are those it would draw alone, whatever its mates.
Members step one after another on the shared batch (no vmap stacking yet).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import torch

import mad
from mad.adapt.branch import BranchConfig, count_parameters
from mad.adapt.checkpoint import restore_training_state, save_model, save_training_state
from mad.adapt.config import TrainConfig, TrainError
from mad.adapt.distributed import Distributed
from mad.adapt.evaluate import predict_probs_together
from mad.adapt.families import check_served, family
from mad.adapt.step import make_optimizer, make_scheduler, train_step
from mad.adapt.tracking import Trackers
from mad.cache.dataset import CachedTokens
from mad.progress import EpochLog, make_console
from mad.runtime import available_memory, branch_autocast, resolve_device


class Member:
    """One configuration's run: model, optimizer, schedule, random state, history, run folder."""

    def __init__(self, cfg: TrainConfig, branch: BranchConfig, train_data: CachedTokens,
                 val_data: CachedTokens | None, quiet: bool):
        from mad.adapt.train import prepare_run_dir, read_history
        cfg = dataclasses.replace(cfg, model=branch)  # a copy (prepare_run_dir fills in `out`), saved whole
        self.cfg, self.branch, self.entry = cfg, branch, family(cfg.arch)
        device = resolve_device(cfg.device)
        self.dist = Distributed(device)
        self.device = self.dist.device(device)
        if self.dist.active and cfg.out is None:
            raise TrainError("under torchrun, name the run folder with --out (every rank must agree on it)")
        for data in (train_data, val_data):  # data opened for other archs (a sweep's) must hold this one's
            if data is not None:
                check_served(cfg.arch, data.manifest, data.location)
        if self.dist.main:  # after every check: a refused run leaves no folder
            prepare_run_dir(cfg)
        self.dist.barrier()
        self.run = run = Path(cfg.out)
        torch.manual_seed(cfg.seed)
        resuming = cfg.resume and (run / "last.pt").exists()
        model = self.entry.build(branch, train_data.frozen)  # frozen weights a family needs: the store's
        if cfg.init and not resuming:  # a resumed run starts from its last.pt
            self.entry.start_from(model, cfg.init)
        self.model = model = model.to(self.device)
        self.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
        self.steps_per_epoch = math.ceil(train_data.num_videos / cfg.batch_size)
        self.scheduler = make_scheduler(self.optimizer, round(cfg.warmup_epochs * self.steps_per_epoch),
                                        cfg.epochs * self.steps_per_epoch)
        self.log = EpochLog(quiet or not self.dist.main, cfg.epochs, self.steps_per_epoch)
        self.log.print(self.entry.describe(branch, count_parameters(model)))
        self.start_epoch, self.history = 0, []
        if resuming:
            self.start_epoch = restore_training_state(run / "last.pt", model, self.optimizer, self.scheduler,
                                                      self.device)
            self.history = read_history(run, self.start_epoch)
            self.log.print(f"resuming {run} after epoch {self.start_epoch}/{cfg.epochs}")
        elif self.dist.main:
            config = {**cfg.saved(), "parameters": count_parameters(model),
                      "mad_version": mad.__version__, "cache_manifest": train_data.manifest.to_dict(),
                      "val_manifest": val_data.manifest.to_dict() if val_data else None}
            (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (run / "metrics.jsonl").write_text("")
        self.key = "val/acc/top1" if val_data is not None else "epoch"  # without val: the last epoch is best
        self.best = max(self.history, key=lambda row: row[self.key]) if self.history else None
        self.info = {"class_names": train_data.class_names, "manifest": train_data.manifest.to_dict(),
                     "arch": cfg.arch}
        self.trained = self.dist.wrap(model)  # DDP under torchrun, else the model itself
        self.trackers = Trackers(cfg.log if self.dist.main else None, run, self.history)
        self.autocast = branch_autocast(cfg.precision, self.device)
        self.rng = random_state(self.device)  # what a run alone would draw from next: its dropout masks
        self.pruned_at = None
        self.best_probs = None  # the best epoch's val probabilities, when validated in this process

    def active(self, epoch: int) -> bool:
        return self.pruned_at is None and self.start_epoch < epoch <= self.cfg.epochs

    def begin_epoch(self) -> None:
        self.model.train()
        self.started = time.perf_counter()
        self.loss_sum, self.correct, self.seen, self.lr = 0.0, 0, 0, self.optimizer.param_groups[0]["lr"]

    def step(self, arrays, labels, global_batch: int, data: CachedTokens) -> None:
        """This member's step on a batch already on the device (`arrays`, `labels`: this rank's share of a
        `global_batch`)."""
        inputs = self.entry.inputs(arrays, data.manifest)
        mates = random_state(self.device)
        set_random_state(self.rng, self.device)
        loss, logits = train_step(lambda: self.trained(inputs), labels, self.optimizer, self.trained.parameters(),
                                  self.autocast, self.cfg.label_smoothing, self.cfg.clip_grad,
                                  loss_weight=self.dist.world / global_batch)
        self.rng = random_state(self.device)
        set_random_state(mates, self.device)
        self.lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.loss_sum += loss.item() * global_batch / self.dist.world  # this rank's summed loss
        self.correct += (logits.argmax(dim=1) == labels).sum().item()
        self.seen += len(labels)
        self.log.step(f"loss {self.loss_sum / self.seen:.4f}  "
                      f"{self.seen / (time.perf_counter() - self.started):.0f} clips/s")

    def end_epoch(self, epoch: int, val_probs: torch.Tensor | None, val_data: CachedTokens | None,
                  seconds: float) -> dict:
        """The epoch's row after `seconds` of training, validated by `val_probs` (this member's probabilities
        on `val_data`, [V, C]; None without a val split)."""
        from mad.adapt.train import val_figures
        loss_sum, correct, seen = self.dist.sum(self.loss_sum, self.correct, self.seen)
        row = {"epoch": epoch, "lr": self.lr, "train/loss": loss_sum / seen, "train/acc": correct / seen,
               "clips_per_second": seen / seconds}
        if val_probs is not None:
            row.update(val_figures(val_probs, val_data.labels))
        row["epoch_seconds"] = time.perf_counter() - self.started
        self.log.epoch_done(row)
        run = self.run
        if self.best is None or row[self.key] > self.best[self.key]:
            self.best, self.best_probs = row, val_probs  # the summary scores the best model: kept, not re-read
            if self.dist.main:
                save_model(self.model, run / "model.safetensors", self.branch,
                           {**self.info, "epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val/")}})
        if self.dist.main:  # checkpoints and metrics: rank 0 only
            outer = random_state(self.device)
            set_random_state(self.rng, self.device)  # last.pt holds this member's random state: exact resume
            save_training_state(run / "last.pt", epoch, self.model, self.optimizer, self.scheduler)
            set_random_state(outer, self.device)
            with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a line means the epoch is resumable
                f.write(json.dumps(row) + "\n")
            self.trackers.log(row)  # after metrics.jsonl: a tracker never shows an epoch the run folder lacks
        self.history.append(row)
        return row

    def finish(self, train_data: CachedTokens, val_data: CachedTokens | None) -> dict:
        from mad.adapt.train import finish, summary_line
        self.dist.barrier()  # rank 0's files are complete before anyone returns
        if not self.dist.main:
            return {"run": str(self.run), "rank": self.dist.rank}
        summary = finish(self.run, self.cfg, self.history, self.best, val_data or train_data,
                         "val" if val_data else "train", self.device, self.best_probs)
        if self.pruned_at is not None:
            summary["pruned_at_epoch"] = self.pruned_at
            (self.run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.log.print(f"[bold]{self.run}[/]: {summary_line(summary)}")
        return summary


def random_state(device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if torch.device(device).type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_random_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def reading_groups(members: list[tuple[TrainConfig, BranchConfig]]) -> dict[tuple[int, int], list[int]]:
    """Member indices by what sets their batches: (batch_size, seed) -> indices, in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (cfg, _) in enumerate(members):
        groups.setdefault((cfg.batch_size, cfg.seed), []).append(i)
    return groups


def train_lockstep(members: list[tuple[TrainConfig, BranchConfig]], train_data: CachedTokens,
                   val_data: CachedTokens | None = None, *, max_stack: int | None = None,
                   on_epoch_end: Callable[[int, dict], bool] | None = None, quiet: bool = False) -> list[dict]:
    """Train every member; each training batch is read once per reading group. `on_epoch_end(i, row)`
    returning True prunes member i (it stops; its run folder stays, its summary says `pruned_at_epoch`).
    `max_stack`: at most this many members set up at once (their models held together). Returns each
    member's summary as `train_on` returns it, in the members' order."""
    groups = reading_groups(members)
    if len(members) > 1 and not quiet:
        console = make_console()
        console.print(f"{len(members)} configurations in {len(groups)} reading group(s)"
                      f"{f', at most {max_stack} at once' if max_stack else ''}")
        for (batch_size, seed), indices in groups.items():
            console.print(f"reading group batch_size={batch_size} seed={seed} (they set the data order): "
                          f"members {', '.join(str(i) for i in indices)}")
    summaries: list[dict | None] = [None] * len(members)
    for indices in groups.values():
        size = max(max_stack or memory_stack_size([members[i] for i in indices], train_data), 1)
        if size < len(indices) and not quiet:
            make_console().print(f"members {', '.join(str(i) for i in indices)}: {size} at a time "
                                 f"({'--max-stack' if max_stack else 'free memory'})")
        for first in range(0, len(indices), size):
            chunk = indices[first:first + size]
            done = _train_group([members[i] for i in chunk], train_data, val_data, quiet,
                                lambda j, row: bool(on_epoch_end(chunk[j], row)) if on_epoch_end else False)
            for i, summary in zip(chunk, done):
                summaries[i] = summary
    return summaries


def memory_stack_size(members, train_data: CachedTokens, share: float = 0.5) -> int:
    """How many members fit at once in `share` of the free memory of their device (CUDA: mem_get_info; CPU:
    available RAM). A member holds its parameters, gradients and two AdamW moments (4 x the parameter
    bytes); the activations of one step are counted once, since members step one after another."""
    device = resolve_device(members[0][0].device)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    held = []
    for cfg, branch in members:
        parameters = count_parameters(family(cfg.arch).build(branch, train_data.frozen))
        held.append(16 * parameters)
    activations = 64 * max(held)  # a rough bound for one batch's activations of one member
    return max(int((free * share - activations) // max(held)), 1)


def _train_group(members, train_data, val_data, quiet, on_epoch_end) -> list[dict]:
    """Members sharing batch_size and seed: one read of each batch, every active member steps on it; one read
    of the val split validates them all."""
    bars = quiet or len(members) > 1  # one live progress display at a time: a line per epoch for several
    console = make_console(quiet)
    runs = [Member(cfg, branch, train_data, val_data, bars) for cfg, branch in members]
    cfg, dist, device = runs[0].cfg, runs[0].dist, runs[0].device
    with ExitStack() as stack:
        for run in runs:
            stack.enter_context(run.log)
            stack.enter_context(run.trackers)
        for epoch in range(1, max(run.cfg.epochs for run in runs) + 1):
            active = [run for run in runs if run.active(epoch)]
            if not active:
                continue
            for run in active:
                run.begin_epoch()
            for arrays, labels, _, _ in train_data.train_batches(cfg.batch_size, cfg.seed, epoch):
                global_batch = len(labels)
                arrays, labels = dist.share(arrays, labels)
                arrays, labels = train_data.to_device(arrays, device), labels.to(device)
                for run in active:
                    run.step(arrays, labels, global_batch, train_data)
            seconds = time.perf_counter() - active[0].started
            probs = [None] * len(active)
            if val_data is not None:  # one read of the val split for every active member
                probs = [p[:, 0] for p in predict_probs_together([run.model for run in active], val_data,
                                                                 cfg.batch_size * 2, device,
                                                                 archs=[run.cfg.arch for run in active])]
            for run, val_probs in zip(active, probs):
                row = run.end_epoch(epoch, val_probs, val_data, seconds)
                if len(runs) > 1:
                    val = f"  val top-1 {row['val/acc/top1']:.3f}" if "val/acc/top1" in row else ""
                    console.print(f"{run.run} epoch {epoch}/{run.cfg.epochs}  loss {row['train/loss']:.4f}{val}")
                if on_epoch_end(runs.index(run), row) and epoch < run.cfg.epochs:
                    run.pruned_at = epoch
                    run.log.print(f"{run.run}: pruned after epoch {epoch}")
    return [run.finish(train_data, val_data) for run in runs]
