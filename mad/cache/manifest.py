"""The cache contract: what a store holds, as one typed record (the store's `mad` attribute).

Every reader of a store's settings goes through `Manifest`: its fields, the shapes
derived from them (`views`, `side`), and the checks that two stores can be used
together (`differences`, `check_pair`). Old stores' key names are read too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from mad.errors import MadError
from mad.options import path_or_name

FORMAT_VERSION = 2  # 2: paths as UTF-8 bytes (uint8), `grid_downsample` (was `pool`), storage modes
READABLE_VERSIONS = (1, 2)

# Settings that must match for a run to resume into an existing store: anything that changes what it holds.
IDENTITY_KEYS = ("model", "pretrained", "pretrained_sha256", "layers", "frames", "clips", "crops", "image_size",
                 "grid_downsample", "sampling", "precision", "storage", "compact", "branches", "train_views", "augment")
# What train and val (or train and eval) caches must agree on for one model to read both.
TRAINING_KEYS = ("model", "pretrained", "pretrained_sha256", "layers", "frames", "image_size", "grid_downsample",
                 "tokens", "width", "storage", "compact")
STORAGE = ("full", "compact")
_RENAMED = {"pool": "grid_downsample"}  # format 1 names
_DROPPED = ("dtype",)  # format 1 wrote "dtype": "float16" (every layer is float16)


@dataclass
class Manifest:
    model: str                      # open_clip name, or a model-config .json path (config in model_config)
    layers: list[int]               # 1-based blocks, shallow to deep
    frames: int                     # T per clip
    tokens: int                     # N = 1 + H*W stored tokens per frame (CLS first)
    width: int                      # D
    grid: list[int]                 # the model's patch grid [H, W], before grid_downsample
    clips: int = 1
    crops: int = 1
    image_size: int = 224
    patch_size: int | None = None
    grid_downsample: int = 1        # the patch grid was averaged in n x n cells before writing
    pretrained: str = "none"        # tag, checkpoint file name, or none (random weights)
    pretrained_sha256: str | None = None
    model_config: dict | None = None
    depth: int | None = None        # blocks in the model
    mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    precision: str = "bf16"         # the model's weights during extraction
    sampling: str = "tsn-middle"
    class_names: list[str] = field(default_factory=list)
    labelled_by: str = "none"
    videos_root: str | None = None
    shard_size: int = 32            # videos per shard block (one writer each)
    versions: dict = field(default_factory=dict)
    storage: str = "full"           # full: every token, float16; compact: what the branch reads, 8-bit
    compact: dict | None = None     # compact stores: what the store fixed (`mad.cache.compact`)
    branches: dict = field(default_factory=dict)  # --branches name -> what is stored for it beyond --layers
    train_views: int = 0            # augmented views per video in place of clips x crops (0: none)
    augment: dict | None = None     # train views: how they were drawn (`mad.extract.views.ViewSettings.record`)
    format_version: int = FORMAT_VERSION
    created: str | None = None

    @property
    def views(self) -> int:
        """Views per video: clips x crops (clip-major), or the augmented train views."""
        return self.train_views or self.clips * self.crops

    @property
    def frame_rows(self) -> int:
        """Rows of `frame_index` per video: one per clip (its crops share its frames), one per train view."""
        return self.train_views or self.clips

    @property
    def patches(self) -> int:
        return self.tokens - 1

    @property
    def side(self) -> int | None:
        """Side of the stored patch grid when it is square, else None."""
        side = math.isqrt(self.tokens - 1)
        return side if side * side == self.tokens - 1 else None

    @property
    def stored_levels(self) -> list[int]:
        """Every level stored as float16 tokens (`layers/<n>`): `layers` in a full store, and the levels a
        branch family reads beyond them (its `branches` entry's "levels")."""
        levels = set(self.layers) if self.storage == "full" else set()
        for need in self.branches.values():
            levels |= set(need.get("levels", ()))
        return sorted(levels)

    def check_serves(self, stored_as: str, arch: str, location: str, layers_only: bool = False) -> None:
        """Refuse, in one line that says what to re-run, a store that holds no inputs stored for `stored_as`
        (the --branches name whose inputs --arch `arch` reads). `layers_only`: it reads --layers alone, which
        every store holds (a store made before --branches records no entry)."""
        if stored_as not in self.branches and not layers_only:
            held = ",".join(self.branches)
            made = f"extracted with --branches {held}" if held else "extracted for --layers only"
            raise MadError(f"{location}: holds no inputs for --arch {arch} ({made}); "
                           f"re-run mad extract --videos {self.videos_root or 'VIDEOS'} with --branches "
                           f"{','.join([*self.branches, stored_as])} and --overwrite (or another --out)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, location: str = "") -> "Manifest":
        values = {_RENAMED.get(k, k): v for k, v in values.items() if k not in _DROPPED}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MadError(f"{location}: cache manifest has fields this mad does not know ({', '.join(unknown)}); "
                           "it was made by a newer mad")
        try:
            return cls(**values)
        except TypeError as e:
            raise MadError(f"{location}: cache manifest is incomplete ({e})") from None

    def differences(self, other: "Manifest", keys=TRAINING_KEYS) -> list[tuple[str, str, str]]:
        """(what differs, our value, theirs) for every key in `keys` on which the two differ, named by the
        `mad extract` option that sets it; a compact store's settings and the branch families are compared
        by those options, not by what follows from them (the record layout follows from --layers, ...)."""
        found = []
        for key in keys:
            ours, theirs = self._compared(key), other._compared(key)
            if ours == theirs or (key == "sampling" and self.train_views != other.train_views):  # --train-views says it
                continue
            if key == "compact":
                if self.storage == other.storage:  # else --store says it all
                    found += _compact_differences(ours or {}, theirs or {})
            elif key == "branches":
                found += _branch_differences(self.branches, other.branches)
            elif key == "augment":
                found += _augment_differences(ours or {}, theirs or {})
            else:
                found.append((OPTION_OF.get(key, key), _brief(getattr(self, key)), _brief(getattr(other, key))))
        if not found and any(self._compared(k) != other._compared(k) for k in keys):  # only derived values differ
            found.append(("the compact record layout", "stored", "another"))
        return found

    def _compared(self, key: str):
        """The value of `key` two stores are compared by: of `branches`, the entries that store something beyond
        --layers (a store made before --branches records none, one made since records every name asked for); of
        `model`, a config file's resolved path (an open_clip name as it is)."""
        value = getattr(self, key)
        if key == "model":  # a model-config .json: the same file however --model spelled it
            return path_or_name(value)
        return {k: v for k, v in value.items() if v} if key == "branches" else value

    def check_pair(self, other: "Manifest", other_location: str, reference: str, keys=TRAINING_KEYS) -> None:
        """Refuse, in one line, a second cache that one model cannot read beside this one (described by
        `reference`, e.g. 'the training cache cache/train'). The second cache is evaluated on: it must hold
        deterministic views (--clips x --crops), not random train views."""
        if other.train_views:
            raise MadError(f"{other_location}: holds {other.train_views} random --train-views views; evaluate on a "
                           "store extracted without --train-views (its --clips x --crops views are deterministic)")
        differences = self.differences(other, keys)
        if differences:
            raise MadError(f"{other_location}: does not match {reference} on "
                           + "; ".join(f"{name}: {theirs} here, {ours} there" for name, ours, theirs in differences))
        if self.class_names and other.class_names and self.class_names != other.class_names:
            raise MadError(f"{other_location}: class names differ from {reference}")
        for family in set(self.branches) & set(other.branches):  # e.g. levels read from other blocks
            if self.branches[family] != other.branches[family]:
                detail = ", ".join(f"{name} {theirs} here, {ours} there"
                                   for name, ours, theirs in _branch_differences({family: self.branches[family]},
                                                                                 {family: other.branches[family]}))
                raise MadError(f"{other_location}: holds other {family} inputs than {reference} ({detail})")


# The `mad extract` option that sets each manifest key, for refusals that say what to change.
OPTION_OF = {"model": "--model", "pretrained": "--pretrained", "pretrained_sha256": "--pretrained (file sha256)",
             "layers": "--layers", "frames": "--frames", "clips": "--clips", "crops": "--crops",
             "grid_downsample": "--grid-downsample", "precision": "--precision", "storage": "--store",
             "image_size": "image size (--model)", "tokens": "tokens (--model, --grid-downsample)",
             "width": "width (--model)", "sampling": "sampling", "train_views": "--train-views"}
_AUGMENT_OPTIONS = {"scale": "--crop-scale", "ratio": "--crop-ratio", "flip": "--flip", "seed": "--view-seed",
                    "short_side": "the crop's frame size (--model)"}
_COMPACT_OPTIONS = {"cell_size": "--cell-size", "correlation": "--correlation",
                    "correlation_groups": "correlation groups", "values": "compact values"}


def _brief(value) -> str:
    """A manifest value in a few characters: 4,8,12 for a list, a sha256's first 12 digits."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]
    text = "none" if value is None else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _compact_differences(ours: dict, theirs: dict) -> list[tuple[str, str, str]]:
    return [(option, _brief(ours.get(key)), _brief(theirs.get(key))) for key, option in _COMPACT_OPTIONS.items()
            if ours.get(key) != theirs.get(key)]


def _augment_differences(ours: dict, theirs: dict) -> list[tuple[str, str, str]]:
    """The view options that differ (--train-views itself is compared on its own)."""
    if not ours or not theirs:
        return []
    return [(option, _brief(ours.get(key)), _brief(theirs.get(key))) for key, option in _AUGMENT_OPTIONS.items()
            if ours.get(key) != theirs.get(key)]


def _branch_differences(ours: dict, theirs: dict) -> list[tuple[str, str, str]]:
    """--branches when the names storing something beyond --layers differ (`Manifest._compared` leaves out the
    entries storing nothing); else --<name>-layers (the blocks a family reads) when those do."""
    stored = [{k for k, v in branches.items() if v} for branches in (ours, theirs)]
    if stored[0] != stored[1]:
        return [("--branches", ",".join(ours) or "none", ",".join(theirs) or "none")]
    found = []
    for family in stored[0]:
        blocks = [(ours[family] or {}).get("blocks"), (theirs[family] or {}).get("blocks")]
        if blocks[0] != blocks[1]:
            found.append((f"--{family}-layers (blocks)", _brief(blocks[0]), _brief(blocks[1])))
    return found


@dataclass(frozen=True)
class StoreNeed:
    """What extraction must store for a branch family beyond --layers, in terms that name none: every token of
    the model's last `blocks` blocks and of the block before them (float16 levels), with `frozen` the name
    prefix of those blocks' frozen weights (ln_1, the q/k rows of the attention's in-projection) when the
    family recomputes their q/k. The command layer asks the registry for these (`mad.adapt.families`)."""

    blocks: int = 0
    option: str = ""            # the option that sets `blocks`, for a refusal
    frozen: str | None = None
    full_grid: bool = False     # reads every patch token: --grid-downsample must be 1

    def record(self, depth: int, heads: int, ln_eps: float) -> dict:
        """The manifest's `branches` entry: what is stored for the family (levels are 1-based block outputs;
        level 0 is the input of block 1). ViT-B/16 (12 blocks), 4 blocks: blocks 9..12, levels 8..12."""
        if not self.blocks:
            return {}
        if not 1 <= self.blocks <= depth:
            raise MadError(f"{self.option} {self.blocks}: the model has blocks 1..{depth}")
        first = depth - self.blocks + 1
        entry = {"blocks": list(range(first, depth + 1)), "levels": list(range(first - 1, depth + 1))}
        if self.frozen:  # the q/k of its blocks are recomputed per head from their inputs: heads and eps of ln_1
            entry.update(heads=heads, ln_eps=ln_eps,
                         frozen=f"frozen/{self.frozen}*: ln_1 weight and bias [L, D], q/k rows of the in-projection "
                                "weight [L, 2D, D] and bias [L, 2D]")
        return entry
