"""`mad plan`: before any work, what extracting a dataset's splits will cost: bytes per storage mode, time, reads.

From the model's config alone (no weights are loaded; the probe runs the architecture
with random weights, whose speed does not depend on weight values):
    bytes on disk     per video-view and in all, per storage mode (full: every token as
                      float16; compact: one record, `mad.cache.compact`), with Zarr's
                      per-chunk overhead (crc32c 4 B, shard index 16 B) and the small arrays
    extraction time   a short probe on this device of what `mad extract` does per video
                      (`probe_seconds`), combined as its pipeline overlaps them
                      (`seconds_per_video`); --probe 0: no probe, no model, no time
    reads             what training reads of the store per epoch (one view per video), and
                      an evaluation of every view
Splits: the videos of --videos or --num-videos (train), and --val-videos (val), each with its
own views; the total of both.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import ClassVar

import numpy as np
import torch

from mad.cache import compact
from mad.cache.inputs import resolve_cell_size
from mad.cache.manifest import StoreNeed
from mad.errors import MadError
from mad.extract.run import ExtractConfig
from mad.options import at_least, check_ranges, nest
from mad.runtime import resolve_device

CHUNK_OVERHEAD = 4 + 16  # crc32c per chunk + its entry in the shard index
VIDEO_OVERHEAD = 64      # label, path, frame_index, num_frames, status (zstd-compressed) per video, about
MODES = ("full", "compact")


@dataclass
class PlanConfig:
    """What to plan: the extraction (`extract`, every `mad extract` option: replacing `extract` by `plan` in a
    command line plans it; its folder of --videos, when given, is the train split, counted and probed) and the
    splits' sizes. PlanConfig(model=..., frames=...) sets them in `extract`, and cfg.frames reads them."""

    extract: ExtractConfig = field(default_factory=lambda: ExtractConfig(videos=""))
    num_videos: int | None = None   # the train split's videos, without --videos
    val_videos: int | None = None   # videos of a val split, planned with the train split
    val_views: int | None = None    # views per val video (default: as train), e.g. 9 for 3 clips x 3 crops
    views: int | None = None        # clips x crops, given directly (e.g. 9 for 3 clips x 3 crops)
    probe: int = 4                  # videos to decode, and model batches to time; 0: no probe (bytes only)

    RANGES: ClassVar[dict] = {"num_videos": at_least(1), "views": at_least(1), "probe": at_least(0),
                              "val_videos": at_least(1), "val_views": at_least(1)}

    def __post_init__(self):
        self.check()

    def check(self) -> "PlanConfig":
        """Refuse, in one line naming the option, a setting `mad extract` would refuse (`extract` checked its
        own when it was made): before any probe."""
        check_ranges(self, self.RANGES)
        return self


nest(PlanConfig, "extract", tuple(f.name for f in fields(ExtractConfig)), default=lambda: ExtractConfig(videos=""),
     read=lambda values: ExtractConfig(**values))


def model_shapes(model: str, layers: str) -> dict:
    """tokens, width, depth, image size and the 1-based layers of an open_clip model, from its config only."""
    from mad._compat import import_open_clip
    from mad.extract.backbone import parse_layers, register_model_config

    name = register_model_config(model)
    vision = import_open_clip().get_model_config(name)["vision_cfg"]
    size = vision["image_size"] if isinstance(vision["image_size"], int) else vision["image_size"][0]
    patch = vision["patch_size"] if isinstance(vision["patch_size"], int) else vision["patch_size"][0]
    return {"side": size // patch, "width": vision["width"], "depth": vision["layers"], "image_size": size,
            "layers": parse_layers(layers, vision["layers"])}


def levels_beyond(needs: dict[str, StoreNeed], depth: int) -> list[int]:
    """The levels extraction stores as float16 tokens for --branches beyond --layers (every store mode)."""
    return sorted({n for need in needs.values() for n in need.record(depth, 0, 0.0).get("levels", ())})


def bytes_per_view(cfg: PlanConfig, shapes: dict, needs: dict[str, StoreNeed] | None = None) -> dict:
    """Bytes one (video, view) takes in each storage mode, and the compact mode's record layout settings.
    `needs`: what --branches stores beyond --layers (float16 levels, in both modes)."""
    side = shapes["side"] // cfg.grid_downsample
    tokens, width, K, T = 1 + side * side, shapes["width"], len(shapes["layers"]), cfg.frames
    level = T * tokens * width * 2 + CHUNK_OVERHEAD
    beyond = levels_beyond(needs or {}, shapes["depth"])
    full = len(set(shapes["layers"]) | set(beyond)) * level
    cell = resolve_cell_size(cfg.cell_size, tokens)
    groups = cfg.correlation_groups
    layout = compact.record_layout(K, T, 1 + (-(-side // cell)) ** 2, side * side, width,
                                   groups * (2 * cfg.correlation + 1) ** 2 if cfg.correlation else 0)
    return {"full": full, "compact": compact.record_bytes(layout) + CHUNK_OVERHEAD + len(beyond) * level,
            "tokens": tokens, "cell_size": cell}


def clips_of(views: int) -> int:
    """Clips decoded per video for `views` views given directly: 3 crops per clip when 3 divides them (the
    usual 3 x 3 and 1 x 3 test views), else a clip per view. Crops of a clip share its decoded frames."""
    return views // 3 if views % 3 == 0 else views


def _decode_workers(cfg: PlanConfig, device: torch.device) -> int:
    """As `mad extract` picks them."""
    return cfg.workers if cfg.workers >= 0 else (1 if device.type == "cpu" else min(8, os.cpu_count() or 1))


def probe_seconds(cfg: PlanConfig, shapes: dict, paths: list[str], needs: dict[str, StoreNeed] | None = None) -> dict:
    """What `mad extract` spends, timed here: decoding one clip (median over the probed files; None without
    --videos), and per video-view the model, turning its levels into each mode's arrays (compact: the
    branch inputs and their 8-bit records; full: float16 tokens), and writing them into a store."""
    from mad.cache.store import Store, VideoResult
    from mad.extract.decode import DecodeError, decode_clip
    from mad.extract.run import load_tapping_backbone, manifest_for, store_arrays

    device = resolve_device(cfg.device)
    decode = []
    for path in paths[: cfg.probe]:
        started = time.perf_counter()
        try:
            decode_clip(path, cfg.frames, 1, 1, shapes["image_size"])
        except DecodeError:
            continue
        decode.append(time.perf_counter() - started)
    random = dataclasses.replace(cfg.extract, pretrained="none")  # speed does not depend on the weights' values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        backbone = load_tapping_backbone(random, device, needs or {})
    n, S = cfg.batch_size, shapes["image_size"]  # one view per video: every cost below is per view
    manifests = {mode: manifest_for(dataclasses.replace(random, videos=".", store=mode, shard_size=n), backbone,
                                    needs=needs) for mode in MODES}
    frames = torch.randint(0, 256, (n * cfg.frames, 3, S, S), dtype=torch.uint8, device=device)
    model, arrays, data = [], {mode: [] for mode in MODES}, {}
    for step in range(cfg.probe // 2 + 2):  # the first pass warms up
        started = time.perf_counter()
        with torch.no_grad():
            tapped = dict(zip(backbone.levels, backbone(frames)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            model.append((time.perf_counter() - started) / n)
        for mode in MODES:
            started = time.perf_counter()
            data[mode] = store_arrays(tapped, manifests[mode])  # on the CPU: synchronised
            if step:
                arrays[mode].append((time.perf_counter() - started) / n)
    write = {mode: _write_seconds(manifests[mode], data[mode], Store, VideoResult) for mode in MODES}
    return {"device": str(device), "threads": torch.get_num_threads(), "workers": _decode_workers(cfg, device),
            "decode_per_clip": statistics.median(decode) if decode else None, "decoded_files": len(decode),
            "model_per_view": statistics.median(model),
            "arrays_per_view": {mode: statistics.median(arrays[mode]) for mode in MODES},
            "write_per_view": write}


def _write_seconds(manifest, data: dict, Store, VideoResult, blocks: int = 2) -> float:
    """Seconds per video-view to write `data` (one view per video) as a store's shard blocks: the median of
    `blocks` blocks, in a store under the temporary folder."""
    n = next(iter(data.values())).shape[0]
    with tempfile.TemporaryDirectory(prefix="mad-plan-") as folder:
        store = Store.create(os.path.join(folder, "probe"), manifest, [f"{i}.mp4" for i in range(blocks * n)],
                             [-1] * (blocks * n))
        seconds = []
        for block in range(blocks):
            results = [VideoResult(video=block * n + i, path=f"{block * n + i}.mp4", num_frames=manifest.frames,
                                   data={name: values[i:i + 1] for name, values in data.items()},
                                   frame_index=np.zeros((1, manifest.frames), np.int32)) for i in range(n)]
            started = time.perf_counter()
            store.write_block(block, results)
            seconds.append((time.perf_counter() - started) / n)
    return statistics.median(seconds)


def seconds_per_video(probe: dict, mode: str, clips: int, views: int) -> float:
    """Seconds per video of a long `mad extract` (after its start-up), from the probe's timings.

    Decoding runs in worker processes beside the main process (model, arrays) and its writer
    thread. On a CPU they share the cores: the model's threads use every core, so the decoding
    adds its share (decode / cores) to the main process's work, unless the workers themselves
    are slower (decode / workers). On a GPU the device runs the model, and the slowest of
    decoding, model + arrays, and writing sets the pace.
    """
    decode = (probe["decode_per_clip"] or 0.0) * clips
    arrays, write = views * probe["arrays_per_view"][mode], views * probe["write_per_view"][mode]
    main = views * probe["model_per_view"] + arrays
    workers = probe["workers"]
    if probe["device"] == "cpu":
        if workers == 0:  # decoded in the main process
            return decode + main + write
        return max(decode / workers, decode / max(probe["threads"], 1) + main + write)
    return max(decode / max(workers, 1), main, write)


def _splits(cfg: PlanConfig, num_videos: int) -> dict:
    """split -> (videos, views, clips decoded per video). Train views decode T frames each (their own jitter)."""
    views = cfg.views or cfg.clips * cfg.crops
    splits = {"train": (num_videos, views, clips_of(views) if cfg.views else cfg.clips)}
    if cfg.train_views:  # the val split keeps the deterministic views
        splits["train"] = (num_videos, cfg.train_views, cfg.train_views)
    if cfg.val_videos is not None:
        val_views = cfg.val_views or views
        splits["val"] = (cfg.val_videos, val_views, clips_of(val_views) if cfg.val_views else splits["train"][2])
    return splits


def plan(cfg: PlanConfig, needs: dict[str, StoreNeed] | None = None) -> dict:
    """The plan of `cfg`'s extraction; `needs`: what its --branches store beyond --layers (as `extract` takes
    them from the registry, `mad.adapt.families.store_needs`)."""
    videos = cfg.videos or None  # an ExtractConfig without a folder holds ""
    if videos is None and cfg.num_videos is None:
        raise MadError("mad plan needs --videos DIR or --num-videos N")
    if cfg.val_views is not None and cfg.val_videos is None:
        raise MadError("mad plan: --val-views needs --val-videos N (the val split's videos)")
    shapes = model_shapes(cfg.model, cfg.layers)
    paths, source_bytes = [], None
    if videos is not None:
        from mad.extract.videos import find_videos

        found = find_videos(videos)
        paths = [os.path.join(videos, p) for p in found.paths]
        source_bytes = sum(os.path.getsize(p) for p in paths)
    num_videos = cfg.num_videos if cfg.num_videos is not None else len(paths)
    per_view = bytes_per_view(cfg, shapes, needs)
    probe = None
    if cfg.probe > 0:
        probe = probe_seconds(cfg, shapes, paths[:: max(1, len(paths) // cfg.probe)] if paths else [], needs)
    splits, total = {}, {mode: {"bytes_on_disk": 0, "extraction_seconds": 0.0 if probe else None} for mode in MODES}
    for split, (videos, views, clips) in _splits(cfg, num_videos).items():
        modes = {}
        for mode in MODES:
            seconds = videos * seconds_per_video(probe, mode, clips, views) if probe else None
            modes[mode] = {"bytes_per_video_view": per_view[mode],
                           "bytes_on_disk": videos * (views * per_view[mode] + VIDEO_OVERHEAD),
                           "read_bytes_per_epoch": videos * per_view[mode],  # one view per video
                           "read_bytes_every_view": videos * views * per_view[mode],
                           "extraction_seconds": seconds}
            total[mode]["bytes_on_disk"] += modes[mode]["bytes_on_disk"]
            if probe:
                total[mode]["extraction_seconds"] += seconds
        splits[split] = {"num_videos": videos, "views": views, "clips_decoded": clips, "modes": modes}
    return {"command": shlex.join(["mad", *sys.argv[1:]]), "date": datetime.date.today().isoformat(),
            "config": {**asdict(cfg.extract), **{k: v for k, v in asdict(cfg).items() if k != "extract"},
                       "branches": ",".join(needs or {})}, "tokens": per_view["tokens"], "compact_cell_size": per_view["cell_size"],
            "source_bytes": source_bytes, "probe": probe, "splits": splits, "total": total}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


def print_plan(result: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    from mad.progress import make_console
    from mad.tables import print_table

    c, p = result["config"], result["probe"]
    table = Table(title=f"mad plan: {c['model']} layers {c['layers']}, T={c['frames']}, {result['tokens']} tokens"
                        + (f", {p['device']}" if p else ""))
    for column in ("split", "storage", "videos x views", "per video-view", "on disk", "read per epoch",
                   "read every view", "extraction"):
        table.add_column(column, justify="left" if column in ("split", "storage") else "right")
    for split, s in result["splits"].items():
        for mode, row in s["modes"].items():
            table.add_row(split, mode, f"{s['num_videos']:,} x {s['views']}", _size(row["bytes_per_video_view"]),
                          _size(row["bytes_on_disk"]), _size(row["read_bytes_per_epoch"]),
                          _size(row["read_bytes_every_view"]), _duration(row["extraction_seconds"]))
    if len(result["splits"]) > 1:
        for mode, row in result["total"].items():
            table.add_row("total", mode, "", "", _size(row["bytes_on_disk"]), "", "",
                          _duration(row["extraction_seconds"]))
    console = make_console()
    print_table(table, console)
    compact_note = (f"compact: cells of {result['compact_cell_size']}x{result['compact_cell_size']} patches, "
                    f"correlation radius {c['correlation']}")
    if p is None:
        console.print(f"extraction time not probed (--probe 0: no model run); {compact_note}")
    else:
        decode = (f"decode {p['decode_per_clip']:.2f} s per clip ({p['workers']} worker(s))"
                  if p["decode_per_clip"] is not None else "decode not probed (no --videos)")
        console.print(f"probe on this machine: {decode}; per video-view model {p['model_per_view']:.3f} s, "
                      f"arrays full {p['arrays_per_view']['full']:.3f} s / compact "
                      f"{p['arrays_per_view']['compact']:.3f} s, writing full {p['write_per_view']['full']:.3f} s / "
                      f"compact {p['write_per_view']['compact']:.3f} s; {compact_note}")
    if result["source_bytes"]:
        console.print(f"the videos themselves: {_size(result['source_bytes'])}")
