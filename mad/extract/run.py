"""The extraction loop: decoding workers -> frozen model -> writer thread -> store.

Worker processes (spawn) decode and resize; the main process batches videos
through the model; a writer thread collects each shard block's videos in memory
and writes the block once it is complete (one write per shard file instead of one
rewrite per video), status last. A killed run loses at most the blocks that were
in flight; re-running resumes from the store's status.
"""

from __future__ import annotations

import dataclasses
import json
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mad.cache.store import (DONE, FAILED, IDENTITY_KEYS, PENDING, IncompleteStoreError, Store, StoreError,
                             manifest_differences)
from mad.extract.backbone import BackboneError, load_backbone, model_config_of, resolve_device
from mad.extract.decode import DecodeError, decode_clip
from mad.extract.videos import VideoListError, find_videos


class ExtractError(Exception):
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
    pool: int = 1
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


# ---- decoding (runs in worker processes) --------------------------------------------


class VideoDecodeDataset(torch.utils.data.Dataset):
    """Item i -> decoded frames of the i-th scheduled video, or the reason it failed."""

    def __init__(self, root: str, paths: list[str], indices: list[int], frames: int, clips: int, crops: int,
                 size: int):
        self.root, self.paths, self.indices = root, paths, indices
        self.frames, self.clips, self.crops, self.size = frames, clips, crops, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        video, path = self.indices[i], self.paths[i]
        item = {"video": video, "path": path, "frames": None, "frame_index": None, "num_frames": 0, "error": None}
        full = os.path.join(self.root, path)
        try:
            if not os.path.isfile(full):
                raise DecodeError("file not found")
            if os.path.getsize(full) == 0:
                raise DecodeError("empty file (0 bytes)")
            clip = decode_clip(full, self.frames, self.clips, self.crops, self.size)
            item.update(frames=torch.from_numpy(clip.frames), frame_index=clip.frame_index,
                        num_frames=clip.num_frames)
        except DecodeError as e:
            item["error"] = str(e)
        except Exception as e:  # a decoder bug on one file must not stop the run
            item["error"] = f"{type(e).__name__}: {e}"
        return item


def _decoded_items(dataset: VideoDecodeDataset, workers: int):
    if workers == 0:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    # spawn, not fork: forked workers can deadlock in Zarr/threads of the parent.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers,
        multiprocessing_context="spawn", prefetch_factor=4, pin_memory=torch.cuda.is_available(),
    )
    yield from loader


# ---- writing (a thread in the main process) -----------------------------------------


class BlockWriter:
    """Collects results per shard block; writes a block when all its scheduled videos are in."""

    def __init__(self, store: Store, scheduled: list[int]):
        self.store = store
        self.S = store.shard_size
        self.expected: dict[int, set[int]] = {}
        for v in scheduled:
            self.expected.setdefault(v // self.S, set()).add(v)
        self.results: dict[int, dict[int, dict]] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mad-writer", daemon=True)
        self.thread.start()

    def put(self, result: dict) -> None:
        if self.error:
            raise self.error
        self.queue.put(result)

    def close(self) -> None:
        """Write every block that has results (complete or not) and stop."""
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error

    def _run(self) -> None:
        try:
            while (result := self.queue.get()) is not None:
                block = result["video"] // self.S
                self.results.setdefault(block, {})[result["video"]] = result
                if len(self.results[block]) == len(self.expected[block]):
                    self._write(block)
            for block in list(self.results):
                self._write(block)
        except BaseException as e:  # surfaced to the main thread on its next put/close
            self.error = e

    def _write(self, block: int) -> None:
        results = self.results.pop(block)
        store, m = self.store, self.store.manifest
        start, stop = block * self.S, min((block + 1) * self.S, store.num_videos)
        status = store.group["status"][start:stop]
        keep = (status == DONE) & ~np.isin(np.arange(start, stop), list(results))
        views, T, N, D = m["clips"] * m["crops"], m["frames"], m["tokens"], m["width"]
        layer_tokens, frame_index = {}, store.group["frame_index"][start:stop]
        num_frames = store.group["num_frames"][start:stop]
        for layer in store.layers:
            # Earlier runs' videos in this block are rewritten with the block, so read them back.
            slab = store.read_layer(layer, slice(start, stop)) if keep.any() else None
            layer_tokens[layer] = slab if slab is not None else np.zeros((stop - start, views, T, N, D), np.float16)
            layer_tokens[layer][~keep] = 0
        errors = []
        for v, r in results.items():
            i = v - start
            num_frames[i] = r["num_frames"]
            if r["error"] is None:
                for layer in store.layers:
                    layer_tokens[layer][i] = r["tokens"][layer]
                frame_index[i], status[i] = r["frame_index"], DONE
            else:
                frame_index[i], status[i] = -1, FAILED
                errors.append({"path": r["path"], "reason": r["error"]})
        store.group["num_frames"][start:stop] = num_frames
        store.write_block(start, layer_tokens, frame_index, status)
        store.log_errors(errors)


# ---- the run ------------------------------------------------------------------------


def _check_config(cfg: ExtractConfig) -> None:
    for name in ("frames", "clips", "batch_size", "shard_size", "pool"):
        if getattr(cfg, name) < 1:
            raise ExtractError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.crops not in (1, 3):
        raise ExtractError("--crops must be 1 or 3")


def _versions() -> dict:
    import av
    import zarr

    import mad
    from mad._compat import import_open_clip

    return {"mad": mad.__version__, "torch": torch.__version__, "open_clip": import_open_clip().__version__,
            "zarr": zarr.__version__, "av": av.__version__}


def _manifest(cfg: ExtractConfig, backbone, class_names: list[str], videos_root: str, labelled_by: str) -> dict:
    info = backbone.info
    return {
        "model": cfg.model, "model_config": model_config_of(cfg.model),
        "pretrained": "none" if cfg.pretrained in (None, "", "none") else (
            os.path.basename(cfg.pretrained) if info.pretrained_sha256 else cfg.pretrained),
        "pretrained_sha256": info.pretrained_sha256,
        "layers": backbone.layers, "depth": info.depth,
        "frames": cfg.frames, "clips": cfg.clips, "crops": cfg.crops,
        "image_size": info.image_size, "patch_size": info.patch_size, "grid": list(info.grid),
        "pool": cfg.pool, "tokens": backbone.tokens, "width": info.width,
        "mean": list(info.mean), "std": list(info.std), "precision": cfg.precision, "dtype": "float16",
        "sampling": "tsn-middle", "class_names": class_names, "labelled_by": labelled_by,
        "videos_root": videos_root, "shard_size": cfg.shard_size, "versions": _versions(),
    }


class _StoreLocks:
    """flock-based locks on a local store for the length of a run.

    A whole-store run holds `.mad-lock` exclusively; a slice of a sharded run holds
    it shared plus `.mad-lock-I-of-N` exclusively, so slices run side by side but
    never beside a whole-store run or a twin of themselves. Creating or extending
    the store happens under `.mad-create`, one process at a time. flock, not pid
    files: the kernel drops a lock when its process dies, SIGKILL included.
    """

    def __init__(self, out: str, index: int, count: int):
        self.out, self.files = out, []
        if "://" in out:
            return  # remote stores: one writer per shard block is the caller's contract
        Path(out).mkdir(parents=True, exist_ok=True)
        if count == 1:
            self._take(".mad-lock", exclusive=True)
        else:
            self._take(".mad-lock", exclusive=False)
            self._take(f".mad-lock-{index}-of-{count}", exclusive=True)

    def _take(self, name: str, exclusive: bool, wait: bool = False):
        import fcntl

        file = open(Path(self.out) / name, "a+")
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(file, mode)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            self.release()
            raise ExtractError(f"{self.out}: another extraction is writing to this store ({holder}); "
                               "wait for it to finish or use another --out") from None
        if exclusive:
            file.seek(0)
            file.truncate()
            file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            file.flush()
        self.files.append(file)
        return file

    def creating(self):
        """A context in which this process alone creates or extends the store."""
        import contextlib

        @contextlib.contextmanager
        def held():
            if "://" in self.out:
                yield
                return
            file = self._take(".mad-create", exclusive=True, wait=True)
            try:
                yield
            finally:
                self.files.remove(file)
                file.close()

        return held()

    def release(self) -> None:
        for file in self.files:
            file.close()  # closing drops the flock
        self.files = []


def _slice(cfg: ExtractConfig) -> tuple[int, int]:
    """(index, count) of this process's slice: --shard I/N, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if cfg.shard:
        try:
            index, count = (int(x) for x in cfg.shard.split("/"))
        except ValueError:
            raise ExtractError(f"--shard {cfg.shard!r}: expected I/N, e.g. 0/4") from None
        if not 0 <= index < count:
            raise ExtractError(f"--shard {cfg.shard}: I must be in 0..N-1")
        return index, count
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else (0, 1)


def _clear(out: str) -> None:
    """Remove a store's contents, but not the lock files this run holds."""
    if "://" in out:
        import fsspec

        fs, path = fsspec.core.url_to_fs(out)
        fs.rm(path, recursive=True)
        return
    for entry in Path(out).iterdir():
        if not entry.name.startswith(".mad-"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _open_or_create(cfg: ExtractConfig, manifest: dict, video_list) -> Store:
    out = cfg.out
    try:
        Store.open(out) if Store.exists(out) else None
    except IncompleteStoreError:  # killed while creating it: make it again
        _clear(out)
        return Store.create(out, manifest, video_list.paths, video_list.labels)
    except StoreError:
        pass  # reported below, unless --overwrite
    if Store.exists(out) and cfg.overwrite:
        _clear(out)
    if not Store.exists(out):
        return Store.create(out, manifest, video_list.paths, video_list.labels)
    try:
        store = Store.open(out, mode="r+")
    except StoreError as e:
        raise ExtractError(str(e)) from None
    differences = manifest_differences(store.manifest, manifest, IDENTITY_KEYS)
    if differences:
        raise ExtractError(f"{out} was made with different settings ({'; '.join(differences)}); "
                           "use another --out, or --overwrite to start over")
    # Videos added to the folder since the last run are appended; new classes get new numbers.
    known = set(store.paths())
    new = [(p, label) for p, label in zip(video_list.paths, video_list.labels) if p not in known]
    if new:
        class_names = store.class_names
        for name in video_list.class_names:
            if name not in class_names:
                class_names.append(name)
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[video_list.class_names[label]] if label >= 0 else -1 for _, label in new]
        store.append_videos([p for p, _ in new], labels)
        store.set_manifest(class_names=class_names)
    return store


def extract(cfg: ExtractConfig) -> dict:
    """Extract (or resume extracting) every video under cfg.videos into cfg.out."""
    _check_config(cfg)
    index, count = _slice(cfg)
    if count > 1 and cfg.overwrite:
        raise ExtractError("--overwrite cannot be combined with a sharded run: start over with one process first")
    try:
        video_list = find_videos(cfg.videos, cfg.labels)
        device = resolve_device(cfg.device)
        if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per process
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        backbone = load_backbone(cfg.model, cfg.pretrained, cfg.layers, device, cfg.precision, cfg.pool)
    except (VideoListError, BackboneError) as e:
        raise ExtractError(str(e)) from None
    manifest = _manifest(cfg, backbone, video_list.class_names, str(Path(cfg.videos).resolve()),
                         video_list.labelled_by)
    if not Store.exists(cfg.out) and "://" not in cfg.out and Path(cfg.out).exists() and \
            any(not p.name.startswith(".mad-") for p in Path(cfg.out).iterdir()):
        raise ExtractError(f"{cfg.out}: exists and is not a mad cache; choose another --out")
    locks = _StoreLocks(cfg.out, index, count)
    try:
        with locks.creating():
            store = _open_or_create(cfg, manifest, video_list)
        return _extract_slice(cfg, store, backbone, device, index, count)
    finally:
        locks.release()


def _extract_slice(cfg: ExtractConfig, store: Store, backbone, device: str, index: int, count: int) -> dict:
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
    workers = cfg.workers if cfg.workers >= 0 else (1 if device == "cpu" else min(8, os.cpu_count() or 1))
    dataset = VideoDecodeDataset(cfg.videos, [paths[v] for v in scheduled], scheduled, cfg.frames, cfg.clips,
                                 cfg.crops, backbone.info.image_size)
    summary = {"videos": store.num_videos, "scheduled": len(scheduled), "done_now": 0, "failed_now": 0,
               "errors": store.errors_location, "out": cfg.out}
    started = time.perf_counter()
    writer = BlockWriter(store, scheduled)
    progress = _Progress(len(scheduled), cfg.progress, f"extract [{index}/{count}]" if count > 1 else "extract")
    try:
        batch: list[dict] = []
        for item in _decoded_items(dataset, workers):
            if item["error"] is not None:
                writer.put(item)
                summary["failed_now"] += 1
                progress.advance(failed=True)
                continue
            batch.append(item)
            if len(batch) == cfg.batch_size:
                summary["done_now"] += _run_batch(backbone, batch, writer, device)
                progress.advance(len(batch))
                batch = []
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
def _run_batch(backbone, batch: list[dict], writer: BlockWriter, device: str) -> int:
    """Frames of a few videos through the model in one pass; hand each video's tokens to the writer."""
    sizes = [item["frames"].shape[0] * item["frames"].shape[1] for item in batch]  # views * T per video
    frames = torch.cat([item["frames"].flatten(0, 1) for item in batch]).to(device, non_blocking=True)
    levels = backbone(frames)  # per layer: [sum(views * T), N, D]
    levels = [level.to(torch.float16).cpu().numpy() for level in levels]
    offset = 0
    for item, size in zip(batch, sizes):
        views, T = item["frames"].shape[:2]
        item["tokens"] = {layer: level[offset:offset + size].reshape(views, T, *level.shape[1:])
                          for layer, level in zip(backbone.layers, levels)}
        item["frames"] = None
        offset += size
        writer.put(item)
    return len(batch)


class _Progress:
    """rich progress: videos done/total, clips/s, ETA, failures so far."""

    def __init__(self, total: int, enabled: bool, label: str = "extract"):
        self.progress = None
        self.failed = 0
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} clips/s"),
            TimeRemainingColumn(), TextColumn("[red]{task.fields[failed]} failed"),
        )
        self.task = self.progress.add_task("extract", total=total, rate="-", failed=0)
        self.started = time.perf_counter()
        self.done = 0
        self.progress.start()

    def advance(self, n: int = 1, failed: bool = False) -> None:
        if self.progress is None:
            return
        self.failed += failed
        self.done += 0 if failed else n
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        self.progress.update(self.task, advance=n, rate=f"{rate:.2f}", failed=self.failed)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _print_summary(summary: dict) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    line = (f"{summary['done_now']} extracted, {summary['failed_now']} failed in {summary['seconds']:.1f} s "
            f"({summary['clips_per_s']:.2f} videos/s); store {summary['out']}: {summary['done_total']} done, "
            f"{summary['failed_total']} failed, {summary['pending_total']} pending of {summary['videos']}")
    console.print(line)
    if summary["failed_total"]:
        console.print(f"failures and reasons: {summary['errors']}")


def config_json(cfg: ExtractConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2)
