"""Benchmarks: figures and ratios measured side by side (`mad bench ...`); machine facts from mad.runtime."""

from __future__ import annotations

import os
from pathlib import Path


def video_subset(videos: str, limit: int, into: Path) -> Path:
    """`limit` videos of `videos` as symlinks under `into`; past the folder's end the list repeats
    (as `<class>/repeat<k>-<name>`): time does not depend on what a clip shows, and epochs get long enough."""
    from mad.extract.videos import find_videos

    paths = find_videos(videos).paths
    for i in range(limit):
        path = paths[i % len(paths)]
        repeat = i // len(paths)
        name = into / path if repeat == 0 else into / Path(path).parent / f"repeat{repeat}-{Path(path).name}"
        name.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(Path(videos).resolve() / path, name)
    return into
