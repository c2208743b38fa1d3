"""The on-disk contract between extraction and training: one Zarr v3 group.

Layout (DESIGN.md, "Store schema"):
    zarr.json            attributes["mad"]: the manifest (model, layers, frames, ...)
    layers/<n>           float16 [V, views, T, N, D]; chunk = one (video, view);
                         shard = `shard_size` consecutive videos
    label                int32 [V]          (-1 when unlabelled)
    path                 str [V]            relative to the videos root
    frame_index          int32 [V, clips, T]
    num_frames           int32 [V]          frames in the video (fewer than T: frames repeat)
    status               uint8 [V]          0 pending, 1 done, 2 failed
    errors.jsonl         one line per failed video: path and reason

Every per-video array is chunked along V by `shard_size`, so a block of
`shard_size` videos (one shard of every layer plus one chunk of every small
array) is owned by exactly one writer: two processes writing one shard lose data.
`status` is written after the layer data of its block, so a video is done only
when its data is complete.
"""

from __future__ import annotations

import datetime
import json
import os
import warnings
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec

FORMAT_VERSION = 1
PENDING, DONE, FAILED = 0, 1, 2

# Manifest keys that must match for a run to resume into (or a val cache to pair
# with) an existing store: anything that changes what the cached tokens mean.
IDENTITY_KEYS = (
    "model", "pretrained", "pretrained_sha256", "layers", "frames", "clips", "crops",
    "image_size", "pool", "sampling", "precision",
)
# What training needs to agree on between train and val caches.
TRAINING_KEYS = ("model", "pretrained", "pretrained_sha256", "layers", "frames", "image_size", "pool", "tokens", "width")

# zarr 3.1 warns that variable-length strings have no final v3 spec yet; the
# format is stable within zarr 3.x, which is what we pin.
warnings.filterwarnings("ignore", message=".*VariableLengthUTF8.*")
warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")


class StoreError(Exception):
    """A store that cannot be used for the requested operation (message says why)."""


class IncompleteStoreError(StoreError):
    """A store whose creation was interrupted: it holds no data and can be made again."""


def manifest_differences(a: dict, b: dict, keys=IDENTITY_KEYS) -> list[str]:
    """Human-readable differences between two manifests on the given keys."""
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


def _describe(videos) -> str:
    if isinstance(videos, slice):
        return f"{videos.start or 0}..{'end' if videos.stop is None else videos.stop - 1}"
    return str(videos) if np.isscalar(videos) else f"{len(videos)} selected"


def _is_url(path: str) -> bool:
    return "://" in str(path)


class Store:
    """A cache store. Open with `Store.open`, make with `Store.create`."""

    def __init__(self, group: zarr.Group, location: str):
        self.group = group
        self.location = location
        self.manifest: dict = dict(group.attrs["mad"])
        self._layer_arrays: dict[int, zarr.Array] = {}  # opened once: opening reads metadata (~1 ms)

    # ---- opening and creating -------------------------------------------------

    @classmethod
    def exists(cls, location) -> bool:
        location = str(location)
        if _is_url(location):
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
        if version != FORMAT_VERSION:
            raise StoreError(f"{location}: cache format {version}, this mad reads {FORMAT_VERSION}")
        return cls(group, location)

    @classmethod
    def create(cls, location, manifest: dict, paths: list[str], labels: list[int]) -> "Store":
        """Create an empty store for `paths` (all pending). Overwrites nothing: the caller decides."""
        location = str(location)
        manifest = dict(manifest)
        manifest["format_version"] = FORMAT_VERSION
        manifest.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        S = int(manifest["shard_size"])
        views, T, N, D = manifest["clips"] * manifest["crops"], manifest["frames"], manifest["tokens"], manifest["width"]
        V = len(paths)
        # Marked as being created until the manifest lands, so an interrupted creation
        # is recognised as ours (and empty) rather than as a foreign Zarr group.
        # create_group, not open_group(mode="w"): that would wipe the folder, the run's lock files with it.
        group = zarr.create_group(location, attributes={"mad_creating": True})
        layers = group.create_group("layers")
        for layer in manifest["layers"]:
            layers.create_array(
                str(layer), shape=(V, views, T, N, D), dtype="float16",
                chunks=(1, 1, T, N, D), shards=(S, views, T, N, D),
                compressors=[Crc32cCodec()], fill_value=0,  # checksums: a flipped byte is an error, not garbage
            )
        group.create_array("label", shape=(V,), dtype="int32", chunks=(S,), fill_value=-1)
        group.create_array("path", shape=(V,), dtype=str, chunks=(S,))
        group.create_array("frame_index", shape=(V, manifest["clips"], T), dtype="int32",
                           chunks=(S, manifest["clips"], T), fill_value=-1)
        group.create_array("num_frames", shape=(V,), dtype="int32", chunks=(S,), fill_value=0)
        group.create_array("status", shape=(V,), dtype="uint8", chunks=(S,), fill_value=PENDING)
        if V:
            group["label"][:] = np.asarray(labels, dtype=np.int32)
            group["path"][:] = np.asarray(paths, dtype=object)
        group.attrs.put({"mad": manifest})  # last, replacing the creation mark: now it is a store
        return cls(group, location)

    def append_videos(self, paths: list[str], labels: list[int]) -> None:
        """Grow every per-video array by len(paths) pending videos."""
        if not paths:
            return
        V0, n = self.num_videos, len(paths)
        for array in self._per_video_arrays():
            array.resize((V0 + n,) + array.shape[1:])
        self._layer_arrays.clear()  # their shapes changed
        self.group["label"][V0:] = np.asarray(labels, dtype=np.int32)
        self.group["path"][V0:] = np.asarray(paths, dtype=object)

    def _per_video_arrays(self):
        yield from (self.group["layers"][str(layer)] for layer in self.layers)
        yield from (self.group[name] for name in ("label", "path", "frame_index", "num_frames", "status"))

    def set_manifest(self, **updates) -> None:
        self.manifest.update(updates)
        self.group.attrs["mad"] = self.manifest

    # ---- reading ----------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def num_videos(self) -> int:
        return int(self.group["status"].shape[0])

    @property
    def shard_size(self) -> int:
        return int(self.manifest["shard_size"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest.get("class_names") or [])

    def layer_array(self, layer: int) -> zarr.Array:
        if layer not in self._layer_arrays:
            self._layer_arrays[layer] = self.group["layers"][str(layer)]
        return self._layer_arrays[layer]

    def status(self) -> np.ndarray:
        return self.group["status"][:]

    def labels(self) -> np.ndarray:
        return self.group["label"][:]

    def paths(self) -> list[str]:
        return [str(p) for p in self.group["path"][:]] if self.num_videos else []

    def frame_index(self) -> np.ndarray:
        return self.group["frame_index"][:]

    def read_layer(self, layer: int, videos=slice(None), out: np.ndarray | None = None) -> np.ndarray:
        """float16 [n, views, T, N, D] for the selected videos; a damaged chunk is a StoreError.

        With `out` (an array of the selection's shape) the chunks are decoded straight into it:
        one copy fewer than reading and then placing them (a batch reads ~1.5x faster).
        """
        try:
            if out is None:
                return self.layer_array(layer)[videos]
            from zarr.core.buffer.cpu import NDBuffer

            self.layer_array(layer).get_basic_selection(videos, out=NDBuffer.from_numpy_array(out))
            return out
        except ValueError as e:  # zarr's crc32c codec: "Stored and computed checksum do not match"
            raise StoreError(f"{self.location}/layers/{layer}: damaged data for videos {_describe(videos)} "
                             f"({e}); run `mad info {self.location} --verify`") from None

    def counts(self) -> dict:
        status = self.status()
        return {"videos": int(status.size), "done": int((status == DONE).sum()),
                "failed": int((status == FAILED).sum()), "pending": int((status == PENDING).sum())}

    # ---- writing ----------------------------------------------------------------

    def write_block(self, start: int, layer_tokens: dict[int, np.ndarray], frame_index: np.ndarray,
                    status: np.ndarray) -> None:
        """Write videos [start, start + n) of one shard block, status last.

        `layer_tokens[layer]` is [n, views, T, N, D]; videos whose status is not DONE
        must hold zeros there. The block must lie inside one shard, so one call is
        one write of each shard file.
        """
        n = len(status)
        stop = start + n
        if start // self.shard_size != (stop - 1) // self.shard_size:
            raise ValueError(f"block [{start}, {stop}) crosses a shard boundary")
        for layer in self.layers:
            self.layer_array(layer)[start:stop] = layer_tokens[layer].astype(np.float16, copy=False)
        self.group["frame_index"][start:stop] = frame_index
        self.group["status"][start:stop] = status  # last: marks the data above complete

    def log_errors(self, records: list[dict]) -> None:
        """Append failure records ({"path", "reason"}) to errors.jsonl beside the store."""
        if not records:
            return
        lines = "".join(json.dumps(r) + "\n" for r in records)
        if _is_url(self.location):
            import fsspec

            url = self.location.rstrip("/") + "/errors.jsonl"
            fs, fpath = fsspec.core.url_to_fs(url)
            old = fs.cat_file(fpath).decode() if fs.exists(fpath) else ""
            fs.pipe_file(fpath, (old + lines).encode())
        else:
            with open(os.path.join(self.location, "errors.jsonl"), "a") as f:
                f.write(lines)

    @property
    def errors_location(self) -> str:
        return self.location.rstrip("/") + "/errors.jsonl"

    def bytes_on_disk(self) -> dict[int, int]:
        """Stored bytes per layer (0 for remote stores where listing is costly)."""
        if _is_url(self.location):
            return {layer: int(self.layer_array(layer).nbytes_stored()) for layer in self.layers}
        result = {}
        for layer in self.layers:
            root = Path(self.location) / "layers" / str(layer)
            result[layer] = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        return result
