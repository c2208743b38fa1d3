"""Augmented training views (`mad extract --train-views K`): drawn per video from a seeded generator, stored so
that each can be shown and re-made.

A view is
    T frame indices   one random frame within each of T equal segments (TSN's training sampling, MMAction2's
                      SampleFrames outside test mode), drawn anew for each view
    a crop box        random resized crop (MMAction2's RandomResizedCrop, torchvision's): area a fraction
                      `scale` of the frame, aspect ratio log-uniform in `ratio`, 10 tries, else the centred
                      square; on the frame decoded with its short side `short_side` (MMAction2's
                      Resize(-1, 256) for a 224 model), then resized to the model's square
    a flip            horizontal, with probability 1/2 when `flip` (MMAction2's Flip(flip_ratio=0.5))
A video's generator is seeded by (--view-seed, the video's path), and every view takes the same count of
draws whatever the video's size, so a repeated, sharded or resumed extraction draws the same views whichever
process makes them and in whatever order. The store keeps each view's frame indices and its box
(`view_box`: x, y, w, h in pixels of the short-side-`short_side` frame, and the flip), from which
`remake_view` makes its pixels again.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from mad.errors import MadError
from mad.extract.decode import DecodedClip, decode_frames, decode_sampled

ATTEMPTS = 10  # random resized crop: boxes tried before the centred square (MMAction2's and torchvision's 10)


@dataclass(frozen=True)
class ViewSettings:
    views: int                                   # K views per video
    scale: tuple[float, float] = (0.08, 1.0)     # crop area, fraction of the frame's
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop width / height
    flip: bool = True
    seed: int = 0
    short_side: int = 256                        # frames decoded with this short side before cropping

    def record(self) -> dict:
        """The manifest's `augment` entry: what re-makes a store's views."""
        return {"scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip, "seed": self.seed,
                "short_side": self.short_side, "sampling": "tsn-random", "crop": "random-resized"}

    @classmethod
    def from_record(cls, views: int, record: dict) -> "ViewSettings":
        return cls(views, tuple(record["scale"]), tuple(record["ratio"]), bool(record["flip"]), int(record["seed"]),
                   int(record["short_side"]))


def parse_range(flag: str, text: str, high: float | None = None) -> tuple[float, float]:
    """'LOW,HIGH' (numbers or fractions, e.g. 3/4,4/3) with 0 < LOW <= HIGH (<= `high`); else one line naming `flag`."""
    try:
        values = tuple(float(Fraction(v.strip())) for v in str(text).split(","))
    except (ValueError, ZeroDivisionError):
        values = ()
    bound = f"in (0, {high:g}]" if high is not None else "> 0"
    if len(values) != 2 or not all(math.isfinite(v) for v in values):
        raise MadError(f"{flag} {text!r}: give LOW,HIGH, two numbers {bound}")
    if not (0 < values[0] <= values[1]) or (high is not None and values[1] > high):
        raise MadError(f"{flag} {text!r}: LOW and HIGH must be {bound}, LOW <= HIGH")
    return values


def view_settings(views: int, crop_scale: str, crop_ratio: str, flip: str, seed: int, image_size: int
                  ) -> ViewSettings:
    """The settings `mad extract --train-views` options give, checked (one line naming the option)."""
    return ViewSettings(views, parse_range("--crop-scale", crop_scale, 1.0), parse_range("--crop-ratio", crop_ratio),
                        flip == "yes", seed, short_side_for(image_size))


def short_side_for(image_size: int) -> int:
    """The short side frames are decoded at before a random crop: 256 for 224 (MMAction2's), in proportion."""
    return round(image_size * 256 / 224)


def video_generator(seed: int, path: str) -> np.random.Generator:
    """The generator of one video's views: (seed, the video's path relative to the videos folder)."""
    digest = np.frombuffer(hashlib.sha256(path.encode()).digest()[:16], np.uint32)
    return np.random.default_rng([seed, *digest.tolist()])


@dataclass
class ViewDraws:
    """Every random number K views take, drawn before the video's size is known: [K, ...] uniforms in [0, 1)."""

    offsets: np.ndarray   # [K, T] position within each segment
    areas: np.ndarray     # [K, ATTEMPTS]
    ratios: np.ndarray    # [K, ATTEMPTS]
    corner: np.ndarray    # [K, 2] position of the box in the room left
    flip: np.ndarray      # [K]


def draw(rng: np.random.Generator, views: int, frames: int) -> ViewDraws:
    return ViewDraws(rng.random((views, frames)), rng.random((views, ATTEMPTS)), rng.random((views, ATTEMPTS)),
                     rng.random((views, 2)), rng.random(views))


def jittered_indices(draws: ViewDraws, num_frames: int) -> np.ndarray:
    """int64 [K, T]: a random frame within each of T equal segments; short videos repeat frames."""
    frames = draws.offsets.shape[1]
    index = np.floor((np.arange(frames)[None, :] + draws.offsets) * (num_frames / frames)).astype(np.int64)
    return np.clip(index, 0, max(num_frames - 1, 0))


def crop_boxes(draws: ViewDraws, width: int, height: int, settings: ViewSettings) -> np.ndarray:
    """int32 [K, 5]: x, y, w, h of each view's crop on a width x height frame, and its flip (0/1)."""
    log_ratio = np.log(settings.ratio)
    ratios = np.exp(log_ratio[0] + draws.ratios * (log_ratio[1] - log_ratio[0]))
    areas = (settings.scale[0] + draws.areas * (settings.scale[1] - settings.scale[0])) * width * height
    widths = np.round(np.sqrt(areas * ratios)).astype(np.int64)
    heights = np.round(np.sqrt(areas / ratios)).astype(np.int64)
    fits = (widths >= 1) & (heights >= 1) & (widths <= width) & (heights <= height)
    boxes = np.zeros((len(widths), 5), np.int32)
    for k in range(len(widths)):
        if fits[k].any():
            w, h = widths[k][fits[k].argmax()], heights[k][fits[k].argmax()]  # the first box that fits
        else:  # the centred square (MMAction2's fallback)
            w = h = min(width, height)
        x = int(draws.corner[k, 0] * (width - w + 1))
        y = int(draws.corner[k, 1] * (height - h + 1))
        boxes[k] = x, y, w, h, int(settings.flip and draws.flip[k] < 0.5)
    return boxes


def make_view(rgb: np.ndarray, box, size: int) -> np.ndarray:
    """uint8 [T, 3, size, size]: the box (x, y, w, h, flip) of frames uint8 [T, H, W, 3], resized (bilinear,
    antialiased) to size x size, flipped when the box says so."""
    x, y, w, h, flip = (int(v) for v in box)
    crop = torch.from_numpy(np.ascontiguousarray(rgb[:, y:y + h, x:x + w])).permute(0, 3, 1, 2).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    if flip:
        out = out.flip(-1)
    return out.round().clamp(0, 255).to(torch.uint8).numpy()


def decode_views(path: str, frames: int, size: int, settings: ViewSettings, video: str) -> DecodedClip:
    """K augmented views of one video (`video`: its path in the store, which seeds its generator)."""
    draws = draw(video_generator(settings.seed, video), settings.views, frames)
    rgb, frame_index, num_frames = decode_sampled(path, lambda n: jittered_indices(draws, n), settings.short_side)
    height, width = rgb.shape[2:4]
    boxes = crop_boxes(draws, width, height, settings)
    return DecodedClip(
        frames=np.stack([make_view(rgb[k], boxes[k], size) for k in range(settings.views)]),  # [K, T, 3, S, S]
        frame_index=frame_index, num_frames=num_frames,
        repeated=num_frames < frames or any(len(set(row.tolist())) < frames for row in frame_index),
        view_box=boxes,
    )


def remake_view(path: str, frame_index: np.ndarray, box: np.ndarray, size: int, short_side: int) -> np.ndarray:
    """The pixels a stored view showed the model, uint8 [T, 3, size, size], from its frame indices and box."""
    return make_view(decode_frames(path, frame_index, short_side), box, size)
