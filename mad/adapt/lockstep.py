"""Lockstep training: several resolved configurations step on each batch, read once.

`train_lockstep(members, train_data, val_data)` splits the members into reading groups by
what changes the batches (batch_size and seed: the data order of epoch e depends only on
(seed, e)); within a group each training batch is read and moved to the device once and
every member takes its step on it, and the val cache is read once per epoch for all of
them. `mad train` is a one-member lockstep, so a configuration trained in a sweep writes
the same metrics.jsonl as trained alone.

Members of the same shape (`mad.adapt.stacked.stack_shape`) step as one stacked model
(`mad.adapt.stacked.Stack`: vmap over their stacked parameters), as many at once as
memory allows (`max_stack`, or the free memory over a measured per-member step); the
others step one after another. Either way each member keeps its own model, AdamW,
schedule, label smoothing, clipping and dropout masks (drawn from its key: seed, epoch,
batch), so its numbers do not depend on its mates.
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
from mad.adapt.evaluate import accuracy, predict_probs_together
from mad.adapt.families import check_served, family
from mad.adapt.layers import dropout_key, step_key
from mad.adapt.rundir import finish, prepare_run_dir, read_history, summary_line
from mad.adapt.stacked import Stack, bytes_per_member, stack_shape
from mad.adapt.step import make_optimizer, make_scheduler, train_step
from mad.adapt.tracking import Trackers
from mad.cache.dataset import CachedTokens
from mad.progress import EpochLog, make_console
from mad.runtime import available_memory, branch_autocast, resolve_device

MEMORY_SHARE = 0.5  # of the device's free memory a sweep plans to use


class Member:
    """One configuration's run: model, optimizer, schedule, history, run folder."""

    def __init__(self, cfg: TrainConfig, branch: BranchConfig, train_data: CachedTokens,
                 val_data: CachedTokens | None, quiet: bool):
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
        torch.manual_seed(cfg.seed)  # the initialisation: a function of the seed only
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
        self.best_probs = None  # the kept model's val probabilities, when this session computed them
        self.info = {"class_names": train_data.class_names, "manifest": train_data.manifest.to_dict(),
                     "arch": cfg.arch}
        self.trained = self.dist.wrap(model)  # DDP under torchrun, else the model itself
        self.trackers = Trackers(cfg.log if self.dist.main else None, run, self.history)
        self.autocast = branch_autocast(cfg.precision, self.device)
        self.pruned_at = None

    def active(self, epoch: int) -> bool:
        return self.pruned_at is None and self.start_epoch < epoch <= self.cfg.epochs

    def begin_epoch(self) -> None:
        self.model.train()
        self.started = time.perf_counter()
        self.loss_sum, self.correct, self.seen, self.lr = 0.0, 0, 0, self.optimizer.param_groups[0]["lr"]

    def step(self, inputs, labels, global_batch: int, key: int) -> None:
        """This member's own step on a batch already on the device (`labels`: this rank's share of a
        `global_batch`); its dropout masks come from `key`."""
        with dropout_key(torch.tensor(key, device=self.device)):
            loss, logits = train_step(lambda: self.trained(inputs), labels, self.optimizer,
                                      self.trained.parameters(), self.autocast, self.cfg.label_smoothing,
                                      self.cfg.clip_grad, loss_weight=self.dist.world / global_batch)
        self.record(loss, logits, labels, global_batch)

    def record(self, loss, logits, labels, global_batch: int) -> None:
        """After this member's optimizer step (alone or in a stack): its schedule and running figures."""
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
        on `val_data`, [V, C]; None without a val split); checkpoints, metrics."""
        loss_sum, correct, seen = self.dist.sum(self.loss_sum, self.correct, self.seen)
        row = {"epoch": epoch, "lr": self.lr, "train/loss": loss_sum / seen, "train/acc": correct / seen,
               "clips_per_second": seen / seconds}
        if val_probs is not None:
            row.update({f"val/{k}": v for k, v in accuracy(val_probs, val_data.labels).items()})
        row["epoch_seconds"] = time.perf_counter() - self.started
        self.log.epoch_done(row)
        run = self.run
        if self.best is None or row[self.key] > self.best[self.key]:
            self.best, self.best_probs = row, val_probs
            if self.dist.main:
                save_model(self.model, run / "model.safetensors", self.branch,
                           {**self.info, "epoch": epoch, **{k: v for k, v in row.items() if k.startswith("val/")}})
        if self.dist.main:  # checkpoints and metrics: rank 0 only
            save_training_state(run / "last.pt", epoch, self.model, self.optimizer, self.scheduler)
            with open(run / "metrics.jsonl", "a") as f:  # after last.pt: a line means the epoch is resumable
                f.write(json.dumps(row) + "\n")
            self.trackers.log(row)  # after metrics.jsonl: a tracker never shows an epoch the run folder lacks
        self.history.append(row)
        return row

    def finish(self, train_data: CachedTokens, val_data: CachedTokens | None) -> dict:
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


def reading_groups(members: list[tuple[TrainConfig, BranchConfig]]) -> dict[tuple[int, int], list[int]]:
    """Member indices by what sets their batches: (batch_size, seed) -> indices, in order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (cfg, _) in enumerate(members):
        groups.setdefault((cfg.batch_size, cfg.seed), []).append(i)
    return groups


def train_lockstep(members: list[tuple[TrainConfig, BranchConfig]], train_data: CachedTokens,
                   val_data: CachedTokens | None = None, *, max_stack: int | None = None,
                   on_epoch_end: Callable[[int, dict], bool] | None = None, quiet: bool = False) -> list[dict]:
    """Train every member; each training batch is read once per reading group, the val cache once per group
    and epoch. `on_epoch_end(i, row)` returning True prunes member i (it stops; its run folder stays, its
    summary says `pruned_at_epoch`). `max_stack`: at most this many same-shape members step as one stacked
    model (1: each steps alone; None: as many as free memory allows). Returns each member's summary as
    `train_on` returns it, in the members' order."""
    groups = reading_groups(members)
    console = make_console(quiet or len(members) == 1)
    console.print(f"{len(members)} configurations in {len(groups)} reading group(s)")
    summaries: list[dict | None] = [None] * len(members)
    for (batch_size, seed), indices in groups.items():
        console.print(f"reading group batch_size={batch_size} seed={seed} (they set the data order): "
                      f"members {', '.join(str(i) for i in indices)}")
        size = members_at_once([members[i] for i in indices], train_data)
        if size < len(indices):
            console.print(f"  {size} held at a time (free memory): the group reads the data once per {size}")
        for first in range(0, len(indices), size):
            chunk = indices[first:first + size]
            done = _train_group([members[i] for i in chunk], chunk, train_data, val_data, max_stack, console,
                                quiet, lambda j, row: bool(on_epoch_end(chunk[j], row)) if on_epoch_end else False)
            for i, summary in zip(chunk, done):
                summaries[i] = summary
    return summaries


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (CUDA: mem_get_info; CPU: available RAM)."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()


def members_at_once(members, train_data: CachedTokens) -> int:
    """How many members' models and AdamW states fit at once in MEMORY_SHARE of free memory (5 x parameter
    bytes each: `mad.adapt.stacked.bytes_per_member`); the rest of a group waits and reads the data again."""
    held = []
    for cfg, branch in members:
        model = family(cfg.arch).build(branch, train_data.frozen)
        held.append(5 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad))
    device = resolve_device(members[0][0].device)
    return max(min(int(free_memory(device) * MEMORY_SHARE // max(held)), len(members)), 1)


def plan_stacks(runs: list[Member], max_stack: int | None, inputs, measured: dict) -> tuple[list[list[Member]], str]:
    """Who steps with whom: same-shape members in stacks of at most `max_stack` (None: what fits in free
    memory, from one member's step measured on `inputs` once, kept in `measured`); and why, for the log."""
    shapes: dict[tuple, list[Member]] = {}
    for run in runs:
        shapes.setdefault(stack_shape(run.cfg, run.branch), []).append(run)
    if runs[0].dist.active:
        return [[run] for run in runs], "each steps alone (DDP under torchrun does not stack)"
    if max_stack is not None:
        size, why = max_stack, f"--max-stack {max_stack}"
    else:
        first = runs[0]
        if not measured:
            measured["held"], measured["step"] = bytes_per_member(first.model, lambda: first.model(inputs))
        held, step = measured["held"], measured["step"]
        budget = free_memory(first.device) * MEMORY_SHARE - held * len(runs)
        size = max(int(budget // max(step, 1)), 1)
        why = (f"free memory: {MEMORY_SHARE:.0%} of {free_memory(first.device) / 1e9:.1f} GB, "
               f"{held / 1e6:.1f} MB held + {step / 1e6:.1f} MB a step per member (measured)")
    stacks = [same[i:i + size] for same in shapes.values() for i in range(0, len(same), size)]
    kinds = f"{len(shapes)} shape(s)" + (" (arch, precision or branch settings other than dropout differ)"
                                         if len(shapes) > 1 else "")
    return stacks, f"{kinds}; up to {size} stack ({why})"


def _train_group(members, indices, train_data, val_data, max_stack, console, quiet, on_epoch_end) -> list[dict]:
    """Members sharing batch_size and seed: one read of each batch, every active member steps on it."""
    bars = quiet or len(members) > 1  # one live progress display at a time: a line per epoch for several
    runs = [Member(cfg, branch, train_data, val_data, bars) for cfg, branch in members]
    number = {id(run): i for run, i in zip(runs, indices)}  # the member's index in the sweep
    cfg, dist, device = runs[0].cfg, runs[0].dist, runs[0].device
    said, measured = None, {}
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
            steppers = None
            for batch, (arrays, labels, _, _) in enumerate(train_data.train_batches(cfg.batch_size, cfg.seed, epoch)):
                global_batch = len(labels)
                arrays, labels = dist.share(arrays, labels)
                arrays, labels = train_data.to_device(arrays, device), labels.to(device)
                inputs = {}  # each family's view of the batch, made once
                for run in active:
                    if run.cfg.arch not in inputs:
                        inputs[run.cfg.arch] = run.entry.inputs(arrays, train_data.manifest)
                if steppers is None:  # planned on the epoch's first batch: a step is measured on it
                    stacks, why = plan_stacks(active, max_stack, inputs[active[0].cfg.arch], measured)
                    steppers = [Stack(s) if len(s) > 1 else s[0] for s in stacks]
                    plan = [[number[id(run)] for run in s] for s in stacks]
                    if plan != said:
                        console.print(f"  stacks {' '.join(str(s) for s in plan)}: {why}")
                        said = plan
                key = step_key(cfg.seed, epoch, batch)  # every member of the group draws its masks from it
                for stepper in steppers:
                    if isinstance(stepper, Stack):
                        keys = torch.full((stepper.size,), key, device=device)
                        losses, logits = stepper.step(inputs[stepper.members[0].cfg.arch], labels, keys,
                                                      1 / global_batch)
                        for run, loss, member_logits in zip(stepper.members, losses, logits):
                            run.record(loss, member_logits, labels, global_batch)
                    else:
                        stepper.step(inputs[stepper.cfg.arch], labels, global_batch, key)
            for stepper in steppers or []:
                if isinstance(stepper, Stack):
                    stepper.unstack()
            seconds = time.perf_counter() - active[0].started  # training only: clips_per_second
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
