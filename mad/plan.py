"""`mad plan`: before any work, what an extraction will cost: bytes per storage mode, time, read volume.

From the model's config alone (no weights are loaded; the probe runs the architecture
with random weights, whose speed does not depend on weight values):
    bytes on disk     per video-view and in all, per storage mode (full: every token as
                      float16; compact: one record, `mad.cache.compact`), with Zarr's
                      per-chunk overhead (crc32c 4 B, shard index 16 B) and the small arrays
    extraction time   a short probe on this device: the model on a batch of frames, plus
                      decoding a few of the videos (with --videos); CPU: decode and model
                      share the cores, so their times add; GPU: the slower of the two
    read per epoch    what training reads from the store each epoch (one view per video)
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from mad.cache import compact
from mad.cache.inputs import branch_inputs, resolve_cell_size
from mad.errors import MadError
from mad.options import at_least, check_cell_size, check_choices, check_device, check_layers, check_ranges
from mad.runtime import resolve_device

CHUNK_OVERHEAD = 4 + 16  # crc32c per chunk + its entry in the shard index
VIDEO_OVERHEAD = 64      # label, path, frame_index, num_frames, status (zstd-compressed) per video, about


@dataclass
class PlanConfig:
    videos: str | None = None       # a folder to count and probe
    num_videos: int | None = None   # or a count
    model: str = "ViT-B-16"
    layers: str = "4,8,12"
    frames: int = 8
    clips: int = 1
    crops: int = 1
    views: int | None = None        # clips x crops, given directly (e.g. 9 for 3 clips x 3 crops)
    grid_downsample: int = 1
    cell_size: str = "auto"
    correlation: int = 1
    correlation_groups: int = 4
    device: str = "auto"
    precision: str = "bf16"
    batch_size: int = 4
    probe: int = 4                  # videos to decode, and model batches to time

    RANGES: ClassVar[dict] = {"num_videos": at_least(1), "frames": at_least(1), "clips": at_least(1),
                              "views": at_least(1), "grid_downsample": at_least(1),
                              "correlation": at_least(0, "0: none"), "correlation_groups": at_least(1),
                              "batch_size": at_least(1), "probe": at_least(0)}
    CHOICES: ClassVar[dict] = {"crops": (1, 3), "precision": ("bf16", "fp16", "fp32")}

    def __post_init__(self):
        self.check()

    def check(self) -> "PlanConfig":
        """Refuse, in one line naming the option, a setting `mad extract` would refuse: before any probe."""
        check_ranges(self, self.RANGES)
        check_choices(self, self.CHOICES)
        check_cell_size(self.cell_size)
        check_layers(self.layers)
        check_device(self.device)
        return self


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


def bytes_per_view(cfg: PlanConfig, shapes: dict) -> dict:
    """Bytes one (video, view) takes in each storage mode, and the compact mode's record layout settings."""
    side = shapes["side"] // cfg.grid_downsample
    tokens, width, K, T = 1 + side * side, shapes["width"], len(shapes["layers"]), cfg.frames
    full = K * (T * tokens * width * 2 + CHUNK_OVERHEAD)
    cell = resolve_cell_size(cfg.cell_size, tokens)
    groups = cfg.correlation_groups
    layout = compact.record_layout(K, T, 1 + (-(-side // cell)) ** 2, side * side, width,
                                   groups * (2 * cfg.correlation + 1) ** 2 if cfg.correlation else 0)
    return {"full": full, "compact": compact.record_bytes(layout) + CHUNK_OVERHEAD, "tokens": tokens,
            "cell_size": cell}


def probe_seconds(cfg: PlanConfig, shapes: dict, paths: list[str]) -> dict:
    """Seconds per video: decode (median over the probed files, None without --videos), model, compact encoding."""
    from mad.extract.backbone import load_backbone
    from mad.extract.decode import DecodeError, decode_clip

    device = resolve_device(cfg.device)
    views = cfg.views or cfg.clips * cfg.crops
    decode = []
    for path in paths[: cfg.probe]:
        started = time.perf_counter()
        try:
            decode_clip(path, cfg.frames, cfg.clips, cfg.crops, shapes["image_size"])
        except DecodeError:
            continue
        decode.append(time.perf_counter() - started)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights: speed does not depend on them
        backbone = load_backbone(cfg.model, "none", shapes["layers"], device, cfg.precision, cfg.grid_downsample)
    S = shapes["image_size"]
    frames = torch.randint(0, 256, (cfg.batch_size * views * cfg.frames, 3, S, S), dtype=torch.uint8, device=device)
    model, encode = [], []
    for step in range(cfg.probe // 2 + 2):  # the first pass warms up
        started = time.perf_counter()
        levels = backbone(frames)
        if device.type == "cuda":
            torch.cuda.synchronize()
        middle = time.perf_counter()
        n = cfg.batch_size * views
        branch_inputs([x.view(n, cfg.frames, *x.shape[1:]) for x in levels], resolve_cell_size(cfg.cell_size,
                      levels[0].shape[1]), cfg.correlation, cfg.correlation_groups)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step:
            model.append((middle - started) / cfg.batch_size)
            encode.append((time.perf_counter() - middle) / cfg.batch_size)
    return {"device": str(device), "decode": statistics.median(decode) if decode else None,
            "model": statistics.median(model), "compact_inputs": statistics.median(encode), "decoded_files": len(decode)}


def plan(cfg: PlanConfig) -> dict:
    if cfg.videos is None and cfg.num_videos is None:
        raise MadError("mad plan needs --videos DIR or --num-videos N")
    shapes = model_shapes(cfg.model, cfg.layers)
    paths, source_bytes = [], None
    if cfg.videos is not None:
        from mad.extract.videos import find_videos

        found = find_videos(cfg.videos)
        paths = [os.path.join(cfg.videos, p) for p in found.paths]
        source_bytes = sum(os.path.getsize(p) for p in paths)
    num_videos = cfg.num_videos if cfg.num_videos is not None else len(paths)
    views = cfg.views or cfg.clips * cfg.crops
    per_view = bytes_per_view(cfg, shapes)
    seconds = probe_seconds(cfg, shapes, paths[:: max(1, len(paths) // max(cfg.probe, 1))] if paths else [])
    decode = seconds["decode"] or 0.0
    cpu = seconds["device"] == "cpu"
    modes = {}
    for mode in ("full", "compact"):
        model = seconds["model"] + (seconds["compact_inputs"] if mode == "compact" else 0.0)
        per_video = decode + model if cpu else max(decode / min(8, os.cpu_count() or 1), model)
        modes[mode] = {
            "bytes_per_video_view": per_view[mode],
            "bytes_on_disk": num_videos * (views * per_view[mode] + VIDEO_OVERHEAD),
            "read_bytes_per_epoch": num_videos * per_view[mode],
            "extraction_seconds": num_videos * per_video,
        }
    return {"command": shlex.join(["mad", *sys.argv[1:]]), "date": datetime.date.today().isoformat(),
            "config": asdict(cfg), "num_videos": num_videos, "views": views, "tokens": per_view["tokens"],
            "compact_cell_size": per_view["cell_size"], "source_bytes": source_bytes,
            "seconds_per_video": seconds, "decode_probed": seconds["decoded_files"] > 0, "modes": modes}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000


def _duration(seconds: float) -> str:
    hours = seconds / 3600
    return f"{hours / 24:.1f} days" if hours >= 48 else f"{hours:.1f} h" if hours >= 1 else f"{seconds / 60:.1f} min"


def print_plan(result: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    c = result["config"]
    s = result["seconds_per_video"]
    table = Table(title=f"mad plan: {result['num_videos']:,} videos x {result['views']} views, {c['model']} "
                        f"layers {c['layers']}, T={c['frames']}, {result['tokens']} tokens, {s['device']}")
    for column in ("storage", "per video-view", "on disk", "read per epoch", "extraction"):
        table.add_column(column, justify="left" if column == "storage" else "right")
    for mode, row in result["modes"].items():
        table.add_row(mode, _size(row["bytes_per_video_view"]), _size(row["bytes_on_disk"]),
                      _size(row["read_bytes_per_epoch"]), _duration(row["extraction_seconds"]))
    console = Console()
    console.print(table)
    decode = f"decode {s['decode']:.2f} s" if s["decode"] is not None else "decode not probed (no --videos)"
    console.print(f"probe on this machine, per video: {decode}, model {s['model']:.2f} s, compact inputs "
                  f"{s['compact_inputs']:.3f} s; compact cells of {result['compact_cell_size']} patches, "
                  f"correlation radius {c['correlation']}"
                  + (f"; the videos themselves: {_size(result['source_bytes'])}" if result["source_bytes"] else ""))
