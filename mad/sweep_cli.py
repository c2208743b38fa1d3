"""`mad sweep`'s options (registered by `mad.cli`): parse them, call `mad.adapt.sweep.sweep`."""

from __future__ import annotations

from typing import Optional

import typer

from mad.adapt.config import TrainConfig

TRAIN = TrainConfig()


def sweep_command(
    grid: Optional[str] = typer.Option(None, "--grid", help="Every combination, e.g. 'lr=1e-3,3e-4; width=256,384; "
                                       "arch=madapter,linear' (Optuna's GridSampler)."),
    space: Optional[str] = typer.Option(None, "--space", help="With --trials: ranges and lists to draw from, e.g. "
                                        "'lr=loguniform:1e-4:1e-2; dropout=uniform:0:0.3; arch=madapter,evl'."),
    trials: Optional[int] = typer.Option(None, "--trials", help="How many configurations to draw from --space."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="--space: random or tpe (default), seeded "
                                          "by --seed."),
    pruner: str = typer.Option("none", "--pruner", help="none, halving or hyperband: stop weak configurations "
                               "early on their val top-1 each epoch."),
    at_once: Optional[int] = typer.Option(None, "--at-once", help="Configurations trained together, from one "
                                          "read of each batch (default: all; tpe: 4)."),
    study_name: Optional[str] = typer.Option(None, "--study-name", help="The Optuna study (default: the --out "
                                             "folder's name)."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Where the study lives: a journal file (on a "
                                          "shared disk for several processes) or an Optuna RDB URL (default: "
                                          "<out>/study.journal)."),
    max_stack: Optional[int] = typer.Option(None, "--max-stack", help="At most this many same-shape "
                                            "configurations step as one stacked model (1: one after another; "
                                            "default: as many as half the free memory holds)."),
    cache: str = typer.Option("cache", "--cache", help="Training cache."),
    val: Optional[str] = typer.Option(None, "--val", help="Validation cache (ranks the runs)."),
    out: str = typer.Option("runs/sweep", "--out", help="Folder for the runs and leaderboard.csv."),
    epochs: int = typer.Option(TRAIN.epochs),
    batch_size: int = typer.Option(TRAIN.batch_size),
    device: str = typer.Option(TRAIN.device),
    seed: int = typer.Option(TRAIN.seed),
    in_ram: str = typer.Option(TRAIN.in_ram, "--in-ram", help="auto, yes or no."),
    workers: int = typer.Option(TRAIN.workers, "--workers", help="Reader processes when the cache is streamed "
                                "(0: read in this process)."),
    log: str = typer.Option(TRAIN.log, "--log", help="Also log metrics.jsonl's numbers to: none or tensorboard "
                            "(<run>/tensorboard; pip install tensorboard)."),
):
    """Train a grid, or N drawn configurations, from one read of the cache; prune, resume; print a leaderboard."""
    from mad.adapt.search import SearchConfig
    from mad.adapt.sweep import sweep as run_sweep

    base = TrainConfig(epochs=epochs, batch_size=batch_size, device=device, seed=seed, in_ram=in_ram, workers=workers,
                       log=log)
    run_sweep(cache, val, grid, out, base, search=SearchConfig(
        grid=grid, space=space, trials=trials, sampler=sampler, pruner=pruner, at_once=at_once,
        study_name=study_name, storage=storage, max_stack=max_stack))
