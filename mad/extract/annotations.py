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

None of these formats has comments: every non-blank line is an entry (HMDB51 has clips named `#20_...`).
Nothing is dropped or renumbered quietly: a video listed twice with two labels is left out with a warning,
a list numbered from 1 where its format numbers from 0 is an error, and so is a UCF101 list without
the classInd.txt that numbers it.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from mad.extract.annotation_files import (AnnotationError, Listing, clean_path, csv_rows, is_int, lines,
                                          read_json, read_text, whole_seconds)

FORMATS = ("auto", "mmaction", "csv", "kinetics", "ssv2", "ucf101", "hmdb51")
SSV2_LABELS = ("something-something-v2-labels.json", "labels.json")  # 20BN's name, then Qualcomm's download


@dataclass
class Annotations:
    file: Path                  # what --labels named (for messages)
    format: str
    videos: dict[str, int]      # listed video -> class index (-1: unlabelled)
    class_names: list[str]
    by_stem: bool = False       # keys are file names without extension, found anywhere under --videos;
                                # else paths relative to --videos
    naming: str = ""            # how the dataset names a clip file, for messages (Kinetics: <youtube_id>_...)


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
    """The format of an annotation file or folder, from its name, its neighbours and its contents."""
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
        try:
            with open(labels, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's BOM
                header = next(csv.reader(f), [])
        except UnicodeDecodeError as e:
            raise AnnotationError(f"{labels}: not UTF-8 text (byte {e.start})") from None
        return "kinetics" if "youtube_id" in [name.strip() for name in header] else "csv"
    if labels.name == "classInd.txt":
        raise AnnotationError(f"{labels}: UCF101's class list; pass trainlist0N.txt or testlist0N.txt beside it")
    has_class_ind = (labels.parent / "classInd.txt").is_file()
    if re.fullmatch(r"(train|test)list\d+\.txt", labels.name) and has_class_ind:
        return "ucf101"
    if re.fullmatch(r".+_test_split\d\.txt", labels.name):
        raise AnnotationError(f"{labels}: one class of HMDB51's split files; pass their folder and "
                              "--labels-split train1 (or test1, train2, ...)")
    ucf = _ucf101_labels(labels)
    labelled = ucf is not None and None not in ucf
    # MMAction2's own UCF101 lists have these lines too, numbered from 0: those are MMAction2 lists.
    if ucf is not None and not (labelled and min(ucf) == 0):
        if has_class_ind:
            return "ucf101"
        raise AnnotationError(
            f"{labels}: a UCF101 split list (Class/v_Class_gNN_cNN.avi{' N' if labelled else ''}) with no "
            f"classInd.txt beside it; put UCF101's classInd.txt (ucfTrainTestlist/) in {labels.parent}: "
            "trainlistNN.txt's labels are its 1-based indices, testlistNN.txt has none and is labelled by it")
    return "mmaction"


_UCF101_LINE = re.compile(r"([^/\s]+)/v_([^/\s]+)_g\d+_c\d+\.avi(?:\s+(\d+))?", re.IGNORECASE)


def _ucf101_labels(file: Path) -> list[int | None] | None:
    """The labels (None: no label) of a list whose every line reads like UCF101's, else None."""
    labels = []
    for _, line in lines(file, allow_empty=True):
        match = _UCF101_LINE.fullmatch(line.strip())
        if not match or match[1].lower() != match[2].lower():  # the folder is the class in the file name
            return None
        labels.append(None if match[3] is None else int(match[3]))
    return labels or None


def _parse_split(folder: Path, split: str | None) -> tuple[str, int]:
    match = re.fullmatch(r"(train|test)([1-3])", split or "")
    if not match:
        raise AnnotationError(f"{folder}: a folder of split files needs --labels-split train1, train2, train3, "
                              f"test1, test2 or test3{f' (got {split!r})' if split else ''}")
    return match[1], int(match[2])


# ---- one reader per format ----------------------------------------------------------


def read_mmaction(file: Path) -> Annotations:
    """MMAction2's video list: `path label` per line; class names from label_map.txt beside it (else numbers)."""
    listing = Listing(file, "line")
    for number, line in lines(file):
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and not is_int(parts[1]):
            raise AnnotationError(f"{file}:{number}: expected 'path label' with an integer label")
        label = int(parts[1]) if len(parts) == 2 else -1
        if label < 0 and len(parts) == 2:
            raise AnnotationError(f"{file}:{number}: label {label}; classes are numbered from 0 "
                                  "(leave the label out for an unlabelled video)")
        listing.add(clean_path(parts[0]), label, number)
    videos = listing.finish()
    label_map = file.parent / "label_map.txt"
    if label_map.is_file():
        class_names = _label_map(label_map)
        labels = {label for label in videos.values() if label >= 0}
        if labels and min(labels) == 1 and max(labels) == len(class_names):
            raise AnnotationError(f"{file}: labels run 1..{max(labels)} for the {len(class_names)} names of "
                                  f"{label_map}, but MMAction2 numbers classes from 0 (the map's first line is "
                                  "label 0); renumber them from 0")
    else:
        _check_numbered_from_0(file, videos.values(), "or put label_map.txt beside it (one class name per line, "
                               "the first for label 0) if class 0 just has no video in this list")
        class_names = [str(i) for i in range(max([*videos.values(), -1]) + 1)]
    bad = [label for label in videos.values() if label >= len(class_names)]
    if bad:
        raise AnnotationError(f"{file}: label {bad[0]} has no name in {label_map} ({len(class_names)} classes)")
    return Annotations(file, "mmaction", videos, class_names)


def read_csv(file: Path) -> Annotations:
    """A `path,label` CSV: integer labels (names are the numbers) or class names (sorted into numbers)."""
    rows = []  # (line, path, label)
    for number, row in csv_rows(file, required=("path",)):
        path, label = row["path"].strip(), (row.get("label") or "").strip()
        if path:
            rows.append((number, clean_path(path), label))
        elif any(isinstance(value, str) and value.strip() for value in row.values()):
            raise AnnotationError(f"{file}:{number}: a row with no path")
    numbers = [(number, label) for number, _, label in rows if is_int(label)]
    names = [(number, label) for number, _, label in rows if label and not is_int(label)]
    if numbers and names:  # e.g. a typo in a numbered column: sorting them as names would renumber every class
        raise AnnotationError(f"{file}:{names[0][0]}: label {names[0][1]!r} is a name, but line {numbers[0][0]} "
                              f"gives a number ({numbers[0][1]}); a label column holds class numbers or names")
    negative = [(number, label) for number, label in numbers if int(label) < 0]
    if negative:
        raise AnnotationError(f"{file}:{negative[0][0]}: label {negative[0][1]}; classes are numbered from 0 "
                              "(leave the label empty for an unlabelled video)")
    if names:
        class_names = sorted({label for _, label in names})
        index = {name: i for i, name in enumerate(class_names)}
    else:
        class_names = [str(i) for i in range(max([int(label) for _, label in numbers] + [-1]) + 1)]
        index = {name: int(name) for _, name in numbers}
    listing = Listing(file, "line")
    for number, path, label in rows:
        listing.add(path, index[label] if label else -1, number)
    videos = listing.finish()
    if not names:
        _check_numbered_from_0(file, videos.values(), "or give class names in the label column")
    return Annotations(file, "csv", videos, class_names)


def read_kinetics(file: Path) -> Annotations:
    """Kinetics-400/600/700 CSV; its official class index is the sorted class names."""
    rows = csv_rows(file, required=("youtube_id", "time_start", "time_end"))
    clips = []  # (line, clip file stem, label name)
    for number, row in rows:
        try:
            start, end = (whole_seconds(row[key]) for key in ("time_start", "time_end"))
        except ValueError:
            raise AnnotationError(f"{file}:{number}: time_start {row['time_start']!r} and time_end "
                                  f"{row['time_end']!r} must be whole seconds") from None
        if not row["youtube_id"].strip():
            raise AnnotationError(f"{file}:{number}: no youtube_id")
        clips.append((number, f"{row['youtube_id'].strip()}_{start:06d}_{end:06d}", (row.get("label") or "").strip()))
    class_names = sorted({label for _, _, label in clips if label})  # a test CSV has no label column: unlabelled
    index = {name: i for i, name in enumerate(class_names)}
    listing = Listing(file, "line")
    for number, stem, label in clips:
        listing.add(stem, index.get(label, -1), number)
    return Annotations(file, "kinetics", listing.finish(), class_names, True,
                       "<youtube_id>_<time_start:06d>_<time_end:06d>")


def read_ssv2(file: Path) -> Annotations:
    """Something-Something v2: the train/validation(/test) JSON, classes from the labels JSON beside it."""
    items = read_json(file)
    if isinstance(items, dict):
        raise AnnotationError(f"{file}: a class list, not a video list; pass train.json or validation.json")
    if not isinstance(items, list) or not all(isinstance(item, dict) and "id" in item for item in items):
        raise AnnotationError(f"{file}: expected a JSON list of {{\"id\", \"template\", ...}} entries")
    labels_file = next((file.parent / name for name in SSV2_LABELS if (file.parent / name).is_file()), None)
    if labels_file is None:
        raise AnnotationError(f"{file}: no labels JSON beside it ({' or '.join(SSV2_LABELS)})")
    templates = read_json(labels_file)
    try:
        templates = {name: int(index) for name, index in templates.items()}
    except (AttributeError, TypeError, ValueError):
        raise AnnotationError(f"{labels_file}: expected {{\"Template name\": \"index\", ...}}") from None
    class_names = sorted(templates, key=templates.get)
    if sorted(templates.values()) != list(range(len(templates))):
        raise AnnotationError(f"{labels_file}: indices are not 0..{len(templates) - 1}")
    listing = Listing(file, "entry")
    for number, item in enumerate(items, 1):
        label = -1  # the test JSON has ids only
        if "template" in item:
            # The labels JSON writes each template with its placeholders unbracketed: "[something]" -> "something".
            name = item["template"].replace("[", "").replace("]", "")
            if name not in templates:
                raise AnnotationError(f"{file}: entry {number} (id {item['id']}): template {name!r} is not in "
                                      f"{labels_file.name}")
            label = templates[name]
        listing.add(str(item["id"]), label, number)
    return Annotations(file, "ssv2", listing.finish(), class_names, True, "<id>")


def read_ucf101(file: Path) -> Annotations:
    """UCF101: trainlist0N.txt (`Class/v_Class_gGG_cCC.avi N`, 1-based) or testlist0N.txt (class from the folder)."""
    class_file = file.parent / "classInd.txt"
    if not class_file.is_file():
        raise AnnotationError(f"{file}: no classInd.txt beside it")
    numbered = []
    for number, line in lines(class_file):
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise AnnotationError(f"{class_file}:{number}: expected 'index ClassName'")
        numbered.append((int(parts[0]), parts[1]))
    if sorted(i for i, _ in numbered) != list(range(1, len(numbered) + 1)):
        raise AnnotationError(f"{class_file}: indices are not 1..{len(numbered)}")
    class_names = [name for _, name in sorted(numbered)]
    by_folder = {name.lower(): i for i, name in enumerate(class_names)}  # folder spelling varies in case
    listing = Listing(file, "line")
    for number, line in lines(file):
        parts = line.split()
        folder = parts[0].split("/")[0].lower() if "/" in parts[0] else None
        if len(parts) == 2 and parts[1].isdigit() and 1 <= int(parts[1]) <= len(class_names):
            label = int(parts[1]) - 1
            if folder is not None and folder != class_names[label].lower():
                raise AnnotationError(f"{file}:{number}: label {parts[1]} is {class_names[label]} in "
                                      f"{class_file.name}, but the video is in {parts[0].split('/')[0]}/")
        elif len(parts) == 1 and folder in by_folder:
            label = by_folder[folder]
        else:
            raise AnnotationError(f"{file}:{number}: expected 'Class/video.avi' with a class of {class_file.name}"
                                  f" and optionally its index 1..{len(class_names)}")
        listing.add(Path(parts[0]).stem, label, number)
    return Annotations(file, "ucf101", listing.finish(), class_names, True)


def read_hmdb51(folder: Path, kind: str, number: int) -> Annotations:
    """HMDB51: `<class>_test_split<N>.txt` per class, lines `video.avi 0|1|2` (1 train, 2 test, 0 unused)."""
    suffix = f"_test_split{number}.txt"
    files = {path.name[: -len(suffix)]: path for path in folder.glob(f"*{suffix}")
             if not path.name.startswith(".")}  # not a class: a copy's hidden ._name (macOS resource forks)
    if not files:
        raise AnnotationError(f"{folder}: no *{suffix} files")
    class_names = sorted(files)  # no official index: sorted class names, as the split files sort
    wanted = {"train": "1", "test": "2"}[kind]
    listing = Listing(folder, "line")
    for label, name in enumerate(class_names):
        for line_number, line in lines(files[name], allow_empty=True):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(f"{files[name]}:{line_number}: expected 'video.avi 0|1|2'")
            if parts[1] == wanted:
                listing.add(Path(parts[0]).stem, label, f"{files[name].name}:{line_number}")
    videos = listing.finish()
    if not videos:
        raise AnnotationError(f"{folder}: no video marked {wanted} ({kind}) in its *{suffix} files")
    return Annotations(folder, "hmdb51", videos, class_names, True)


READERS = {"mmaction": read_mmaction, "csv": read_csv, "kinetics": read_kinetics, "ssv2": read_ssv2,
           "ucf101": read_ucf101}


# ---- small parsing helpers ----------------------------------------------------------


def _check_numbered_from_0(file: Path, labels, remedy: str) -> None:
    """Refuse labels 1..K (every one used, no 0): a 1-based list read as 0-based shifts every class name."""
    used = sorted({label for label in labels if label >= 0})
    if len(used) > 1 and used == list(range(1, len(used) + 1)):
        raise AnnotationError(f"{file}: labels run 1..{used[-1]} with no 0, but classes are numbered from 0 here "
                              f"(class 0 would have no video, class {used[-1]} none after it); renumber them "
                              f"from 0, {remedy}")


def _label_map(file: Path) -> list[str]:
    """label_map.txt: line i names class i - 1; a blank line inside would shift every name after it."""
    names = [line.strip() for line in read_text(file).splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise AnnotationError(f"{file}:{names.index('') + 1}: an empty class name (line N names class N-1)")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise AnnotationError(f"{file}: class name {repeated!r} is given twice")
    if not names:
        raise AnnotationError(f"{file}: no class names")
    return names
