"""Find videos and their labels.

Labels come from, in this order of precedence:
- `--labels FILE` (or a folder of split files): a dataset's annotations, read by `annotations.py`
  (MMAction2 list, `path,label` CSV, Kinetics CSV, Something-Something v2 JSON, UCF101 and HMDB51
  split files); listed videos missing on disk are skipped with a warning, unlisted ones left out;
- class folders: every video at `DIR/<class>/<clip>` (sorted class names -> 0, 1, ...).
Anything else is unlabelled (label -1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from mad.errors import MadError
from mad.extract.annotations import Annotations, read_annotations

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


class VideoListError(MadError):
    """The videos folder or the label file cannot be used (message says why)."""


@dataclass
class VideoList:
    root: Path
    paths: list[str]                         # relative to root, '/'-separated, sorted
    labels: list[int]                        # -1 when unlabelled
    class_names: list[str] = field(default_factory=list)
    labelled_by: str = "none"                # class-folders | none | an annotation format (mmaction, kinetics, ...)
    missing: list[str] = field(default_factory=list)  # listed in the annotations, not found under root
    unlisted: int = 0                        # videos under root the annotations do not list


def find_videos(root: str | Path, labels: str | Path | None = None, labels_format: str = "auto",
                labels_split: str | None = None) -> VideoList:
    root = Path(root)
    if not root.is_dir():
        raise VideoListError(f"{root}: not a folder")
    if labels is not None:
        return _match(root, read_annotations(labels, labels_format, labels_split))
    if labels_format != "auto" or labels_split is not None:
        raise VideoListError("--labels-format and --labels-split need --labels")
    paths = _video_files(root)
    if not paths:
        raise VideoListError(f"{root}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    if all(path.count("/") == 1 for path in paths):
        class_names = sorted({path.split("/")[0] for path in paths})
        index = {name: i for i, name in enumerate(class_names)}
        return VideoList(root, paths, [index[p.split("/")[0]] for p in paths], class_names, "class-folders")
    return VideoList(root, paths, [-1] * len(paths), [], "none")


def _video_files(root: Path) -> list[str]:
    """Every video file under root, relative and sorted."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def _match(root: Path, annotations: Annotations) -> VideoList:
    """The listed videos found under root, by relative path or (for datasets that name clips) by file stem."""
    on_disk = _video_files(root)
    found: dict[str, int] = {}  # path under root -> label
    missing: list[str] = []
    if annotations.by_stem:  # Kinetics, SSv2, UCF101, HMDB51: in class folders or flat, any container
        by_stem: dict[str, list[str]] = {}
        for path in on_disk:
            by_stem.setdefault(Path(path).stem, []).append(path)
        for stem, label in annotations.videos.items():
            paths = by_stem.get(stem, [])
            if len(paths) > 1:
                raise VideoListError(f"{annotations.file}: {stem} is {len(paths)} files under {root} "
                                     f"({', '.join(paths[:3])}); keep one")
            if paths:
                found[paths[0]] = label
            else:
                missing.append(stem)
    else:
        known = set(on_disk)
        for path, label in annotations.videos.items():
            if path in known or (root / path).is_file():  # is_file: a listed file with an unusual extension
                found[path] = label
            else:
                missing.append(path)
    listed = len(annotations.videos)
    if not found:
        raise VideoListError(f"{annotations.file}: none of its {listed} videos is under {root} "
                             f"(first: {', '.join(missing[:3])})")
    if missing:
        warnings.warn(f"{annotations.file}: {len(missing)} of {listed} listed videos are not under {root}, "
                      f"skipped (first: {', '.join(missing[:3])})")
    unlisted = len(set(on_disk) - set(found))
    if unlisted:
        warnings.warn(f"{root}: {unlisted} videos are not listed in {annotations.file}, left out")
    paths = sorted(found)
    return VideoList(root, paths, [found[p] for p in paths], annotations.class_names, annotations.format,
                     missing, unlisted)
