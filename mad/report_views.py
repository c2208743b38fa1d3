"""`mad report` for a run trained from a store with train views (`mad extract --train-views K`): for a few
training videos, each stored view as the model saw it (re-made from the store's frame indices and crop box,
flipped where it was), and which of them the run trained on in its last epoch (the draw `mad train` makes
from its seed and the epoch: `mad.cache.dataset.epoch_order`)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

TRAINED_VIDEOS = 3  # training videos shown per run
THUMB = 64          # pixels per frame


def trained_views(cache: str, seed: int, epoch: int, videos: int = TRAINED_VIDEOS) -> list[dict]:
    """[{path, views: [{view, strip | note, box, flipped, trained}]}] for the first `videos` training videos;
    [] when the store holds no train views (or is gone: the report says so elsewhere)."""
    from mad.cache.dataset import epoch_order, usable_videos
    from mad.cache.store import Store, StoreError
    from mad.extract.decode import DecodeError
    from mad.extract.views import remake_view

    try:
        store = Store.open(cache)
    except StoreError:
        return []
    m = store.manifest
    if not m.train_views:
        return []
    usable = usable_videos(store)
    positions, views = epoch_order(len(usable), m.views, seed, epoch)
    drawn = dict(zip(positions.tolist(), views.tolist()))
    paths, frame_index, boxes = store.paths(), store.frame_index(), store.view_boxes()
    shown = []
    for position in range(min(videos, len(usable))):
        video = int(usable[position])
        full = Path(m.videos_root or "") / paths[video]
        row = {"path": paths[video], "views": []}
        for view in range(m.views):
            x, y, w, h, flip = boxes[video, view].tolist()
            entry = {"view": view, "box": f"{w}x{h} at ({x}, {y})", "flipped": bool(flip),
                     "trained": drawn.get(position) == view, "strip": None, "note": None}
            try:
                frames = remake_view(str(full), frame_index[video, view], boxes[video, view], THUMB,
                                     m.augment["short_side"])
                entry["strip"] = _jpeg_strip(frames.transpose(0, 2, 3, 1))
            except (DecodeError, OSError) as e:
                entry["note"] = f"{full}: {e}"
            row["views"].append(entry)
        shown.append(row)
    return shown


def _jpeg_strip(frames: np.ndarray) -> str:
    """base64 JPEG of uint8 [n, H, W, 3] frames side by side, 2 px apart."""
    from PIL import Image

    n, height, width = frames.shape[:3]
    strip = Image.new("RGB", (n * width + 2 * (n - 1), height), "white")
    for i, frame in enumerate(frames):
        strip.paste(Image.fromarray(np.ascontiguousarray(frame)), (i * (width + 2), 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()
