"""Read a dataset's own annotation files: which videos, their class index, the class names.

One reader per format, each returning `Annotations` (listed video -> class index, class names in
the dataset's official order). Which files exist on disk is `videos.py`'s business, not theirs:
class indices come from the annotation files alone, so they do not shift with what was downloaded.

    mmaction  list.txt: `path label` per line, class names from label_map.txt beside it
    csv       a `path,label` header; labels are integers or class names (sorted)
    kinetics  label,youtube_id,time_start,time_end[,split][,is_cc]; files <id>_<start:06d>_<end:06d>.*
    ssv2      train/validation JSON [{"id", "template", ...}]; labels JSON {"Template": "index"} beside it
    ucf101    trainlist0N.txt / testlist0N.txt with classInd.txt beside it (or the folder + a split)
    hmdb51    the folder of <class>_test_splitN.txt files + a split (train1..3 / test1..3)
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from mad.errors import MadError

FORMATS = ("auto", "mmaction", "csv", "kinetics", "ssv2", "ucf101", "hmdb51")
SSV2_LABELS = ("something-something-v2-labels.json", "labels.json")  # 20BN's name, then Qualcomm's download


class AnnotationError(MadError):
    """An annotation file cannot be read (message names the file, the line and why)."""


@dataclass
class Annotations:
    file: Path                  # what --labels named (for messages)
    format: str
    videos: dict[str, int]      # listed video -> class index (-1: unlabelled)
    class_names: list[str]
    by_stem: bool = False       # keys are file names without extension, found anywhere under --videos;
                                # else paths relative to --videos


def read_annotations(labels: str | Path, format: str = "auto", split: str | None = None) -> Annotations:
    """Read `labels` in `format` (auto: detected from the file or folder); `split` picks a split folder's part."""
    labels = Path(labels)
    if format not in FORMATS:
        raise AnnotationError(f"--labels-format {format!r}: use {', '.join(FORMATS)}")
    if not labels.exists():
        raise AnnotationError(f"{labels}: label file not found")
    if format == "auto":
        format = detect_format(labels)
    if labels.is_dir():
        if format not in ("hmdb51", "ucf101"):
            raise AnnotationError(f"{labels}: a folder; only HMDB51 and UCF101 split folders are read whole")
        kind, number = _parse_split(labels, split)
        if format == "hmdb51":
            return read_hmdb51(labels, kind, number)
        labels = labels / f"{kind}list0{number}.txt"  # UCF101's own names: trainlist01.txt ... testlist03.txt
        if not labels.is_file():
            raise AnnotationError(f"{labels}: not found (--labels-split {split})")
    elif format == "hmdb51":
        raise AnnotationError(f"{labels}: HMDB51 is read from the folder of its split files, with --labels-split")
    elif split is not None:
        raise AnnotationError(f"--labels-split {split}: only for a folder of split files (HMDB51, UCF101)")
    return READERS[format](labels)


def detect_format(labels: Path) -> str:
    """The format of an annotation file or folder, from its name, its neighbours and its first bytes."""
    if labels.is_dir():
        if any(labels.glob("*_test_split[0-9].txt")):
            return "hmdb51"
        if (labels / "classInd.txt").is_file():
            return "ucf101"
        raise AnnotationError(f"{labels}: a folder with neither HMDB51 split files (*_test_splitN.txt) nor "
                              "UCF101's classInd.txt")
    suffix = labels.suffix.lower()
    if suffix == ".json":
        return "ssv2"
    if suffix == ".csv":
        with open(labels, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
            header = next(csv.reader(f), [])
        return "kinetics" if "youtube_id" in [name.strip() for name in header] else "csv"
    if labels.name == "classInd.txt":
        raise AnnotationError(f"{labels}: UCF101's class list; pass trainlist0N.txt or testlist0N.txt beside it")
    if re.fullmatch(r"(train|test)list\d+\.txt", labels.name) and (labels.parent / "classInd.txt").is_file():
        return "ucf101"
    if re.fullmatch(r".+_test_split\d\.txt", labels.name):
        raise AnnotationError(f"{labels}: one class of HMDB51's split files; pass their folder and "
                              "--labels-split train1 (or test1, train2, ...)")
    return "mmaction"


def _parse_split(folder: Path, split: str | None) -> tuple[str, int]:
    match = re.fullmatch(r"(train|test)([1-3])", split or "")
    if not match:
        raise AnnotationError(f"{folder}: a folder of split files needs --labels-split train1, train2, train3, "
                              f"test1, test2 or test3{f' (got {split!r})' if split else ''}")
    return match[1], int(match[2])


# ---- one reader per format ----------------------------------------------------------


def read_mmaction(file: Path) -> Annotations:
    """MMAction2's video list: `path label` per line; class names from label_map.txt beside it (else numbers)."""
    videos = {}
    for number, line in _lines(file):
        parts = line.rsplit(maxsplit=1)
        try:
            path, label = (parts[0], int(parts[1])) if len(parts) == 2 else (parts[0], -1)
        except ValueError:
            raise AnnotationError(f"{file}:{number}: expected 'path label' with an integer label") from None
        videos[_clean(path)] = label
    label_map = file.parent / "label_map.txt"
    if label_map.is_file():
        class_names = [line.strip() for line in label_map.read_text().splitlines() if line.strip()]
    else:
        class_names = [str(i) for i in range(max(videos.values()) + 1)]
    bad = [label for label in videos.values() if label >= len(class_names)]
    if bad:
        raise AnnotationError(f"{file}: label {bad[0]} has no name in {label_map} ({len(class_names)} classes)")
    return Annotations(file, "mmaction", videos, class_names)


def read_csv(file: Path) -> Annotations:
    """A `path,label` CSV: integer labels (names are the numbers) or class names (sorted into numbers)."""
    rows = _csv_rows(file, required=("path",))
    rows = [(_clean(row["path"]), (row.get("label") or "").strip()) for _, row in rows if row["path"].strip()]
    values = [label for _, label in rows if label != ""]
    if all(v.lstrip("-").isdigit() for v in values):
        videos = {path: int(label) if label != "" else -1 for path, label in rows}
        class_names = [str(i) for i in range(max([*videos.values(), -1]) + 1)]
    else:
        class_names = sorted(set(values))
        index = {name: i for i, name in enumerate(class_names)}
        videos = {path: index[label] if label != "" else -1 for path, label in rows}
    return Annotations(file, "csv", videos, class_names)


def read_kinetics(file: Path) -> Annotations:
    """Kinetics-400/600/700 CSV; its official class index is the sorted class names."""
    rows = _csv_rows(file, required=("youtube_id", "time_start", "time_end"))
    clips = []
    for number, row in rows:
        try:
            start, end = (_whole_seconds(row[key]) for key in ("time_start", "time_end"))
        except ValueError:
            raise AnnotationError(f"{file}:{number}: time_start {row['time_start']!r} and time_end "
                                  f"{row['time_end']!r} must be whole seconds") from None
        clips.append((f"{row['youtube_id'].strip()}_{start:06d}_{end:06d}", (row.get("label") or "").strip()))
    class_names = sorted({label for _, label in clips if label})  # a test CSV has no label column: unlabelled
    index = {name: i for i, name in enumerate(class_names)}
    return Annotations(file, "kinetics", {stem: index.get(label, -1) for stem, label in clips}, class_names, True)


def read_ssv2(file: Path) -> Annotations:
    """Something-Something v2: the train/validation(/test) JSON, classes from the labels JSON beside it."""
    items = _json(file)
    if isinstance(items, dict):
        raise AnnotationError(f"{file}: a class list, not a video list; pass train.json or validation.json")
    if not isinstance(items, list) or not all(isinstance(item, dict) and "id" in item for item in items):
        raise AnnotationError(f"{file}: expected a JSON list of {{\"id\", \"template\", ...}} entries")
    labels_file = next((file.parent / name for name in SSV2_LABELS if (file.parent / name).is_file()), None)
    if labels_file is None:
        raise AnnotationError(f"{file}: no labels JSON beside it ({' or '.join(SSV2_LABELS)})")
    templates = _json(labels_file)
    try:
        templates = {name: int(index) for name, index in templates.items()}
    except (AttributeError, TypeError, ValueError):
        raise AnnotationError(f"{labels_file}: expected {{\"Template name\": \"index\", ...}}") from None
    class_names = sorted(templates, key=templates.get)
    if sorted(templates.values()) != list(range(len(templates))):
        raise AnnotationError(f"{labels_file}: indices are not 0..{len(templates) - 1}")
    videos = {}
    for number, item in enumerate(items, 1):
        label = -1  # the test JSON has ids only
        if "template" in item:
            # The labels JSON writes each template with its placeholders unbracketed: "[something]" -> "something".
            name = item["template"].replace("[", "").replace("]", "")
            if name not in templates:
                raise AnnotationError(f"{file}: entry {number} (id {item['id']}): template {name!r} is not in "
                                      f"{labels_file.name}")
            label = templates[name]
        videos[str(item["id"])] = label
    return Annotations(file, "ssv2", videos, class_names, True)


def read_ucf101(file: Path) -> Annotations:
    """UCF101: trainlist0N.txt (`Class/v_Class_gGG_cCC.avi N`, 1-based) or testlist0N.txt (class from the folder)."""
    class_file = file.parent / "classInd.txt"
    if not class_file.is_file():
        raise AnnotationError(f"{file}: no classInd.txt beside it")
    numbered = []
    for number, line in _lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AnnotationError(f"{class_file}:{number}: expected 'index ClassName'")
        numbered.append((int(parts[0]), parts[1]))
    if sorted(i for i, _ in numbered) != list(range(1, len(numbered) + 1)):
        raise AnnotationError(f"{class_file}: indices are not 1..{len(numbered)}")
    class_names = [name for _, name in sorted(numbered)]
    by_folder = {name.lower(): i for i, name in enumerate(class_names)}  # folder spelling varies in case
    videos = {}
    for number, line in _lines(file):
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and 1 <= int(parts[1]) <= len(class_names):
            label = int(parts[1]) - 1
        elif len(parts) == 1 and "/" in parts[0] and parts[0].split("/")[0].lower() in by_folder:
            label = by_folder[parts[0].split("/")[0].lower()]
        else:
            raise AnnotationError(f"{file}:{number}: expected 'Class/video.avi' with a class of {class_file.name}"
                                  f" and optionally its index 1..{len(class_names)}")
        videos[Path(parts[0]).stem] = label
    return Annotations(file, "ucf101", videos, class_names, True)


def read_hmdb51(folder: Path, kind: str, number: int) -> Annotations:
    """HMDB51: `<class>_test_split<N>.txt` per class, lines `video.avi 0|1|2` (1 train, 2 test, 0 unused)."""
    suffix = f"_test_split{number}.txt"
    files = {path.name[: -len(suffix)]: path for path in folder.glob(f"*{suffix}")}
    if not files:
        raise AnnotationError(f"{folder}: no *{suffix} files")
    class_names = sorted(files)  # no official index: sorted class names, as the split files sort
    wanted = {"train": "1", "test": "2"}[kind]
    videos = {}
    for label, name in enumerate(class_names):
        for line_number, line in _lines(files[name], allow_empty=True):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(f"{files[name]}:{line_number}: expected 'video.avi 0|1|2'")
            if parts[1] == wanted:
                videos[Path(parts[0]).stem] = label
    if not videos:
        raise AnnotationError(f"{folder}: no video marked {wanted} ({kind}) in its *{suffix} files")
    return Annotations(folder, "hmdb51", videos, class_names, True)


READERS = {"mmaction": read_mmaction, "csv": read_csv, "kinetics": read_kinetics, "ssv2": read_ssv2,
           "ucf101": read_ucf101}


# ---- small parsing helpers ----------------------------------------------------------


def _lines(file: Path, allow_empty: bool = False) -> list[tuple[int, str]]:
    """(1-based line number, text) of the non-blank, non-comment lines; at least one unless allow_empty."""
    lines = [(number, line) for number, line in enumerate(file.read_text().splitlines(), 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not lines and not allow_empty:
        raise AnnotationError(f"{file}: no entries")
    return lines


def _csv_rows(file: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, row) of each CSV row, after checking the header has `required` and no row is short."""
    with open(file, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [name for name in required if name not in header]
        if missing:
            raise AnnotationError(f"{file}: the header has no {', '.join(missing)} column (it reads {','.join(header)})")
        rows = []
        for row in reader:
            if any(row[name] is None for name in required):
                raise AnnotationError(f"{file}:{reader.line_num}: fewer columns than the header's {len(header)}")
            rows.append((reader.line_num, row))
    if not rows:
        raise AnnotationError(f"{file}: no rows")
    return rows


def _json(file: Path):
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise AnnotationError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None


def _whole_seconds(text: str) -> int:
    value = float(text)
    if not value.is_integer() or value < 0:
        raise ValueError(text)
    return int(value)


def _clean(path: str) -> str:
    path = path.strip()
    while path.startswith("./"):
        path = path[2:]
    return Path(path).as_posix()
