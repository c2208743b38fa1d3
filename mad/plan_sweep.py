"""`mad plan --sweep K --epochs E`: the predicted time of a K-configuration sweep, extraction included.

A prediction from counted work and stated rates, not a measurement:
    work      FLOPs per clip of the branch's training step (forward + backward) and of its
              validation (forward), and of the backbone per video-view (extraction), counted
              by `torch.utils.flop_counter.FlopCounterMode` on the real models: the backbone
              with random weights, the branch resolved by `mad.adapt.config.resolve` against
              the manifest `mad extract` would write, fed that store's arrays (attention in
              its math form, so its matrix products are counted; elementwise work is not);
              bytes per video-view from the store layout (`mad.plan.bytes_per_view`)
    rates     --device-tflops x --utilisation (the share of the peak the work reaches),
              --disk-gbps for reading the store and writing it, --cpu-cores x
              --decode-seconds (CPU-seconds to decode one clip) for extraction's decoding
    overlap   reading and computing overlap (DataLoader readers beside the device), so a
              phase takes the longer of the two: read-bound or compute-bound
Sweeps, both streaming the train split every epoch and holding the val split in RAM
(`--in-ram auto` on a data-centre host: read once per process):
    lockstep       one `mad sweep`: each batch read once, every configuration steps on it
    one by one     K `mad train` runs: each reads the whole train split every epoch
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mad.adapt.families import Registered
from mad.errors import MadError
from mad.options import POSITIVE, Range, at_least, check_choices, check_ranges

# Defaults, a current data-centre GPU node: an NVIDIA H100 SXM's dense bf16 peak (989 TFLOP/s, NVIDIA's
# datasheet, without sparsity), one PCIe 4.0 data-centre NVMe drive's sequential read (~7 GB/s, e.g.
# Samsung PM9A3 or Micron 7450), 16 host cores per GPU (a DGX H100 has 112 for 8 GPUs; the H100 hosts
# this project borrows have 16).
DEVICE_TFLOPS = 989.0
DISK_GBPS = 7.0
CPU_CORES = 16
# Small models at batch 32 reach a small share of a large GPU's peak (kernel launches and memory-bound
# elementwise work dominate); 0.2 is an assumption until `mad bench sweep` measures one on a GPU.
UTILISATION = 0.2
# CPU-seconds to decode one 8-frame clip of a Kinetics video, measured on this project's CPU
# (benchmarks/results/extract_cpu_ViT-B-16.json: decode_cpu_seconds_per_clip, median of 3 runs).
DECODE_SECONDS = 0.48


@dataclass
class SweepPlanConfig:
    sweep: int | None = None          # K configurations; None: no sweep planned
    epochs: int = 30
    arch: str = "madapter"            # the branch family whose FLOPs are counted (its preset)
    store: str = "compact"            # the storage mode the sweep reads
    classes: int = 400
    device_tflops: float = DEVICE_TFLOPS
    utilisation: float = UTILISATION
    disk_gbps: float = DISK_GBPS
    cpu_cores: int = CPU_CORES
    decode_seconds: float = DECODE_SECONDS

    RANGES: ClassVar[dict] = {"sweep": at_least(1), "epochs": at_least(1), "classes": at_least(2),
                              "device_tflops": POSITIVE, "disk_gbps": POSITIVE, "cpu_cores": at_least(1),
                              "utilisation": Range(low=0, high=1, low_open=True), "decode_seconds": Range(low=0)}
    CHOICES: ClassVar[dict] = {"store": ("compact", "full"), "arch": Registered()}

    def __post_init__(self):
        check_ranges(self, self.RANGES)
        check_choices(self, self.CHOICES)


def plan_command(cfg, sweep: SweepPlanConfig, as_json: bool = False, needs: dict | None = None) -> None:
    """`mad plan`: the extraction plan of `cfg` (a PlanConfig; `needs`: what its --branches store beyond
    --layers), or with --sweep K the predicted sweep."""
    from mad.plan import plan, print_plan

    if sweep.sweep is None:
        print_plan(plan(cfg, needs), as_json)
    else:
        print_sweep_plan(plan_sweep(cfg, sweep), as_json)


def count_flops(cfg, arch: str = "madapter", store: str = "compact", classes: int = 400) -> dict:
    """FLOPs of the backbone per video-view (with turning its levels into the store's arrays), and of the
    branch per clip: a training step's forward + backward, and validation's forward. `cfg`: a PlanConfig."""
    import warnings

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from mad.adapt.config import TrainConfig, resolve
    from mad.adapt.families import family, store_needs
    from mad.extract.run import ExtractConfig, _frozen, load_tapping_backbone, manifest_for, store_arrays

    entry = family(arch)
    needs = store_needs(entry.stored_as, grid_downsample=cfg.grid_downsample)
    extract = ExtractConfig(videos=".", model=cfg.model, pretrained="none", layers=cfg.layers, frames=cfg.frames,
                            store=store, grid_downsample=cfg.grid_downsample, cell_size=cfg.cell_size,
                            correlation=cfg.correlation, correlation_groups=cfg.correlation_groups,
                            precision="fp32", shard_size=1)

    def counted(fn) -> int:
        # the math attention: the fused kernels' FLOPs go uncounted (and so does nn.MultiheadAttention's fast path)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
                fn()
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        return counter.get_total_flops()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: FLOPs do not depend on them
        backbone = load_tapping_backbone(extract, "cpu", needs)
    manifest = manifest_for(extract, backbone, needs=needs)
    frame = torch.randint(0, 256, (1, 3, manifest.image_size, manifest.image_size), dtype=torch.uint8)
    tapped = {}
    with torch.no_grad():  # frames go through the backbone one by one: one frame's FLOPs x T
        backbone_flops = counted(lambda: tapped.update(zip(backbone.levels, backbone(frame)))) * cfg.frames
        clips = 2  # a batch of two clips (the same frame throughout: values do not change FLOPs)
        tapped = {n: level.repeat(clips * cfg.frames, 1, 1) for n, level in tapped.items()}
        data = {}
        arrays_flops = counted(lambda: data.update(store_arrays(tapped, manifest))) // clips
    frozen = {name: torch.from_numpy(value) for name, value in _frozen(manifest, backbone, needs).items()}
    _, branch = resolve(TrainConfig(arch=arch, device="cpu"), manifest, classes, "mad plan --sweep", given={"arch"})
    model = entry.build(branch, frozen)
    inputs = entry.inputs({name: torch.from_numpy(value) for name, value in data.items()}, manifest)
    labels = torch.zeros(clips, dtype=torch.long)
    train = counted(lambda: F.cross_entropy(model(inputs), labels).backward()) / clips
    model.eval()
    with torch.no_grad():
        val = counted(lambda: model(inputs)) / clips
    return {"backbone_per_view": backbone_flops + arrays_flops, "train_per_clip": train, "val_per_clip": val,
            "arch": arch, "counted_by": "torch.utils.flop_counter.FlopCounterMode"}


def phase(compute_flops: float, read_bytes: float, sweep: SweepPlanConfig) -> dict:
    """A phase whose reading and computing overlap: it takes the longer of the two."""
    compute = compute_flops / (sweep.device_tflops * 1e12 * sweep.utilisation)
    read = read_bytes / (sweep.disk_gbps * 1e9)
    return {"compute_flops": compute_flops, "read_bytes": read_bytes, "compute_seconds": compute,
            "read_seconds": read, "seconds": max(compute, read), "bound": "read" if read > compute else "compute"}


def plan_sweep(cfg, sweep: SweepPlanConfig, flops: dict | None = None) -> dict:
    """The predicted sweep of `sweep.sweep` configurations on the dataset and store `cfg` (a PlanConfig)
    describes; `flops`: `count_flops`'s answer, counted here when None."""
    from mad.plan import plan

    if sweep.sweep is None:
        raise MadError("mad plan: --sweep K, the configurations of the sweep to plan")
    planned = plan(dataclasses.replace(cfg, probe=0))
    flops = flops or count_flops(cfg, sweep.arch, sweep.store, sweep.classes)
    K, E = sweep.sweep, sweep.epochs
    train = planned["splits"]["train"]
    val = planned["splits"].get("val")
    per_view = train["modes"][sweep.store]["bytes_per_video_view"]
    train_read = train["modes"][sweep.store]["read_bytes_per_epoch"]  # one view per video
    train_flops = train["num_videos"] * flops["train_per_clip"]
    val_read = val["modes"][sweep.store]["read_bytes_every_view"] if val else 0
    val_flops = val["num_videos"] * val["views"] * flops["val_per_clip"] if val else 0

    clips = sum(s["num_videos"] * s["clips_decoded"] for s in planned["splits"].values())
    views = sum(s["num_videos"] * s["views"] for s in planned["splits"].values())
    extraction = {k: v for k, v in phase(views * flops["backbone_per_view"], 0, sweep).items()
                  if not k.startswith("read")}  # it reads videos, not the store
    written = planned["total"][sweep.store]["bytes_on_disk"]
    extraction.update(written_bytes=written, write_seconds=written / (sweep.disk_gbps * 1e9),
                      decode_seconds=clips * sweep.decode_seconds / sweep.cpu_cores, clips_decoded=clips)
    extraction["seconds"] = max(extraction["compute_seconds"], extraction["write_seconds"],
                                extraction["decode_seconds"])
    extraction["bound"] = max(("compute", extraction["compute_seconds"]), ("write", extraction["write_seconds"]),
                              ("decode", extraction["decode_seconds"]), key=lambda kv: kv[1])[0]

    # lockstep: per epoch one read of the train split, K steps on each batch; val from RAM, read once
    epoch = phase(K * train_flops, train_read, sweep)
    lockstep = _sweep(epoch, phase(K * val_flops, 0, sweep), phase(0, val_read, sweep), E)
    # one by one: each run reads the train split every epoch and the val split once
    alone = phase(train_flops, train_read, sweep)
    one = _sweep(alone, phase(val_flops, 0, sweep), phase(0, val_read, sweep), E)
    one_by_one = {**{k: K * v for k, v in one.items() if k != "bound" and k != "epoch"}, "bound": one["bound"],
                  "epoch": alone}
    result = {
        "prediction": "predicted from counted FLOPs and the rates below, not measured",
        "command": planned["command"], "date": planned["date"],
        "config": {**planned["config"], **dataclasses.asdict(sweep)},
        "flops": flops, "bytes_per_video_view": per_view,
        "extraction": extraction, "lockstep": lockstep, "one_by_one": one_by_one,
        "total_seconds": {"lockstep": extraction["seconds"] + lockstep["seconds"],
                          "one_by_one": extraction["seconds"] + one_by_one["seconds"]},
    }
    result["one_by_one_over_lockstep"] = result["total_seconds"]["one_by_one"] / result["total_seconds"]["lockstep"]
    return result


def _sweep(epoch: dict, validate: dict, val_read: dict, epochs: int) -> dict:
    seconds = val_read["seconds"] + epochs * (epoch["seconds"] + validate["seconds"])
    return {"read_bytes": val_read["read_bytes"] + epochs * epoch["read_bytes"],
            "compute_flops": epochs * (epoch["compute_flops"] + validate["compute_flops"]),
            "seconds": seconds, "bound": epoch["bound"], "epoch": epoch}


def print_sweep_plan(result: dict, as_json: bool = False) -> None:
    import json

    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    from mad.plan import _duration, _size
    from mad.progress import make_console
    from mad.tables import print_table

    c, f = result["config"], result["flops"]
    table = Table(title=f"mad plan --sweep {c['sweep']} --epochs {c['epochs']}: {c['model']} layers {c['layers']}, "
                        f"T={c['frames']}, {c['arch']}, {c['store']} store (predicted)")
    for column in ("phase", "read", "compute", "reading", "computing", "time", "bound"):
        table.add_column(column, justify="left" if column in ("phase", "bound") else "right")
    for name, label in (("extraction", "extraction"), ("lockstep", "sweep, lockstep"),
                        ("one_by_one", "sweep, one by one")):
        row = result[name]
        reading = row["write_seconds"] if name == "extraction" else row["read_bytes"] / (c["disk_gbps"] * 1e9)
        computing = row["compute_seconds"] if name == "extraction" else row["compute_flops"] / (
            c["device_tflops"] * 1e12 * c["utilisation"])
        moved = _size(row["written_bytes"]) + " written" if name == "extraction" else _size(row["read_bytes"])
        table.add_row(label, moved, f"{row['compute_flops'] / 1e15:,.1f} PFLOP", _duration(reading),
                      _duration(computing), _duration(row["seconds"]), row["bound"])
    total = result["total_seconds"]
    table.add_row("total, lockstep", "", "", "", "", _duration(total["lockstep"]), "")
    table.add_row("total, one by one", "", "", "", "", _duration(total["one_by_one"]), "")
    console = make_console()
    print_table(table, console)
    console.print(f"counted: {f['train_per_clip'] / 1e9:.2f} GFLOP per clip per training step (forward + backward), "
                  f"{f['val_per_clip'] / 1e9:.2f} validating, backbone {f['backbone_per_view'] / 1e9:.1f} GFLOP per "
                  f"video-view; {_size(result['bytes_per_video_view'])} per video-view. Rates: "
                  f"{c['device_tflops']:g} TFLOP/s x {c['utilisation']:g} utilisation, disk {c['disk_gbps']:g} GB/s, "
                  f"decoding {c['cpu_cores']} cores x {c['decode_seconds']:g} s per clip "
                  f"(extraction {_duration(result['extraction']['decode_seconds'])} of it). "
                  f"One by one / lockstep: {result['one_by_one_over_lockstep']:.1f}x. Predictions, not measurements.")
