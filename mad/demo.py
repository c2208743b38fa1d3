"""`mad demo`: the whole product on an embedded default, offline, in a few minutes on a CPU.

Draws a labelled video set in which only temporal order decides the class (each
class pair is an exact time reversal), encodes it to mp4, extracts it with a small
random-weight ViT, trains the M-adapter branch and the static `meanpool` and `linear` baselines
from the cache, and prints their accuracies side by side. A static model sees the
same distribution for both classes of a pair, so it cannot beat 1/2 within a pair;
each pair's background tint lets it tell the pairs apart, so it lands near 1/2.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from mad.errors import MadError

DEMO_MODEL = str(Path(__file__).parent / "configs" / "mad-demo-vit.json")


@dataclass
class DemoConfig:
    out: str = "demo"               # videos, caches and runs go here
    videos_per_class: int = 64
    val_per_class: int = 16
    frames: int = 8                 # T sampled per clip (the clips have 16)
    layers: str = "1,2"             # random blocks mix tokens globally: the shallow ones keep more layout
    epochs: int = 10               # madapter: val top-1 0.99-1.00 after 10 epochs (demo_time.md)
    seed: int = 0
    archs: tuple[str, ...] = ("madapter", "meanpool", "linear")  # mad demo --archs ...,evl adds EVL (slow on CPU)
    progress: bool = True

    def __post_init__(self):
        self.check()

    def check(self) -> "DemoConfig":
        """Refuse a setting the demo's extraction or training would refuse, before drawing any video."""
        from mad.adapt.families import Registered
        from mad.options import SEED, at_least, check_choice, check_layers, check_ranges

        check_ranges(self, {"videos_per_class": at_least(1), "val_per_class": at_least(1), "frames": at_least(1),
                            "epochs": at_least(1), "seed": SEED})
        check_layers(self.layers)
        if not self.archs:
            raise MadError("--archs: name at least one arch")
        for arch in self.archs:
            check_choice("archs", arch, Registered())
        return self


def demo_extract_config(videos, out, cfg: DemoConfig, **overrides):
    """How the demo extracts: its small random-weight ViT, fp32, two decoding workers (16.5 s vs 19.0 s with one
    for the 384 training clips on 2 cores)."""
    from mad.extract.run import ExtractConfig

    return ExtractConfig(videos=str(videos), out=str(out), model=DEMO_MODEL, pretrained="none", layers=cfg.layers,
                         frames=cfg.frames, precision="fp32", batch_size=8, workers=2, shard_size=16,
                         progress=cfg.progress, **overrides)


def demo_train_config(cache, val, arch: str, out, cfg: DemoConfig, seed: int | None = None, **overrides):
    """How the demo trains: a branch of width 128 for its 128-wide ViT."""
    from mad.adapt.train import TrainConfig

    return TrainConfig(cache=str(cache), val=str(val), arch=arch, epochs=cfg.epochs,
                       seed=cfg.seed if seed is None else seed, out=str(out), overwrite=True, width=128, heads=4,
                       batch_size=16, lr=1e-3, **overrides)


def extract_demo(cfg: DemoConfig, archs=("madapter",), **overrides) -> dict:
    """Draw the demo's videos into cfg.out/videos and extract both splits into cfg.out/cache/{train,val}
    (an extraction that is already complete is left as it is), with what `archs` read: {"classes": [...],
    "train": ..., "val": ...}."""
    from mad.adapt.families import family, store_needs
    from mad.extract.run import extract
    from mad.synthetic import make_demo_videos

    out = Path(cfg.out)
    videos = make_demo_videos(out / "videos", videos_per_class=cfg.videos_per_class,
                              val_per_class=cfg.val_per_class, seed=cfg.seed)
    needs = store_needs(",".join(family(arch).stored_as for arch in archs))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*random weights.*")
        for split in ("train", "val"):
            extract(demo_extract_config(videos[split], out / "cache" / split, cfg, **overrides), needs)
    return {"classes": videos["classes"], "train": out / "cache" / "train", "val": out / "cache" / "val"}


def run_demo(cfg: DemoConfig) -> dict:
    from rich.console import Console
    from rich.table import Table

    from mad.adapt.train import train
    from mad.tables import print_table

    console = Console()
    out = Path(cfg.out)
    started = time.perf_counter()
    console.print(f"[bold]mad demo[/bold]: synthetic temporal-order videos -> {out}/")
    console.print("backbone: a small ViT (mad-demo-vit: 112 px, 8 px patches, so a 14x14 grid as ViT-B/16's; 4 blocks, "
                  "width 128) with [bold]random weights[/bold] "
                  "(no download needed): the features are not pre-trained")
    caches = extract_demo(cfg, cfg.archs)
    console.print(f"classes: {', '.join(caches['classes'])}")
    results = {}
    for arch in cfg.archs:
        console.print(f"training [bold]{arch}[/bold] from the cache")
        summary = train(demo_train_config(out / "cache" / "train", out / "cache" / "val", arch, out / "runs" / arch,
                                          cfg), quiet=not cfg.progress, given=())  # each arch's own preset
        results[arch] = summary
    seconds = time.perf_counter() - started

    table = Table(title="mad demo: val accuracy (6 classes; static models cannot beat 1/2 within a pair)")
    for column in ("arch", "val top-1 (last epoch)", "val top-1 (best epoch)", "trainable params", "run"):
        table.add_column(column)
    for arch, summary in results.items():
        table.add_row(arch, f"{summary['last/val/acc/top1']:.3f}", f"{summary['val/acc/top1']:.3f}",
                      f"{summary['parameters']:,}", str(out / "runs" / arch))
    print_table(table, console)
    console.print(f"demo finished in {seconds:.0f} s")
    report = {"seconds": seconds, "config": dataclasses.asdict(cfg),
              "results": {arch: {"val_top1_last": s["last/val/acc/top1"], "val_top1_best": s["val/acc/top1"],
                                 "parameters": s["parameters"]} for arch, s in results.items()}}
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
