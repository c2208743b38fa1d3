"""The text of annotation files (lines, CSV rows, JSON), and the listing each reader fills.

`Listing` is where a reader's entries become `video -> label`, and where what is not taken as given
(a video listed twice, with one label or two; some entries without one) is said, once each.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

from mad.errors import MadError


class AnnotationError(MadError):
    """An annotation file cannot be read (message names the file, the line and why)."""


class Listing:
    """The listed videos as a reader adds them; `finish` says, once each, what it did not take as given."""

    def __init__(self, file: Path, unit: str):
        self.file, self.unit = file, unit  # unit: "line" or "entry", for messages
        self.videos: dict[str, int] = {}
        self.where: dict[str, object] = {}
        self.conflicts: dict[str, tuple] = {}  # listed with two labels: left out
        self.repeats: list[str] = []

    def add(self, key: str, label: int, where) -> None:
        if key in self.conflicts:
            return
        if key not in self.videos:
            self.videos[key], self.where[key] = label, where
        elif self.videos[key] == label:
            self.repeats.append(key)
        else:
            self.conflicts[key] = (self.where[key], where)
            del self.videos[key]

    def finish(self) -> dict[str, int]:
        if self.conflicts:
            key, (first, second) = next(iter(self.conflicts.items()))
            warnings.warn(f"{self.file}: {len(self.conflicts)} videos are listed twice with different labels, "
                          f"left out (first: {key}, {self.unit}s {first} and {second})")
        if self.repeats:
            warnings.warn(f"{self.file}: {len(self.repeats)} videos are listed more than once with the same "
                          f"label, kept once (first: {self.repeats[0]})")
        unlabelled = [key for key, label in self.videos.items() if label < 0]
        if unlabelled and len(unlabelled) < len(self.videos):
            warnings.warn(f"{self.file}: {len(unlabelled)} of {len(self.videos)} videos have no label, kept as "
                          f"unlabelled (-1) (first: {unlabelled[0]}, {self.unit} {self.where[unlabelled[0]]})")
        return self.videos


def lines(file: Path, allow_empty: bool = False) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines (no format here has comments); at least one."""
    found = [(number, line) for number, line in enumerate(read_text(file).splitlines(), 1) if line.strip()]
    if not found and not allow_empty:
        raise AnnotationError(f"{file}: no entries")
    return found


def read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8-sig")  # -sig: an editor's BOM would stick to the first name
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{file}: not UTF-8 text (byte {e.start})") from None


def csv_rows(file: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) of each CSV row, after checking the header has `required` and no row is short."""
    try:
        with open(file, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [name.strip() for name in reader.fieldnames or []]
            reader.fieldnames = header
            missing = [name for name in required if name not in header]
            if missing:
                raise AnnotationError(f"{file}: the header has no {', '.join(missing)} column (it reads "
                                      f"{','.join(header)})")
            rows = []
            for row in reader:
                if any(row[name] is None for name in required):
                    raise AnnotationError(f"{file}:{reader.line_num}: fewer columns than the header's {len(header)}")
                rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{file}: not UTF-8 text (byte {e.start})") from None
    if not rows:
        raise AnnotationError(f"{file}: no rows")
    return rows


def read_json(file: Path):
    try:
        return json.loads(read_text(file))
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None


def is_int(text: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", text) is not None


def whole_seconds(text: str) -> int:
    value = float(text)
    if not value.is_integer() or value < 0:
        raise ValueError(text)
    return int(value)


def clean_path(path: str) -> str:
    path = path.strip()
    while path.startswith("./"):
        path = path[2:]
    return Path(path).as_posix()
