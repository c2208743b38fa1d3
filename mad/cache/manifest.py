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

FORMAT_VERSION = 2  # 2: paths as UTF-8 bytes (uint8), `grid_downsample` (was `pool`), storage modes
READABLE_VERSIONS = (1, 2)

# Settings that must match for a run to resume into an existing store: anything that changes what it holds.
IDENTITY_KEYS = ("model", "pretrained", "pretrained_sha256", "layers", "frames", "clips", "crops", "image_size",
                 "grid_downsample", "sampling", "precision", "storage", "compact")
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
    format_version: int = FORMAT_VERSION
    created: str | None = None

    @property
    def views(self) -> int:
        """Views per video: clips x crops (clip-major)."""
        return self.clips * self.crops

    @property
    def patches(self) -> int:
        return self.tokens - 1

    @property
    def side(self) -> int | None:
        """Side of the stored patch grid when it is square, else None."""
        side = math.isqrt(self.tokens - 1)
        return side if side * side == self.tokens - 1 else None

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

    def differences(self, other: "Manifest", keys=TRAINING_KEYS) -> list[str]:
        """'key: ours != theirs' for every key in `keys` on which the two differ."""
        return [f"{k}: {getattr(self, k)!r} != {getattr(other, k)!r}" for k in keys
                if getattr(self, k) != getattr(other, k)]

    def check_pair(self, other: "Manifest", other_location: str, reference: str, keys=TRAINING_KEYS) -> None:
        """Refuse, in one line, a second cache that one model cannot read beside this one (described by
        `reference`, e.g. 'the training cache cache/train')."""
        differences = self.differences(other, keys)
        if differences:
            names = ", ".join(d.split(":")[0] for d in differences)
            raise MadError(f"{other_location}: does not match {reference} on {names} ({'; '.join(differences)})")
        if self.class_names and other.class_names and self.class_names != other.class_names:
            raise MadError(f"{other_location}: class names differ from {reference}")
