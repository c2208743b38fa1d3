"""PyAV decoding: sample frame indices, decode only those frames, resize and crop.

Sampling is TSN-style: T equal segments, the middle frame of each for clip 0;
clip c of C shifts every segment's offset to (c + 1) / (C + 1). Frames are
resized (short side to the model's image size, bicubic) and centre-cropped as
open_clip's own preprocessing does; `crops=3` takes left/centre/right (or
top/centre/bottom) squares along the long side.

Decoding reads the keyframe positions first (demuxing packets, no decoding),
then for each wanted frame seeks to its keyframe only when that keyframe lies
ahead of the decoder, and decodes forward otherwise. The cost of T frames is
bounded by T keyframe intervals, not by the video's length. Files whose frame
index cannot be derived from timestamps (variable frame rate, packed B-frames)
are decoded forward from the start, counting frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import av
import numpy as np

# While the wanted frame is further ahead than this, the decoder skips frames no
# other frame references (about half of an H.264 stream); the margin covers
# B-frame reordering, so the wanted frame itself is always decoded.
SKIP_MARGIN_FRAMES = 16


class DecodeError(Exception):
    """The file cannot give us frames; the message is the reason recorded for it."""


class _TimestampsUnreliable(Exception):
    """Timestamps went backwards while decoding forward: count frames instead."""


@dataclass
class DecodedClip:
    frames: np.ndarray        # uint8 [views, T, 3, S, S], views = clips * crops (clip-major)
    frame_index: np.ndarray   # int32 [clips, T] index of each decoded frame in the video ([views, T]: train views)
    num_frames: int           # frames in the video (as estimated from the container)
    repeated: bool            # the video had fewer frames than asked for: some repeat
    view_box: np.ndarray | None = None  # train views: int32 [views, 5] crop x, y, w, h and flip (`mad.extract.views`)


def sample_frame_indices(num_frames: int, frames: int, clips: int = 1) -> np.ndarray:
    """TSN middle-of-segment indices, int64 [clips, frames]; short videos repeat frames."""
    offsets = (np.arange(clips) + 1.0) / (clips + 1.0)  # 0.5 for a single clip
    segment = num_frames / frames
    index = np.floor((np.arange(frames)[None, :] + offsets[:, None]) * segment).astype(np.int64)
    return np.clip(index, 0, max(num_frames - 1, 0))


def _resize_shape(width: int, height: int, size: int) -> tuple[int, int]:
    """Short side to `size`, keeping the aspect ratio (as torchvision's Resize(int))."""
    if width <= height:
        return size, max(size, int(size * height / width))
    return max(size, int(size * width / height)), size


def _crop_boxes(width: int, height: int, size: int, crops: int) -> list[tuple[int, int]]:
    """Top-left corners of `crops` size x size squares: centre, or spread along the long side."""
    centre = (int(round((width - size) / 2.0)), int(round((height - size) / 2.0)))
    if crops == 1:
        return [centre]
    if crops != 3:
        raise ValueError("crops must be 1 or 3")
    if width >= height:
        return [(0, centre[1]), centre, (width - size, centre[1])]
    return [(centre[0], 0), centre, (centre[0], height - size)]


def _to_rgb(frame: av.VideoFrame, size: int) -> np.ndarray:
    """Decoded frame -> uint8 [H, W, 3], short side = size, display rotation applied."""
    rotation = int(getattr(frame, "rotation", 0) or 0) % 360
    width, height = frame.width, frame.height
    if rotation in (90, 270):  # displayed sideways: the short side is the other one
        out_h, out_w = _resize_shape(height, width, size)
    else:
        out_w, out_h = _resize_shape(width, height, size)
    # swscale does the colour conversion and the (antialiased) bicubic resize in C.
    image = frame.reformat(width=out_w, height=out_h, format="rgb24", interpolation="BICUBIC").to_ndarray()
    if rotation:
        # FFmpeg's rotation is counter-clockwise degrees of the display matrix.
        image = np.ascontiguousarray(np.rot90(image, k=rotation // 90))
    return image


class _FrameReader:
    """Decode wanted frame indices from one open stream, seeking where it pays."""

    def __init__(self, container, stream, fps: float, keyframes: list[tuple[int, int]]):
        self.container, self.stream, self.fps = container, stream, fps
        self.time_base = float(stream.time_base) if stream.time_base else None
        self.start = stream.start_time or 0
        self.keyframes = keyframes  # [(frame index, pts)], empty: decode forward, counting
        self.by_timestamp = bool(keyframes)
        self.frames = None        # iterator over decoded frames
        self.position = -1        # index of the last decoded frame
        self.last = None
        self.counter = -1         # index by counting, for files without usable timestamps
        self.seeked = False       # the next frame is the first after a seek
        self.skip_mode = "DEFAULT"

    def index_of(self, pts: int) -> int:
        return int(round((pts - self.start) * self.time_base * self.fps))

    def _index(self, frame) -> int:
        self.counter += 1
        if not self.by_timestamp:
            return self.counter
        if frame.pts is None:
            raise _TimestampsUnreliable
        return self.index_of(frame.pts)

    def read(self, target: int):
        """The first frame at or after `target` (or the last frame of the stream)."""
        if self.by_timestamp:
            index, pts = max((k for k in self.keyframes if k[0] <= target), default=self.keyframes[0])
            if self.frames is None and index == self.keyframes[0][0]:
                self.frames = self.container.decode(self.stream)
            elif self.frames is None or index > self.position:  # the keyframe is ahead: jump to it
                self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
                self.frames = self.container.decode(self.stream)
                self.seeked = True
        elif self.frames is None:
            self.frames = self.container.decode(self.stream)
        while True:
            self._skip_unreferenced(self.by_timestamp and target - self.position > SKIP_MARGIN_FRAMES)
            frame = self._next()
            if frame is None or self.position >= target:
                self._skip_unreferenced(False)
                return frame if frame is not None else self.last

    def _skip_unreferenced(self, skip: bool) -> None:
        mode = "NONREF" if skip else "DEFAULT"
        if self.skip_mode != mode:
            self.stream.codec_context.skip_frame = self.skip_mode = mode

    def _next(self):
        try:
            frame = next(self.frames)
        except StopIteration:
            return None
        index = self._index(frame)
        if self.by_timestamp and not self.seeked and index <= self.position:
            raise _TimestampsUnreliable  # e.g. AVI with packed B-frames
        self.position, self.last, self.seeked = index, frame, False
        return frame


def _open_video(path: str):
    """(container, its first video stream, frames per second); DecodeError with the reason if it can't."""
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise DecodeError("not a video file (invalid data)") from None
    except (av.error.FFmpegError, OSError) as e:
        raise DecodeError(f"cannot open: {_reason(e)}") from None
    if not container.streams.video:
        container.close()
        raise DecodeError("no video stream (audio-only or data file)")
    stream = container.streams.video[0]
    return container, stream, float(stream.average_rate or stream.guessed_rate or stream.base_rate or 0)


def decode_clip(path: str, frames: int = 8, clips: int = 1, crops: int = 1, size: int = 224) -> DecodedClip:
    """Decode the sampled frames of one video; raise DecodeError with the reason if it can't."""
    rgb, frame_index, num_frames = decode_sampled(path, lambda n: sample_frame_indices(n, frames, clips), size)
    height, width = rgb.shape[2:4]
    views = [rgb[:, :, y:y + size, x:x + size] for x, y in _crop_boxes(width, height, size, crops)]
    out = np.stack(views, axis=1).reshape(clips * crops, frames, size, size, 3)  # clip-major views
    return DecodedClip(
        frames=np.ascontiguousarray(out.transpose(0, 1, 4, 2, 3)),  # [views, T, 3, S, S]
        frame_index=frame_index,
        num_frames=num_frames,
        repeated=num_frames < frames or len(set(frame_index.ravel().tolist())) < frame_index.size,
    )


def decode_sampled(path: str, sample, size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 [rows, T, H, W, 3] frames with short side `size`, int32 [rows, T] their indices, frames in the
    video) for the indices `sample(frames in the video)` chooses (int64 [rows, T]); each frame decoded once."""
    container, stream, fps = _open_video(path)
    try:
        num_frames = _frame_count(container, stream, fps)
        if num_frames <= 0:  # unknown length: count by decoding once (rare)
            num_frames = _count_frames(path)
        index = sample(num_frames)
        keyframes = _keyframes(container, stream, fps)
        container.close()  # demuxing consumed it: decode from a fresh one
        container = av.open(str(path), metadata_errors="ignore")
        stream = container.streams.video[0]
        try:
            images, decoded_index = _read_frames(container, stream, fps, index, size, keyframes)
        except _TimestampsUnreliable:
            container.close()  # start again from the first frame, counting
            container = av.open(str(path), metadata_errors="ignore")
            stream = container.streams.video[0]
            images, decoded_index = _read_frames(container, stream, fps, index, size, [])
        if not images:
            raise DecodeError("no decodable video frames")
        known = sorted(images)
        fill = lambda t: max([k for k in known if k <= t], default=known[0])  # noqa: E731
        rgb = np.stack([np.stack([images[fill(t)] for t in row]) for row in index])  # [rows, T, H, W, 3]
        frame_index = np.array([[decoded_index[fill(t)] for t in row] for row in index], dtype=np.int32)
    finally:
        container.close()
    return rgb, frame_index, num_frames


def decode_frames(path: str, frame_index, size: int) -> np.ndarray:
    """The frames numbered `frame_index` (e.g. those a cache recorded), uint8 [n, H, W, 3], short side `size`.

    No crop: for showing what was sampled (`mad report`). Raises DecodeError with the reason if it can't.
    """
    wanted = np.asarray(frame_index, dtype=np.int64).reshape(1, -1)
    container, stream, fps = _open_video(path)
    with container:
        keyframes = _keyframes(container, stream, fps)
    images = {}
    for keys in (keyframes, []):  # by timestamp; counting frames if the timestamps prove unreliable
        with av.open(str(path), metadata_errors="ignore") as container:
            try:
                images, _ = _read_frames(container, container.streams.video[0], fps, wanted, size, keys)
                break
            except _TimestampsUnreliable:
                continue
    if not images:
        raise DecodeError("no decodable video frames")
    known = sorted(images)  # frames past a broken tail repeat the last good one, as in decode_clip
    return np.stack([images[max([k for k in known if k <= t], default=known[0])] for t in wanted[0]])


def _keyframes(container, stream, fps: float) -> list[tuple[int, int]]:
    """[(frame index, pts)] of the keyframes, or [] where timestamps can't give frame indices.

    Only packets are read (no decoding): milliseconds even for long files.
    """
    nominal = float(stream.base_rate or 0)
    if not stream.time_base or fps <= 0 or abs(nominal / fps - 1) > 1e-3:
        return []  # variable frame rate: count frames instead
    start, time_base = stream.start_time or 0, float(stream.time_base)
    keyframes = []
    try:
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.size:
                if packet.pts is None:
                    return []
                keyframes.append((int(round((packet.pts - start) * time_base * fps)), packet.pts))
    except av.error.FFmpegError:
        pass  # a damaged tail: the keyframes before it still help
    return sorted(keyframes)


def _read_frames(container, stream, fps, index, size, keyframes):
    """{wanted index: rgb image} and {wanted index: decoded index}, for what decodes."""
    reader = _FrameReader(container, stream, fps, keyframes)
    images, decoded_index = {}, {}
    try:
        for target in sorted(set(index.ravel().tolist())):
            frame = reader.read(target)
            if frame is None:
                break
            images[target] = _to_rgb(frame, size)
            decoded_index[target] = reader.position
    except av.error.FFmpegError as e:
        if not images:
            raise DecodeError(f"corrupt stream: {_reason(e)}") from None
        # A broken tail: keep what decoded; later frames repeat the last good one.
    return images, decoded_index


def _frame_count(container, stream, fps: float) -> int:
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    if stream.duration and stream.time_base and fps > 0:
        return int(math.floor(float(stream.duration * stream.time_base) * fps + 0.5))
    if container.duration and fps > 0:
        return int(math.floor(container.duration / 1e6 * fps + 0.5))
    return 0


def _count_frames(path: str) -> int:
    with av.open(str(path)) as container:
        return sum(1 for p in container.demux(container.streams.video[0]) if p.size)


def _reason(error: Exception) -> str:
    text = getattr(error, "strerror", None) or str(error)
    return text.split(": '")[0].strip() or type(error).__name__
