"""The on-disk contract between extraction and training: one Zarr v3 group. Only this module touches Zarr.

Layout (DESIGN.md, "Store schema"; every array a standard Zarr v3 data type):
    zarr.json            attributes["mad"]: the manifest (`Manifest`)
    layers/<n>           full stores: float16 [V, views, T, N, D]; chunk = one (video, view);
                         shard = `shard_size` consecutive videos; crc32c per chunk
    records              compact stores: uint8 [V, views, R], one record per (video, view):
                         what the branch reads, 8-bit (`mad.cache.compact`); chunks, shards as above
    layers/<n>           also in compact stores: the levels a branch family reads as tokens (EVL's)
    frozen/<name>        float32: frozen backbone weights a branch needs (EVL: ln_1 and the q/k rows of the
                         in-projection of each of its blocks), written once at creation
    label                int32 [V]          (-1 when unlabelled)
    path                 uint8 [V, L]       UTF-8 path relative to the videos root, zero-padded
    frame_index          int32 [V, clips, T]    (train views: [V, views, T]; `mad.cache.layout`)
    view_box             int32 [V, views, 5]    train views only: crop box and flip per view
    num_frames           int32 [V]          frames in the video (fewer than T: frames repeat)
    status               uint8 [V]          0 pending, 1 done, 2 failed
    errors.jsonl         one line per failed video: path and reason

Every per-video array is chunked along V by `shard_size`, so a block of
`shard_size` videos (one shard of every layer plus one chunk of every small
array) is owned by exactly one writer: two processes writing one shard lose data.
`write_block` writes a block's data first and its `status` last, so a video is
done only when its data is complete.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

from mad.cache.layout import PATH_BYTES, data_arrays, encode_paths, path_width, view_arrays
from mad.cache.manifest import FORMAT_VERSION, READABLE_VERSIONS, Manifest
from mad.errors import MadError

PENDING, DONE, FAILED = 0, 1, 2

# Format 1 stores kept paths in zarr-python's variable-length string type, which warns on every use.
warnings.filterwarnings("ignore", message=".*VariableLengthUTF8.*")
warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


class StoreError(MadError):
    """A store that cannot be used for the requested operation (message says why)."""


class IncompleteStoreError(StoreError):
    """A store whose creation was interrupted: it holds no data and can be made again."""


@dataclass
class VideoResult:
    """What extraction produced for one video: its data, or the reason it failed."""

    video: int                                   # index in the store
    path: str
    data: dict[str, np.ndarray] | None           # data array name -> [views, ...]; None when failed
    frame_index: np.ndarray | None               # int32 [clips, T] ([views, T] with train views)
    num_frames: int = 0
    error: str | None = None
    view_box: np.ndarray | None = None           # train views: int32 [views, 5] (`mad.cache.layout`)


def _describe(videos) -> str:
    if isinstance(videos, slice):
        return f"{videos.start or 0}..{'end' if videos.stop is None else videos.stop - 1}"
    return str(videos) if np.isscalar(videos) else f"{len(videos)} selected"


def is_url(location) -> bool:
    return "://" in str(location)


class Store:
    """A cache store. Open with `Store.open`, make with `Store.create`."""

    def __init__(self, group: zarr.Group, location: str):
        self._group = group
        self.location = location
        self.manifest = Manifest.from_dict(dict(group.attrs["mad"]), location)
        self._arrays: dict[str, zarr.Array] = {}  # opened once: opening reads metadata (~1 ms)

    # ---- opening and creating -------------------------------------------------

    @classmethod
    def exists(cls, location) -> bool:
        location = str(location)
        if is_url(location):
            try:
                zarr.open_group(location, mode="r")
                return True
            except Exception:
                return False
        return (Path(location) / "zarr.json").exists()

    @classmethod
    def open(cls, location, mode: str = "r") -> "Store":
        location = str(location)
        if not cls.exists(location):
            raise StoreError(f"{location}: no mad cache here (no zarr.json)")
        group = zarr.open_group(location, mode=mode)
        if "mad" not in group.attrs and group.attrs.get("mad_creating"):
            raise IncompleteStoreError(f"{location}: its creation was interrupted (no data in it yet)")
        if "mad" not in group.attrs:
            raise StoreError(f"{location}: a Zarr group, but not a mad cache (no 'mad' manifest)")
        version = group.attrs["mad"].get("format_version")
        if version not in READABLE_VERSIONS:
            raise StoreError(f"{location}: cache format {version}, this mad reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        return cls(group, location)

    @classmethod
    def create(cls, location, manifest: Manifest, paths: list[str], labels: list[int],
               frozen: dict[str, np.ndarray] | None = None) -> "Store":
        """Create an empty store for `paths` (all pending), with `frozen` weights (name -> float32 array).
        Overwrites nothing: the caller decides."""
        location = str(location)
        values = manifest.to_dict()
        values["format_version"] = FORMAT_VERSION
        values["created"] = values["created"] or datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        m = Manifest.from_dict(values, location)
        S, V, T = m.shard_size, len(paths), m.frames
        # Marked as being created until the manifest lands, so an interrupted creation
        # is recognised as ours (and empty) rather than as a foreign Zarr group.
        # create_group, not open_group(mode="w"): that would wipe the folder, the run's lock files with it.
        group = zarr.create_group(location, attributes={"mad_creating": True})
        if m.stored_levels:
            group.create_group("layers")
        if frozen:
            weights = group.create_group("frozen")
            for name, value in frozen.items():
                weights.create_array(name, shape=value.shape, dtype="float32", chunks=value.shape)[...] = value
        for name, (shape, dtype) in data_arrays(m).items():
            parent, _, leaf = name.rpartition("/")
            (group[parent] if parent else group).create_array(
                leaf, shape=(V, *shape), dtype=dtype, chunks=(1, 1, *shape[1:]), shards=(S, *shape),
                compressors=[Crc32cCodec()], fill_value=0,  # checksums: a flipped byte is an error, not garbage
            )
        width = path_width(paths)
        group.create_array("label", shape=(V,), dtype="int32", chunks=(S,), fill_value=-1)
        group.create_array("path", shape=(V, width), dtype="uint8", chunks=(S, PATH_BYTES), fill_value=0)
        for name, (shape, dtype, fill) in view_arrays(m).items():  # frame_index, and view_box with train views
            group.create_array(name, shape=(V, *shape), dtype=dtype, chunks=(S, *shape), fill_value=fill)
        group.create_array("num_frames", shape=(V,), dtype="int32", chunks=(S,), fill_value=0)
        group.create_array("status", shape=(V,), dtype="uint8", chunks=(S,), fill_value=PENDING)
        if V:
            group["label"][:] = np.asarray(labels, dtype=np.int32)
            group["path"][:] = encode_paths(paths, width)
        group.attrs.put({"mad": values})  # last, replacing the creation mark: now it is a store
        return cls(group, location)

    @staticmethod
    def remove(location: str) -> None:
        """Delete a store's contents, but not the lock files (`.mad-*`) of the run that holds it."""
        if is_url(location):
            import fsspec

            fs, path = fsspec.core.url_to_fs(location)
            fs.rm(path, recursive=True)
            return
        for entry in Path(location).iterdir():
            if not entry.name.startswith(".mad-"):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()

    def append_videos(self, paths: list[str], labels: list[int]) -> None:
        """Grow every per-video array by len(paths) pending videos."""
        if not paths:
            return
        V0, n = self.num_videos, len(paths)
        path_array = self._array("path")
        legacy = path_array.ndim == 1
        width = path_array.shape[1] if not legacy else 0
        for name in self._per_video_arrays():
            array = self._array(name)
            shape = (V0 + n,) + array.shape[1:]
            if name == "path" and not legacy:
                width = max(width, path_width(paths))
                shape = (V0 + n, width)
            array.resize(shape)
        self._arrays.clear()  # their shapes changed
        self._array("label")[V0:] = np.asarray(labels, dtype=np.int32)
        self._array("path")[V0:] = np.asarray(paths, dtype=object) if legacy else encode_paths(paths, width)

    def _per_video_arrays(self) -> list[str]:
        return list(self.data_arrays) + ["label", "path", *view_arrays(self.manifest), "num_frames", "status"]

    @property
    def data_arrays(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The arrays that hold the extracted data: name -> (per-video shape, dtype)."""
        return data_arrays(self.manifest)

    def set_class_names(self, class_names: list[str]) -> None:
        self.manifest.class_names = list(class_names)
        self._group.attrs["mad"] = self.manifest.to_dict()

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self._group[name]
        return self._arrays[name]

    # ---- reading ----------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def num_videos(self) -> int:
        return int(self._array("status").shape[0])

    @property
    def shard_size(self) -> int:
        return self.manifest.shard_size

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.class_names)

    def status(self) -> np.ndarray:
        return self._array("status")[:]

    def labels(self) -> np.ndarray:
        return self._array("label")[:]

    def paths(self) -> list[str]:
        if not self.num_videos:
            return []
        stored = self._array("path")[:]
        if stored.ndim == 1:  # format 1: variable-length strings
            return [str(p) for p in stored]
        return [bytes(row).rstrip(b"\0").decode() for row in stored]

    def frozen(self) -> dict[str, np.ndarray]:
        """The frozen backbone weights the store carries (name -> float32 array); {} when none."""
        if "frozen" not in self._group:
            return {}
        group = self._group["frozen"]
        return {name: group[name][...] for name in sorted(group.array_keys())}

    def frame_index(self) -> np.ndarray:
        """int32 [V, clips, T] (train views: [V, views, T]): the frames each clip (view) saw, -1 when not done."""
        return self._array("frame_index")[:]

    def view_boxes(self) -> np.ndarray | None:
        """int32 [V, views, 5] crop boxes and flips of the train views (`mad.cache.layout`); None without them."""
        return self._array("view_box")[:] if self.manifest.train_views else None

    def num_frames(self) -> np.ndarray:
        return self._array("num_frames")[:]

    def layer_shape(self, layer: int) -> tuple[int, ...]:
        """[V, views, T, N, D] of a layer array."""
        return tuple(self._array(f"layers/{layer}").shape)

    def read_layer(self, layer: int, videos=slice(None), out: np.ndarray | None = None) -> np.ndarray:
        """float16 [n, views, T, N, D] of a full store's layer for the selected videos."""
        return self.read(f"layers/{layer}", videos, out)

    def read(self, name: str, videos=slice(None), out: np.ndarray | None = None) -> np.ndarray:
        """The selected videos of data array `name`; a damaged chunk is a StoreError.

        With `out` (an array of the selection's shape) the chunks are decoded straight into it:
        one copy fewer than reading and then placing them (a batch reads ~1.5x faster).
        """
        array = self._array(name)
        try:
            if out is None:
                return array[videos]
            from zarr.core.buffer.cpu import NDBuffer

            array.get_basic_selection(videos, out=NDBuffer.from_numpy_array(out))
            return out
        except ValueError as e:  # zarr's crc32c codec: "Stored and computed checksum do not match"
            raise StoreError(f"{self.location}/{name}: damaged data for videos {_describe(videos)} "
                             f"({e}); run `mad info {self.location} --verify`") from None

    def counts(self) -> dict:
        status = self.status()
        return {"videos": int(status.size), "done": int((status == DONE).sum()),
                "failed": int((status == FAILED).sum()), "pending": int((status == PENDING).sum())}

    def verify(self) -> list[dict]:
        """Read every block of every array; return [{array, videos, reason}] for those that fail.

        Chunks carry crc32c checksums, so flipped bytes fail to decode instead of
        reading back as plausible numbers.
        """
        problems = []
        S, V = self.shard_size, self.num_videos
        for name in self._per_video_arrays():
            array = self._array(name)
            for start in range(0, V, S):
                stop = min(start + S, V)
                try:
                    array[start:stop]
                except Exception as e:  # zarr raises codec-specific errors on bad checksums
                    problems.append({"array": name, "videos": [start, stop], "reason": f"{type(e).__name__}: {e}"})
        return problems

    # ---- writing ----------------------------------------------------------------

    def write_block(self, block: int, results: list[VideoResult]) -> None:
        """Write the results of videos in shard block `block`, status last; log the failures.

        Videos of the block done by an earlier run are read back and written again
        with it (a shard is written whole), so one call is one write of each shard file.
        """
        S = self.shard_size
        start, stop = block * S, min((block + 1) * S, self.num_videos)
        if any(not start <= r.video < stop for r in results):
            raise ValueError(f"results outside shard block {block} ([{start}, {stop}))")
        status = self._array("status")[start:stop]
        views = {name: self._array(name)[start:stop] for name in view_arrays(self.manifest)}
        num_frames = self._array("num_frames")[start:stop]
        new = np.zeros(stop - start, bool)
        new[[r.video - start for r in results]] = True
        keep = (status == DONE) & ~new
        data = {}
        for name, (shape, dtype) in self.data_arrays.items():
            values = self.read(name, slice(start, stop)) if keep.any() else np.zeros((stop - start, *shape), dtype)
            values[~keep] = 0
            data[name] = values
        errors = []
        for r in results:
            i = r.video - start
            num_frames[i] = r.num_frames
            if r.error is None:
                for name in data:
                    data[name][i] = r.data[name]
                for name, values in views.items():
                    values[i] = r.frame_index if name == "frame_index" else r.view_box
                status[i] = DONE
            else:
                for values in views.values():
                    values[i] = -1
                status[i] = FAILED
                errors.append({"path": r.path, "reason": r.error})
        for name, values in data.items():
            self._array(name)[start:stop] = values
        for name, values in views.items():
            self._array(name)[start:stop] = values
        self._array("num_frames")[start:stop] = num_frames
        self._array("status")[start:stop] = status  # last: marks the data above complete
        self._log_errors(errors)

    def _log_errors(self, records: list[dict]) -> None:
        """Append failure records ({"path", "reason"}) to errors.jsonl beside the store."""
        if not records:
            return
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if is_url(self.location):
            import fsspec

            fs, fpath = fsspec.core.url_to_fs(self.errors_location)
            old = fs.cat_file(fpath).decode() if fs.exists(fpath) else ""
            fs.pipe_file(fpath, (old + lines).encode())
        else:
            with open(os.path.join(self.location, "errors.jsonl"), "a") as f:
                f.write(lines)

    @property
    def errors_location(self) -> str:
        return self.location.rstrip("/") + "/errors.jsonl"

    def bytes_on_disk(self) -> dict[str, int]:
        """Stored bytes per data array."""
        if is_url(self.location):
            return {name: int(self._array(name).nbytes_stored()) for name in self.data_arrays}
        result = {}
        for name in self.data_arrays:
            root = Path(self.location) / name
            result[name] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return result

