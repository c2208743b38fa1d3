"""Find videos and their labels.

Labels come from, in this order of precedence:
- `--labels FILE` (or a folder of split files): a dataset's annotations, read by `annotations.py`
  (MMAction2 list, `path,label` CSV, Kinetics CSV, Something-Something v2 JSON, UCF101 and HMDB51
  split files); listed videos missing on disk are skipped with a warning, unlisted ones left out;
- class folders: every video at `DIR/<class>/<clip>` (sorted class names -> 0, 1, ...).
Anything else is unlabelled (label -1), said in a warning when only some videos are in class folders.
Files whose extension is not a video's are left out with a warning (count, extensions, first one).
"""

from __future__ import annotations

import warnings
from collections import Counter
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
    paths, others = _scan(root)
    _warn_left_out_by_extension(root, others)
    if not paths:
        raise VideoListError(f"{root}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    in_folders = [path for path in paths if path.count("/") == 1]
    if len(in_folders) == len(paths):
        class_names = sorted({path.split("/")[0] for path in paths})
        index = {name: i for i, name in enumerate(class_names)}
        return VideoList(root, paths, [index[p.split("/")[0]] for p in paths], class_names, "class-folders")
    if in_folders:  # one stray clip must not turn a labelled folder into an unlabelled one unnoticed
        stray = next(path for path in paths if path.count("/") != 1)
        warnings.warn(f"{root}: {len(in_folders)} of {len(paths)} videos are in class folders (<class>/<clip>), "
                      f"{len(paths) - len(in_folders)} are not (first: {stray}), so every video is unlabelled; "
                      "move those into class folders, or pass --labels")
    return VideoList(root, paths, [-1] * len(paths), [], "none")


def _scan(root: Path) -> tuple[list[str], list[str]]:
    """(video files, other files) under root, relative and sorted; hidden files (.name) are neither, and
    files in hidden folders (.git/, ...) not others."""
    videos, others = [], []
    for p in root.rglob("*"):
        if p.name.startswith(".") or not p.is_file():
            continue
        path = p.relative_to(root).as_posix()
        if p.suffix.lower() in VIDEO_EXTENSIONS:
            videos.append(path)
        elif not any(part.startswith(".") for part in path.split("/")):
            others.append(path)
    return sorted(videos), sorted(others)


def _warn_left_out_by_extension(root: Path, others: list[str]) -> None:
    if others:
        counts = Counter(Path(path).suffix.lower() or "(none)" for path in others)
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in counts.most_common(4))
        warnings.warn(f"{root}: {len(others)} files are not taken as videos by their extension ({kinds}; first: "
                      f"{others[0]}); videos are {', '.join(sorted(VIDEO_EXTENSIONS))}")


def _match(root: Path, annotations: Annotations) -> VideoList:
    """The listed videos found under root, by relative path or (for datasets that name clips) by file stem."""
    on_disk, others = _scan(root)
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
        raise VideoListError(_nothing_found(root, annotations, on_disk))
    _warn_left_out_by_extension(root, [path for path in others if path not in found])
    if missing:
        warnings.warn(f"{annotations.file}: {len(missing)} of {listed} listed videos are not under {root}, "
                      f"skipped (first: {', '.join(missing[:3])})")
    unlisted = len(set(on_disk) - set(found))
    if unlisted:
        warnings.warn(f"{root}: {unlisted} videos are not listed in {annotations.file}, left out")
    paths = sorted(found)
    return VideoList(root, paths, [found[p] for p in paths], annotations.class_names, annotations.format,
                     missing, unlisted)


def _nothing_found(root: Path, annotations: Annotations, on_disk: list[str]) -> str:
    """Why no listed video is under root, with one name it expects beside a few that are there: a naming
    mismatch (Kinetics clips saved as <youtube_id>.mp4, say) shows at a glance."""
    if not annotations.videos:
        return f"{annotations.file}: no video is left to look for (see the warnings above)"
    first = next(iter(annotations.videos))
    if annotations.by_stem:
        naming = f", {annotations.naming}" if annotations.naming else ""
        expected = f"a file named {first}.<ext> (any video extension{naming}), in any folder"
    else:
        expected = f"{first} (a path relative to it)"
    there = f"found e.g. {', '.join(on_disk[:3])}" if on_disk else "found no video files in it"
    return (f"{annotations.file}: none of its {len(annotations.videos)} videos is under {root}: expected e.g. "
            f"{expected}; {there}")


def check_labels_kept(video_list: VideoList, paths: list[str], labels, class_names: list[str], out: str) -> None:
    """Refuse a re-run that labels videos the store at `out` already holds differently: resuming keeps the
    store's labels, so a corrected --labels file would otherwise change nothing, silently."""
    def name(names: list[str], label: int) -> str | None:
        return names[label] if 0 <= label < len(names) else None
    stored = {path: name(class_names, int(label)) for path, label in zip(paths, labels)}
    changed = [(path, stored[path], name(video_list.class_names, label))
               for path, label in zip(video_list.paths, video_list.labels)
               if path in stored and stored[path] != name(video_list.class_names, label)]
    if changed:
        path, before, now = changed[0]
        raise VideoListError(f"{out}: {len(changed)} of the videos it holds are labelled differently now (first: "
                             f"{path}, {before!r} in the store, {now!r} now; None: unlabelled); use --overwrite to "
                             "start over with the new labels, or another --out")
