"""Synthetic "temporal order only" videos for ``mad demo``, and the project's one video writer.

Six classes come in three pairs. In each pair the second class is the exact time
reversal of the first: a clip of the second class is drawn from the same parameter
distribution as the first and then written with its frame list reversed. A model
that pools frames without regard to order (mean of per-frame features) therefore
sees identically distributed inputs for both classes of a pair and cannot beat
chance within it. It can tell the pairs apart (by their motion's footprint, and by
a background tint that each pair has), so its top-1 should land near 50%;
only a model that uses temporal order can get them all.
"""

from __future__ import annotations

import zlib
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

# (forward class, its time reversal)
PAIRS: tuple[tuple[str, str], ...] = (
    ("moving_right", "moving_left"),
    ("growing", "shrinking"),
    ("orbiting_clockwise", "orbiting_anticlockwise"),
)
# Sorted, so the index in classes.txt matches a sorted listing of the class folders.
CLASSES: tuple[str, ...] = tuple(sorted(name for pair in PAIRS for name in pair))
_FORWARD_OF = {rev: fwd for fwd, rev in PAIRS} | {fwd: fwd for fwd, _ in PAIRS}
SHAPES = ("square", "disc", "triangle")
# make_demo_videos(placement=...): (object scale, shift right, shift down as fractions of the frame) per split.
# "shifted": training objects at half size in the top-left quarter, validation objects as drawn (full size,
# about the centre): a model must recognise an action at a position and scale it never saw in training.
PLACEMENTS = {"same": {"train": (1.0, 0.0, 0.0), "val": (1.0, 0.0, 0.0)},
              "shifted": {"train": (0.5, -0.22, -0.22), "val": (1.0, 0.0, 0.0)}}


# --------------------------------------------------------------------------- writing


def _pick_codec(preferred: str) -> str:
    """``preferred`` if this FFmpeg build can encode with it, else ``mpeg4``."""
    import av

    try:
        av.codec.Codec(preferred, "w")
        return preferred
    except Exception:  # av.codec.codec.UnknownCodecError, or a build without encoders
        return "mpeg4"


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: int = 8,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    container_options: dict | None = None,
    pts: Sequence[int] | None = None,
    *,
    codec_options: dict | None = None,
    rotation: int | None = None,
) -> Path:
    """Encode ``frames`` (uint8, [T,H,W,3] RGB or [T,H,W] gray) to ``path``; return the path.

    ``codec`` falls back to ``mpeg4`` (yuv420p) if the build lacks it. ``pts`` are
    per-frame timestamps in milliseconds (variable frame rate); without it frame i
    is shown at i/fps. ``rotation`` (degrees counter-clockwise) is written as the
    stream's display matrix. The container format follows the file suffix.
    """
    import av

    path = Path(path)
    frames = np.asarray(frames, dtype=np.uint8)
    gray_input = frames.ndim == 3
    num_frames, height, width = frames.shape[:3]
    chosen = _pick_codec(codec)
    if chosen != codec:
        pix_fmt, codec_options = "yuv420p", None
    if codec_options is None and chosen == "libx264":
        # Near-lossless, so object edges and small motions survive compression.
        # mbtree off: with it, x264 encoded the same frames differently from run to
        # run (seen at 32-96 px, even single-threaded), so decoded frames were not
        # reproducible. One thread: these clips are too small to gain from more.
        codec_options = {"preset": "veryfast", "crf": "16", "threads": "1", "x264-params": "mbtree=0"}

    time_base = Fraction(1, 1000) if pts is not None else Fraction(1, fps)
    if pts is None:
        pts = range(num_frames)
    with av.open(str(path), mode="w", options=container_options or {}) as container:
        stream = container.add_stream(chosen, rate=fps, options=codec_options or {})
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.time_base = time_base
        stream.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        for image, stamp in zip(frames, pts):
            frame = av.VideoFrame.from_ndarray(image, format="gray" if gray_input else "rgb24")
            frame.pts, frame.time_base = int(stamp), time_base
            container.mux(stream.encode(frame))  # encode() converts to the stream's pix_fmt
        container.mux(stream.encode(None))  # flush delayed (B-)frames
    return path


# --------------------------------------------------------------------------- drawing


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[size,size] field in [-1,1]: a random cells x cells grid, bilinearly upsampled."""
    grid = rng.uniform(-1.0, 1.0, (cells + 1, cells + 1))
    pos = np.linspace(0, cells, size)
    i0 = np.minimum(pos.astype(int), cells - 1)
    frac = pos - i0
    rows = grid[i0] * (1 - frac)[:, None] + grid[i0 + 1] * frac[:, None]  # [size, cells+1]
    return rows[:, i0] * (1 - frac) + rows[:, i0 + 1] * frac


def _background(rng: np.random.Generator, size: int, tint: int) -> tuple[np.ndarray, np.ndarray]:
    """A static [size,size,3] float background and its mean colour.

    Its base colour leans to channel ``tint`` (red, green or blue: one per class
    pair), a static cue that a model without time can use to tell the pairs apart.
    Either a linear gradient between two nearby colours in a random direction, or a
    base colour modulated by a low-frequency texture (per channel).
    """
    base = rng.uniform(40, 120, 3)
    base[tint] = rng.uniform(150, 215)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        coords = np.linspace(-1, 1, size)
        ramp = np.cos(angle) * coords[None, :] + np.sin(angle) * coords[:, None]  # [H,W] in ~[-1.4,1.4]
        delta = rng.uniform(-35, 35, 3)
        image = base + ramp[..., None] * delta
    else:
        cells = int(rng.integers(2, 5))
        texture = np.stack([_smooth_noise(rng, size, cells) for _ in range(3)], axis=-1)
        image = base + texture * rng.uniform(15, 35)
    return np.clip(image, 0, 255), base


def _object_colour(rng: np.random.Generator, background_mean: np.ndarray) -> np.ndarray:
    """An RGB colour far (>= 150 in RGB distance) from the background's mean colour."""
    for _ in range(32):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - background_mean) >= 150:
            return colour
    return np.where(background_mean > 127, 10.0, 245.0)  # saturated complement


def _shape_field(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shape "radius" at object-frame coordinates (u, v): <= 1 inside, grows outward."""
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v))
    if shape == "disc":
        return np.sqrt(u * u + v * v)
    # Equilateral triangle, inradius 0.625 (circumradius 1.25, area ~half a square's);
    # outward edge normals at 90, 210 and 330 degrees, so one vertex points to -v.
    normals = np.deg2rad([90.0, 210.0, 330.0])
    return np.max([u * np.cos(a) + v * np.sin(a) for a in normals], axis=0) / 0.625


def _render(
    background: np.ndarray,
    shape: str,
    colour: np.ndarray,
    accent: np.ndarray,
    cx: np.ndarray,
    cy: np.ndarray,
    half: np.ndarray,
    angle: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw the object over ``background`` for each frame; return uint8 [T,H,W,3].

    ``cx, cy, half, angle`` are [T] arrays (pixels, pixels, pixels, radians). Angle
    grows clockwise on screen (image y points down). Edges are anti-aliased over
    ~1 px so sub-pixel motion still changes the pixels.
    """
    size = background.shape[0]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx = xs[None] - cx[:, None, None]  # [T,H,W]
    dy = ys[None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    scale = half[:, None, None]
    u = (cos * dx + sin * dy) / scale  # rotate pixels by -angle into the object frame
    v = (-sin * dx + cos * dy) / scale
    field = _shape_field(shape, u, v)
    alpha = np.clip((1.0 - field) * scale + 0.5, 0.0, 1.0)[..., None]  # [T,H,W,1]
    # Paint one quadrant (u>0, v>0) in a second colour, so even a disc shows its rotation.
    fill = np.where(((u > 0) & (v > 0))[..., None], accent, colour)
    video = background[None] * (1 - alpha) + fill * alpha
    video += rng.normal(0.0, 3.0, video.shape)  # slight sensor noise, i.i.d. per frame
    return np.clip(np.rint(video), 0, 255).astype(np.uint8)


def _trajectory(
    forward: str, rng: np.random.Generator, num_frames: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame (cx, cy, half, angle) for the forward class of a pair, each [T]."""
    t = np.arange(num_frames, dtype=np.float64)
    steps = max(num_frames - 1, 1)
    half = np.full(num_frames, rng.uniform(0.13, 0.17) * size)  # side ~26-34% of the frame
    angle = np.full(num_frames, rng.uniform(0, 2 * np.pi))
    # Small drift whose distribution is symmetric, so reversing it leaks nothing.
    drift = rng.uniform(-0.004, 0.004, 2) * size
    cx = rng.uniform(0.4, 0.6) * size + drift[0] * t
    cy = rng.uniform(0.4, 0.6) * size + drift[1] * t

    if forward == "moving_right":
        travel = rng.uniform(0.45, 0.6) * size
        start = rng.uniform(half[0], size - half[0] - travel)
        cx = start + travel * t / steps
    elif forward == "growing":
        small, large = rng.uniform(0.07, 0.10), rng.uniform(0.19, 0.23)
        half = size * small * (large / small) ** (t / steps)  # geometric: constant rate
    elif forward == "orbiting_clockwise":
        # Around the frame centre, 180-270 degrees in the clip: 22-34 degrees between
        # the 8 sampled frames: ~1.5 patches of travel on the demo ViT's 14x14 grid, under one
        # cell of the branch's pooled 7x7.
        half = np.full(num_frames, rng.uniform(0.10, 0.13) * size)
        radius = rng.uniform(0.20, 0.25) * size
        theta = rng.uniform(0, 2 * np.pi) + np.deg2rad(rng.uniform(180, 270)) * t / steps  # clockwise: y points down
        cx = size / 2 + radius * np.cos(theta)
        cy = size / 2 + radius * np.sin(theta)
    else:
        raise ValueError(f"not a forward class: {forward}")
    return cx, cy, half, angle


def make_clip(class_name: str, rng: np.random.Generator, num_frames: int = 16, size: int = 96,
              placement: tuple[float, float, float] = (1.0, 0.0, 0.0)) -> np.ndarray:
    """One uint8 [T,H,W,3] clip of ``class_name``, drawn from ``rng``; ``placement`` (scale, shift x, shift y)
    scales the object and its path about the frame's centre, then shifts them (fractions of the frame)."""
    forward = _FORWARD_OF[class_name]
    background, base = _background(rng, size, tint=[fwd for fwd, _ in PAIRS].index(forward))
    colour = _object_colour(rng, base)
    accent = np.where(colour > 127, colour - 110, colour + 110)  # visible against the fill
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    cx, cy, half, angle = _trajectory(forward, rng, num_frames, size)
    scale, shift_x, shift_y = placement  # no random draw: (1, 0, 0) leaves the clip as it was
    cx, cy = size / 2 + (cx - size / 2) * scale + shift_x * size, size / 2 + (cy - size / 2) * scale + shift_y * size
    half = half * scale
    video = _render(background, shape, colour, accent, cx, cy, half, angle, rng)
    return video if class_name == forward else video[::-1].copy()


# --------------------------------------------------------------------------- dataset


def make_demo_videos(
    root: str | Path,
    videos_per_class: int = 24,
    val_per_class: int = 8,
    num_frames: int = 16,
    size: int = 96,
    fps: int = 8,
    seed: int = 0,
    placement: str = "same",
) -> dict:
    """Write the demo dataset as ``root/{train,val}/<class>/<clip>.mp4`` plus ``root/classes.txt``.

    Each clip has its own generator seeded from (seed, split, class, index), so a
    clip's frames do not depend on how many other clips are made. Returns
    ``{"train": Path, "val": Path, "classes": [names in classes.txt order]}``. ``placement``: "same" (both
    splits drawn alike) or "shifted" (`PLACEMENTS`: validation objects at other positions and scales).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: use {' or '.join(PLACEMENTS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    counts = {"train": videos_per_class, "val": val_per_class}
    for split_id, (split, count) in enumerate(counts.items()):
        for class_name in CLASSES:
            folder = root / split / class_name
            folder.mkdir(parents=True, exist_ok=True)
            class_key = zlib.crc32(class_name.encode())  # stable across runs, unlike hash()
            for index in range(count):
                rng = np.random.default_rng([seed, split_id, class_key, index])
                clip = make_clip(class_name, rng, num_frames, size, PLACEMENTS[placement][split])
                write_video(folder / f"{class_name}_{split}_{index:04d}.mp4", clip, fps)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return {"train": root / "train", "val": root / "val", "classes": list(CLASSES)}
