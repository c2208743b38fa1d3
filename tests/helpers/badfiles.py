"""A small corpus of broken and awkward video files for testing frame extraction.

``make_bad_corpus(root)`` writes each file into ``root`` and returns
``{filename: expected}``, where expected is "fail" (must be reported as an error),
"ok" (must decode) or "any" (a decoder may recover or give up; both are fine, but
it must not crash or hang).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mad.synthetic import write_video


def _frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [T,H,W,3]: a smooth colour gradient with a bright bar sliding across it.

    Smooth content keeps the encoded files small; the bar makes frames differ.
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width] / max(height, width)
    tint = rng.uniform(0.3, 1.0, 3)
    base = (xs[..., None] * tint + ys[..., None] * (1 - tint)) * 200  # [H,W,3]
    video = np.repeat(base[None], num_frames, axis=0)
    bar = max(width // 6, 1)
    for t in range(num_frames):
        left = (t * max(width // num_frames, 1)) % max(width - bar, 1)
        video[t, :, left : left + bar] = 250
    return video.astype(np.uint8)


def _write_audio_only(path: Path, seconds: float = 0.5, rate: int = 16000) -> None:
    """An mp4 whose only stream is AAC audio (a 440 Hz tone)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        block = 1024  # AAC frame size
        for start in range(0, int(seconds * rate), block):
            t = np.arange(start, start + block) / rate
            samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]  # [channels, n]
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def make_bad_corpus(root: Path) -> dict[str, str]:
    """Write the corpus into the flat folder ``root``; return ``{filename: "fail"|"ok"|"any"}``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    rng = np.random.default_rng(1234)

    # --- unreadable: no decodable video at all
    (root / "zero_bytes.mp4").write_bytes(b"")
    expected["zero_bytes.mp4"] = "fail"

    (root / "not_a_video.mp4").write_bytes(
        b"This is a text file that was renamed to .mp4.\n" * 20 + rng.bytes(2048)
    )
    expected["not_a_video.mp4"] = "fail"

    # The mp4 muxer writes the moov (index) atom last, so the first 10% is just mdat.
    truncated = write_video(root / "truncated.mp4", _frames(24, 64, 64, seed=1), fps=8)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 10])
    expected["truncated.mp4"] = "fail"

    _write_audio_only(root / "audio_only.mp4")
    expected["audio_only.mp4"] = "fail"

    # --- damaged but possibly recoverable: garbage over 20% of the bytes mid-file
    corrupted = write_video(root / "corrupted_middle.mp4", _frames(24, 64, 64, seed=2), fps=8)
    data = bytearray(corrupted.read_bytes())
    start, length = int(len(data) * 0.4), int(len(data) * 0.2)
    data[start : start + length] = rng.bytes(length)
    corrupted.write_bytes(bytes(data))
    expected["corrupted_middle.mp4"] = "any"

    # --- awkward but valid: an extractor must decode these
    write_video(root / "short_3_frames.mp4", _frames(3, 64, 64, seed=3), fps=8)
    expected["short_3_frames.mp4"] = "ok"

    gray = _frames(12, 64, 64, seed=4).mean(axis=-1).astype(np.uint8)  # [T,H,W]
    write_video(root / "grayscale.mp4", gray, fps=8, pix_fmt="gray")  # H.264 4:0:0
    expected["grayscale.mp4"] = "ok"

    # H.264 4:2:0 needs even sizes; 4:4:4 (High 4:4:4 profile) takes odd ones.
    write_video(root / "odd_size_97x61.mp4", _frames(10, 61, 97, seed=5), fps=8, pix_fmt="yuv444p")
    expected["odd_size_97x61.mp4"] = "ok"

    irregular_ms = [0, 33, 99, 119, 186, 219, 300, 320, 420, 453, 473, 573]  # gaps 33, 66, 20, ...
    write_video(root / "vfr.mkv", _frames(len(irregular_ms), 64, 64, seed=6), fps=30, pts=irregular_ms)
    expected["vfr.mkv"] = "ok"

    # Stored landscape 160x90 with a 90 degree display matrix: players show it portrait.
    write_video(root / "portrait_rotated.mp4", _frames(10, 90, 160, seed=7), fps=8, rotation=90)
    expected["portrait_rotated.mp4"] = "ok"

    write_video(root / "tiny_16x16.avi", _frames(10, 16, 16, seed=8), fps=8, codec="mpeg4")
    expected["tiny_16x16.avi"] = "ok"

    return expected
