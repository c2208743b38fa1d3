"""Find videos and their labels.

Three ways to label, in this order of precedence:
- `--labels list.txt`: MMAction2-style `path label` per line (path relative to the
  videos root, integer label), class names from `label_map.txt` beside the list;
- `--labels file.csv`: a header with `path,label`; labels are integers or class names;
- class folders: every video at `DIR/<class>/<clip>` (sorted class names -> 0, 1, ...).
Anything else is unlabelled (label -1).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from mad.errors import MadError

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts"}


class VideoListError(MadError):
    """The videos folder or the label file cannot be used (message says why)."""


@dataclass
class VideoList:
    root: Path
    paths: list[str]                         # relative to root, '/'-separated, sorted
    labels: list[int]                        # -1 when unlabelled
    class_names: list[str] = field(default_factory=list)
    labelled_by: str = "none"                # class-folders | list | csv | none


def find_videos(root: str | Path, labels: str | Path | None = None) -> VideoList:
    root = Path(root)
    if not root.is_dir():
        raise VideoListError(f"{root}: not a folder")
    if labels is not None:
        labels = Path(labels)
        if not labels.is_file():
            raise VideoListError(f"{labels}: label file not found")
        return _from_csv(root, labels) if labels.suffix.lower() == ".csv" else _from_list(root, labels)
    paths = sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    if not paths:
        raise VideoListError(f"{root}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
    if all(path.count("/") == 1 for path in paths):
        class_names = sorted({path.split("/")[0] for path in paths})
        index = {name: i for i, name in enumerate(class_names)}
        return VideoList(root, paths, [index[p.split("/")[0]] for p in paths], class_names, "class-folders")
    return VideoList(root, paths, [-1] * len(paths), [], "none")


def _from_list(root: Path, list_file: Path) -> VideoList:
    entries = {}
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        try:
            path, label = (parts[0], int(parts[1])) if len(parts) == 2 else (parts[0], -1)
        except ValueError:
            raise VideoListError(f"{list_file}:{number}: expected 'path label' with an integer label") from None
        entries[_clean(path)] = label
    if not entries:
        raise VideoListError(f"{list_file}: no entries")
    label_map = list_file.parent / "label_map.txt"
    if label_map.is_file():
        class_names = [line.strip() for line in label_map.read_text().splitlines() if line.strip()]
    else:
        class_names = [str(i) for i in range(max(entries.values()) + 1)]
    bad = [label for label in entries.values() if label >= len(class_names)]
    if bad:
        raise VideoListError(f"{list_file}: label {bad[0]} has no name in {label_map} ({len(class_names)} classes)")
    paths = sorted(entries)
    return VideoList(root, paths, [entries[p] for p in paths], class_names, "list")


def _from_csv(root: Path, csv_file: Path) -> VideoList:
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise VideoListError(f"{csv_file}: needs a header with 'path' (and 'label') columns")
        rows = [(_clean(row["path"]), (row.get("label") or "").strip()) for row in reader if row.get("path")]
    if not rows:
        raise VideoListError(f"{csv_file}: no rows")
    values = [label for _, label in rows if label != ""]
    if all(v.lstrip("-").isdigit() for v in values):
        numbers = {path: int(label) if label != "" else -1 for path, label in rows}
        class_names = [str(i) for i in range(max([*numbers.values(), -1]) + 1)]
    else:
        class_names = sorted(set(values))
        index = {name: i for i, name in enumerate(class_names)}
        numbers = {path: index[label] if label != "" else -1 for path, label in rows}
    paths = sorted(numbers)
    return VideoList(root, paths, [numbers[p] for p in paths], class_names, "csv")


def _clean(path: str) -> str:
    path = path.strip()
    while path.startswith("./"):
        path = path[2:]
    return Path(path).as_posix()
