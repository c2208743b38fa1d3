"""Decoding in worker processes (spawned: forked workers can deadlock in Zarr/threads of the parent): item i is
the i-th scheduled video's frames, its deterministic views (--clips x --crops) or its augmented train views."""

from __future__ import annotations

import os
from functools import partial

import torch

from mad.cache.store import VideoResult
from mad.extract.decode import DecodeError, decode_clip
from mad.extract.views import ViewSettings, decode_views
from mad.runtime import exit_with_parent


class VideoDecodeDataset(torch.utils.data.Dataset):
    """Item i -> decoded frames of the i-th scheduled video, or the reason it failed."""

    def __init__(self, root: str, paths: list[str], indices: list[int], frames: int, clips: int, crops: int,
                 size: int, views: ViewSettings | None = None):
        self.root, self.paths, self.indices = root, paths, indices
        self.frames, self.clips, self.crops, self.size, self.views = frames, clips, crops, size, views

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[VideoResult, torch.Tensor | None]:
        """(the video's result so far, its uint8 frames [views, T, 3, S, S] or None when it failed)."""
        result = VideoResult(video=self.indices[i], path=self.paths[i], data=None, frame_index=None)
        full = os.path.join(self.root, result.path)
        try:
            if not os.path.isfile(full):
                raise DecodeError("file not found")
            if os.path.getsize(full) == 0:
                raise DecodeError("empty file (0 bytes)")
            if self.views is not None:  # augmented: drawn from the video's own generator
                clip = decode_views(full, self.frames, self.size, self.views, result.path)
            else:
                clip = decode_clip(full, self.frames, self.clips, self.crops, self.size)
        except DecodeError as e:
            result.error = str(e)
            return result, None
        except Exception as e:  # a decoder bug on one file must not stop the run
            result.error = f"{type(e).__name__}: {e}"
            return result, None
        result.frame_index, result.num_frames, result.view_box = clip.frame_index, clip.num_frames, clip.view_box
        return result, torch.from_numpy(clip.frames)


def decoded_videos(dataset: VideoDecodeDataset, workers: int):
    if workers == 0:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    # spawn, not fork: forked workers can deadlock in Zarr/threads of the parent.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers,
        multiprocessing_context="spawn", prefetch_factor=4, pin_memory=torch.cuda.is_available(),
        worker_init_fn=partial(exit_with_parent, os.getpid()),  # no orphan decoder when this run is killed
    )
    yield from loader
