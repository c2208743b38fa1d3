"""The arrays of a store, by manifest: the data arrays, the per-video view records, the path encoding.

    records / layers/<n>   the data (`data_arrays`): [V, views, ...], one chunk per (video, view)
    frame_index            int32 [V, clips, T]: the frames each clip saw (its crops share them); with train
                           views [V, views, T], a row per view (each has its own temporal jitter)
    view_box               train views only: int32 [V, views, 5], each view's crop x, y, w, h in pixels of
                           the frame decoded with short side `augment["short_side"]`, and its flip (0/1)
                           (`mad.extract.views`); -1 while not done
"""

from __future__ import annotations

import numpy as np

from mad.cache.manifest import Manifest

PATH_BYTES = 256  # path array chunk width; longer paths widen the array
VIEW_BOX = ("x", "y", "width", "height", "flip")


def data_arrays(m: Manifest) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (per-video shape, dtype) of the arrays that hold the extracted data."""
    arrays = {"records": ((m.views, m.compact["record_bytes"]), "uint8")} if m.storage == "compact" else {}
    arrays.update({f"layers/{level}": ((m.views, m.frames, m.tokens, m.width), "float16") for level in m.stored_levels})
    return arrays


def view_arrays(m: Manifest) -> dict[str, tuple[tuple[int, ...], str, int]]:
    """name -> (per-video shape, dtype, fill value) of what says how each view was made."""
    arrays = {"frame_index": ((m.frame_rows, m.frames), "int32", -1)}
    if m.train_views:
        arrays["view_box"] = ((m.views, len(VIEW_BOX)), "int32", -1)
    return arrays


def encode_paths(paths: list[str], width: int) -> np.ndarray:
    encoded = np.zeros((len(paths), width), np.uint8)
    for i, path in enumerate(paths):
        data = path.encode()
        encoded[i, :len(data)] = np.frombuffer(data, np.uint8)
    return encoded


def path_width(paths: list[str]) -> int:
    longest = max((len(p.encode()) for p in paths), default=0)
    return max(PATH_BYTES, -(-longest // PATH_BYTES) * PATH_BYTES)
