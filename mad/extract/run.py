"""The extraction loop: decoding workers -> frozen model -> writer thread -> store.

Worker processes (spawn) decode and resize; the main process batches videos
through the model; a writer thread collects each shard block's videos in memory
and writes the block once it is complete (one write per shard file instead of one
rewrite per video), status last. A killed run loses at most the blocks that were
in flight; re-running resumes from the store's status.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from mad.cache import compact
from mad.cache.inputs import branch_inputs, resolve_cell_size
from mad.cache.locks import StoreLocks
from mad.cache.manifest import IDENTITY_KEYS, STORAGE, Manifest, StoreNeed
from mad.cache.store import FAILED, PENDING, IncompleteStoreError, Store, StoreError, VideoResult, is_url
from mad.errors import MadError
from mad.extract.annotations import FORMATS
from mad.options import SEED, at_least, check_cell_size, check_choices, check_device, check_layers, check_ranges
from mad.extract.backbone import load_backbone, model_config_of
from mad.extract.videos import check_labels_kept, find_videos
from mad.extract.views import ViewSettings, view_settings
from mad.extract.workers import VideoDecodeDataset, decoded_videos
from mad.extract.writer import BlockWriter
from mad.progress import VideoProgress, make_console
from mad.runtime import resolve_device, versions


class ExtractError(MadError):
    """The extraction cannot start (bad options, incompatible store, ...)."""


@dataclass
class ExtractConfig:
    videos: str
    out: str = "cache"
    layers: str = "4,8,12"
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    frames: int = 8
    clips: int = 1
    crops: int = 1
    labels: str | None = None
    labels_format: str = "auto"  # mmaction, csv, kinetics, ssv2, ucf101, hmdb51; auto: detected from --labels
    labels_split: str | None = None  # train1..3 / test1..3 when --labels is a folder of split files
    grid_downsample: int = 1     # average the patch grid in n x n cells before writing
    store: str = "compact"       # compact: what the branch reads, 8-bit (1/6 of full); full: every token, float16
    cell_size: str = "auto"      # compact: the branch's cells (auto: no fewer than 7 per side)
    correlation: int = 1         # compact: radius of the stored patch matches (0: none)
    correlation_groups: int = 4  # compact: channel groups matched separately
    batch_size: int = 4          # videos per forward pass
    workers: int = -1            # decoding processes; -1: automatic, 0: decode in this process
    device: str = "auto"
    precision: str = "bf16"
    shard_size: int = 32         # videos per shard file (and per block of the small arrays)
    retry_failed: bool = False
    overwrite: bool = False
    shard: str | None = None     # "I/N": only slice I of N (whole shard blocks); torchrun sets it itself
    limit: int | None = None     # process at most this many pending videos
    progress: bool = True
    train_views: int | None = None  # K augmented views per video in place of --clips x --crops (a training store)
    crop_scale: str = "0.08,1"      # train views: crop area, fractions of the frame (MMAction2's RandomResizedCrop)
    crop_ratio: str = "3/4,4/3"     # train views: crop width / height
    flip: str = "yes"               # train views: random horizontal flips; no: labels that name a direction
    view_seed: int = 0              # train views: with each video's path, seeds its views

    # What each number and each named choice may be (the model's depth bounds --layers)
    RANGES: ClassVar[dict] = {"frames": at_least(1), "clips": at_least(1), "batch_size": at_least(1),
                              "shard_size": at_least(1), "grid_downsample": at_least(1),
                              "correlation": at_least(0, "0: none"), "correlation_groups": at_least(1),
                              "workers": at_least(-1, "-1: automatic, 0: this process"),
                              "limit": at_least(0), "train_views": at_least(1), "view_seed": SEED}
    CHOICES: ClassVar[dict] = {"crops": (1, 3), "store": STORAGE, "flip": ("yes", "no"), "precision": ("bf16", "fp16", "fp32"),
                               "labels_format": FORMATS,
                               "labels_split": tuple(f"{k}{n}" for k in ("train", "test") for n in (1, 2, 3))}

    def __post_init__(self):
        self.check()

    def check(self) -> "ExtractConfig":
        """Refuse, in one line naming the option, a setting that cannot be served: before any video is read."""
        check_ranges(self, self.RANGES)
        check_choices(self, self.CHOICES)
        check_cell_size(self.cell_size)
        check_layers(self.layers)
        check_device(self.device)
        _slice(self)
        view_settings(1, self.crop_scale, self.crop_ratio, self.flip, self.view_seed, 224)  # refused even unused
        if self.train_views is not None:
            if self.clips != 1 or self.crops != 1:
                raise ExtractError(f"--train-views {self.train_views} replaces the --clips x --crops views: "
                                   "leave those at 1 (extract the validation set without --train-views)")
        return self

    def views(self, image_size: int) -> ViewSettings | None:
        """The train views' settings for a model of `image_size`; None without --train-views."""
        if self.train_views is None:
            return None
        return view_settings(self.train_views, self.crop_scale, self.crop_ratio, self.flip, self.view_seed,
                             image_size)


# ---- the run ------------------------------------------------------------------------


def _needs(needs: dict[str, StoreNeed] | None) -> dict[str, StoreNeed]:
    return {} if needs is None else needs  # None: nothing beyond --layers


def _records(needs: dict[str, StoreNeed], depth: int, heads: int = 0, ln_eps: float = 0.0) -> dict:
    """The manifest's `branches`: what is stored for each --branches name beyond --layers."""
    try:
        return {name: need.record(depth, heads, ln_eps) for name, need in needs.items()}
    except MadError as e:
        raise ExtractError(str(e)) from None


def manifest_for(cfg: ExtractConfig, backbone, class_names: list[str] = (), labelled_by: str = "none",
                 needs: dict[str, StoreNeed] | None = None) -> Manifest:
    """The manifest of a store that `cfg` extracts with `backbone`, storing `needs` beyond --layers."""
    info = backbone.info
    views = cfg.views(info.image_size)
    return Manifest(
        model=cfg.model, model_config=model_config_of(cfg.model),
        pretrained="none" if cfg.pretrained in (None, "", "none") else (
            os.path.basename(cfg.pretrained) if info.pretrained_sha256 else cfg.pretrained),
        pretrained_sha256=info.pretrained_sha256, layers=backbone.layers, depth=info.depth,
        frames=cfg.frames, clips=cfg.clips, crops=cfg.crops, image_size=info.image_size,
        patch_size=info.patch_size, grid=list(info.grid), grid_downsample=cfg.grid_downsample,
        tokens=backbone.tokens, width=info.width, mean=list(info.mean), std=list(info.std),
        precision=cfg.precision, sampling="tsn-random" if views else "tsn-middle", class_names=list(class_names),
        labelled_by=labelled_by, videos_root=str(Path(cfg.videos).resolve()),
        shard_size=cfg.shard_size, versions=versions(), storage=cfg.store,
        compact=_compact_settings(cfg, backbone) if cfg.store == "compact" else None,
        branches=_records(_needs(needs), info.depth, info.heads, info.ln_eps),
        train_views=views.views if views else 0, augment=views.record() if views else None,
    )


def _frozen(manifest: Manifest, backbone, needs: dict[str, StoreNeed]) -> dict[str, np.ndarray]:
    """The frozen weights the store carries for its branch families (a q/k recomputation's), by name."""
    return {f"{need.frozen}{name}": value.numpy() for key, need in needs.items() if need.frozen
            for name, value in backbone.frozen_qk(manifest.branches[key]["blocks"]).items()}


def _compact_settings(cfg: ExtractConfig, backbone) -> dict:
    """What a compact store fixes: the branch's cells, the correlation's radius and groups, the record layout."""
    tokens, width = backbone.tokens, backbone.info.width
    try:
        cell = resolve_cell_size(cfg.cell_size, tokens)
    except ValueError as e:
        raise ExtractError(f"--cell-size: {e}") from None
    side = int(round((tokens - 1) ** 0.5))
    if (cell > 1 or cfg.correlation) and side * side != tokens - 1:
        raise ExtractError(f"--store compact: the {tokens - 1}-patch grid is not square; pass --cell-size 1 and "
                           "--correlation 0")
    if cfg.correlation and width % cfg.correlation_groups:
        raise ExtractError(f"--correlation-groups {cfg.correlation_groups} does not divide the width {width}")
    cells = 1 + (-(-side // cell)) ** 2
    match_features = cfg.correlation_groups * (2 * cfg.correlation + 1) ** 2 if cfg.correlation else 0
    layout = compact.record_layout(len(backbone.layers), cfg.frames, cells, tokens - 1, width, match_features)
    return {"cell_size": cell, "correlation": cfg.correlation, "correlation_groups": cfg.correlation_groups,
            "values": compact.VALUES, "record_bytes": compact.record_bytes(layout), "layout": layout}


def _slice(cfg: ExtractConfig) -> tuple[int, int]:
    """(index, count) of this process's slice: --shard I/N, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if cfg.shard is not None:
        try:
            index, count = (int(x) for x in cfg.shard.split("/"))
        except ValueError:
            raise ExtractError(f"--shard {cfg.shard!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= index < count:
            raise ExtractError(f"--shard {cfg.shard!r}: I must be in 0..N-1")
        return index, count
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _open_or_create(cfg: ExtractConfig, manifest: Manifest, video_list, frozen: dict) -> Store:
    out = cfg.out
    try:
        Store.open(out) if Store.exists(out) else None
    except IncompleteStoreError:  # killed while creating it: make it again
        Store.remove(out)
        return Store.create(out, manifest, video_list.paths, video_list.labels, frozen)
    except StoreError:
        pass  # reported below, unless --overwrite
    if Store.exists(out) and cfg.overwrite:
        Store.remove(out)
    if not Store.exists(out):
        return Store.create(out, manifest, video_list.paths, video_list.labels, frozen)
    store = Store.open(out, mode="r+")
    differences = store.manifest.differences(manifest, IDENTITY_KEYS)
    if differences:
        said = "; ".join(f"{name}: {ours} in the store, {theirs} given" for name, ours, theirs in differences)
        raise ExtractError(f"{out} was made with different settings ({said}); "
                           "use another --out, or --overwrite to start over")
    # Videos added to the folder since the last run are appended; new classes get new numbers.
    known = store.paths()
    check_labels_kept(video_list, known, store.labels(), store.class_names, out)
    known = set(known)
    new = [(p, label) for p, label in zip(video_list.paths, video_list.labels) if p not in known]
    if new:
        class_names = store.class_names
        for name in video_list.class_names:
            if name not in class_names:
                class_names.append(name)
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[video_list.class_names[label]] if label >= 0 else -1 for _, label in new]
        store.append_videos([p for p, _ in new], labels)
        store.set_class_names(class_names)
    return store


def load_tapping_backbone(cfg: ExtractConfig, device, needs: dict[str, StoreNeed]):
    """The model, tapping --layers and the levels the branch families read beyond them (`mad plan` probes it)."""
    def extra(depth: int) -> list[int]:
        return sorted({n for entry in _records(needs, depth).values() for n in entry.get("levels", ())})

    return load_backbone(cfg.model, cfg.pretrained, cfg.layers, device, cfg.precision, cfg.grid_downsample,
                         extra_levels=extra)


def extract(cfg: ExtractConfig, needs: dict[str, StoreNeed] | None = None) -> dict:
    """Extract (or resume extracting) every video under cfg.videos into cfg.out. `needs`: what to store
    beyond --layers per --branches name (the command layer asks the registry: `mad.adapt.families`);
    None: --layers only, as stores were before --branches."""
    cfg.check()
    needs = _needs(needs)
    for name, need in needs.items():
        if need.full_grid and cfg.grid_downsample > 1:
            raise ExtractError(f"--branches {name} reads every patch token: extract it with --grid-downsample 1")
    index, count = _slice(cfg)
    if count > 1 and cfg.overwrite:
        raise ExtractError("--overwrite cannot be combined with a sharded run: start over with one process first")
    out = Path(cfg.out)
    if not is_url(cfg.out) and out.exists() and not Store.exists(cfg.out) and \
            (not out.is_dir() or any(not p.name.startswith(".mad-") for p in out.iterdir())):
        raise ExtractError(f"{cfg.out}: exists and is not a mad cache; choose another --out")
    video_list = find_videos(cfg.videos, cfg.labels, cfg.labels_format, cfg.labels_split)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:  # torchrun: a GPU each
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    backbone = load_tapping_backbone(cfg, device, needs)
    manifest = manifest_for(cfg, backbone, video_list.class_names, video_list.labelled_by, needs)
    locks = StoreLocks(cfg.out, index, count)
    try:
        with locks.creating():
            store = _open_or_create(cfg, manifest, video_list, _frozen(manifest, backbone, needs))
        return _extract_slice(cfg, store, backbone, device, index, count)
    finally:
        locks.release()


def _extract_slice(cfg: ExtractConfig, store: Store, backbone, device: torch.device, index: int, count: int
                   ) -> dict:
    """Extract the pending videos of slice `index` of `count`: whole shard blocks, so one writer each."""
    status = store.status()
    wanted = (status == PENDING) | ((status == FAILED) if cfg.retry_failed else False)
    blocks = -(-store.num_videos // store.shard_size)
    first, last = index * blocks // count, (index + 1) * blocks // count  # this slice's blocks
    block_of = np.arange(store.num_videos) // store.shard_size
    wanted &= (block_of >= first) & (block_of < last)
    scheduled = np.flatnonzero(wanted).tolist()
    if cfg.limit is not None:
        scheduled = scheduled[: cfg.limit]
    paths = store.paths()
    workers = cfg.workers if cfg.workers >= 0 else (1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    dataset = VideoDecodeDataset(cfg.videos, [paths[v] for v in scheduled], scheduled, cfg.frames, cfg.clips,
                                 cfg.crops, backbone.info.image_size, cfg.views(backbone.info.image_size))
    summary = {"videos": store.num_videos, "scheduled": len(scheduled), "done_now": 0, "failed_now": 0,
               "errors": store.errors_location, "out": cfg.out}
    started = time.perf_counter()
    writer = BlockWriter(store, scheduled)
    progress = VideoProgress(len(scheduled), cfg.progress, f"extract [{index}/{count}]" if count > 1 else "extract")
    try:
        batch: list[tuple[VideoResult, torch.Tensor]] = []
        for result, frames in decoded_videos(dataset, workers):
            if result.error is not None:
                writer.put(result)
                summary["failed_now"] += 1
                progress.advance(failed=True)
                continue
            batch.append((result, frames))
            if len(batch) == cfg.batch_size:
                summary["done_now"] += _run_batch(backbone, batch, writer, device)
                progress.advance(len(batch))
                batch = []
                if "first_batch_seconds" not in summary:  # start-up: spawning readers, first decodes, warm-up
                    summary["first_batch_seconds"] = time.perf_counter() - started
                    summary["first_batch_clips"] = summary["done_now"]
        if batch:
            summary["done_now"] += _run_batch(backbone, batch, writer, device)
            progress.advance(len(batch))
    finally:
        progress.stop()
        writer.close()  # also on Ctrl-C: whatever finished is written
    seconds = time.perf_counter() - started
    counts = store.counts()
    summary.update(seconds=seconds, clips_per_s=summary["done_now"] / seconds if seconds else 0.0,
                   done_total=counts["done"], failed_total=counts["failed"], pending_total=counts["pending"])
    if cfg.progress:
        _print_summary(summary)
    return summary


@torch.no_grad()
def _run_batch(backbone, batch: list[tuple[VideoResult, torch.Tensor]], writer: BlockWriter,
               device: torch.device) -> int:
    """Frames of a few videos through the model in one pass; hand each video's tokens to the writer."""
    frames = torch.cat([frames.flatten(0, 1) for _, frames in batch]).to(device, non_blocking=True)
    tapped = dict(zip(backbone.levels, backbone(frames)))  # level -> [sum(views * T), N, D]
    data = store_arrays(tapped, writer.store.manifest)
    offset = 0
    for result, frames in batch:
        views = frames.shape[0]
        result.data = {name: values[offset:offset + views] for name, values in data.items()}
        offset += views
        writer.put(result)
    return len(batch)


def store_arrays(tapped: dict[int, torch.Tensor], m: Manifest) -> dict[str, np.ndarray]:
    """What the store holds of a batch, from its tapped levels (level -> [views * T, N, D]): data array ->
    [views, ...] on the CPU. (`mad plan` times this too.)"""
    data = {}
    if m.storage == "compact":  # what the branch reads, 8-bit: one record per video-view
        c = m.compact
        views = next(iter(tapped.values())).shape[0] // m.frames
        inputs = branch_inputs([tapped[n].view(views, m.frames, *tapped[n].shape[1:]) for n in m.layers],
                               c["cell_size"], c["correlation"], c["correlation_groups"])
        data["records"] = compact.encode(inputs, c["layout"]).cpu().numpy()  # [views, R]
    for n in m.stored_levels:  # every token, float16
        level = tapped[n].to(torch.float16).cpu().numpy()
        data[f"layers/{n}"] = level.reshape(-1, m.frames, *level.shape[1:])  # [views, T, N, D]
    return data


def _print_summary(summary: dict) -> None:
    console = make_console(stderr=True, highlight=True)
    line = (f"{summary['done_now']} extracted, {summary['failed_now']} failed in {summary['seconds']:.1f} s "
            f"({summary['clips_per_s']:.2f} videos/s); store {summary['out']}: {summary['done_total']} done, "
            f"{summary['failed_total']} failed, {summary['pending_total']} pending of {summary['videos']}")
    console.print(line)
    if summary["failed_total"]:
        console.print(f"failures and reasons: {summary['errors']}")

