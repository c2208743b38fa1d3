"""Small synthetic caches for stage-two tests, written with the real Store API (no extractor).

Task "direction": an object vector moves along one row of the patch grid, half a
patch per frame, left to right (class 0) or right to left (class 1); a patch it
half covers shows which half (an "edge" vector with a sign), as patch embeddings
of a real frame do. Each class is the exact time reversal of the other, so anything that
averages over time (the CLS token, the `linear` and `meanpool` baselines) sees
the same distribution for both classes; only a model of temporal order can tell
them apart.

Task "appearance": the object does not move; the class is which of two object
vectors it is. Every arch can learn this one.

Tokens mimic a ViT: each patch token carries a fixed position code, the CLS token
is the mean of the patch tokens, and each level is a fixed random rotation of
the same tokens plus noise. Position codes, object vectors and rotations come
from a fixed generator, so train and val caches describe the same "model".
"""

from __future__ import annotations

import numpy as np

from mad.cache.manifest import Manifest
from mad.cache.store import Store, VideoResult

CLASS_NAMES = {"direction": ["left_to_right", "right_to_left"], "appearance": ["object_a", "object_b"]}


def synthetic_manifest(layers=(2, 4), frames=8, grid=4, width=32, clips=1, crops=1, shard_size=8,
                       task="direction") -> Manifest:
    return Manifest(model="synthetic", pretrained="none", layers=list(layers), frames=frames, clips=clips,
                    crops=crops, tokens=1 + grid * grid, width=width, image_size=16 * grid, grid=[grid, grid],
                    mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], precision="fp32", class_names=CLASS_NAMES[task],
                    shard_size=shard_size)


def synthetic_tokens(label: int, rng: np.random.Generator, layers, frames, grid, width, views, task,
                     noise=0.3) -> dict[int, np.ndarray]:
    """{layer: float32 [views, T, N, D]} for one video."""
    fixed = np.random.default_rng(1234)  # the "model": same for every cache
    position = fixed.normal(0, 1, (grid * grid, width))
    objects = fixed.normal(0, 1, (2, width)) * 2.0
    edge = fixed.normal(0, 1, width) * 2.0  # "object covers the patch's left half" minus "right half"
    rotations = [np.linalg.qr(fixed.normal(0, 1, (width, width)))[0] for _ in layers]

    out = {layer: np.zeros((views, frames, 1 + grid * grid, width), np.float32) for layer in layers}
    for view in range(views):
        patches = np.repeat(position[None], frames, axis=0) + rng.normal(0, noise, (frames, grid * grid, width))
        row = rng.integers(grid)
        if task == "direction":
            # The object steps half a patch per frame, so a patch it enters is first half covered on the
            # side it comes from (as in a real video): order shows in each token, not only across tokens.
            steps = np.arange(frames) * (2 * grid - 2) // max(frames - 1, 1)  # half-patch positions 0..2*grid-2
            if label == 1:
                steps = steps[::-1]  # exact time reversal
            for t, step in enumerate(steps):
                column, half = divmod(int(step), 2)
                if half == 0:
                    patches[t, row * grid + column] += objects[0]
                else:  # straddles two patches: right half of `column`, left half of `column + 1`
                    patches[t, row * grid + column] += 0.5 * objects[0] - edge
                    patches[t, row * grid + column + 1] += 0.5 * objects[0] + edge
        else:
            column = rng.integers(grid)
            patches[:, row * grid + column] += objects[label]
        cls = patches.mean(axis=1, keepdims=True) + rng.normal(0, noise, (frames, 1, width))
        tokens = np.concatenate([cls, patches], axis=1)  # [T, N, D]
        for layer, rotation in zip(layers, rotations):
            out[layer][view] = tokens @ rotation + rng.normal(0, noise, tokens.shape)
    return out


def make_cache(path, videos_per_class=16, layers=(2, 4), frames=8, grid=4, width=32, clips=1, crops=1,
               shard_size=8, task="direction", seed=0, failed=(), unlabelled=(), **manifest_overrides) -> Store:
    """Write a synthetic store at `path` with videos alternating class 0, 1, 0, 1, ...

    `failed` video indices are marked failed (zeros); `unlabelled` get label -1.
    """
    manifest = synthetic_manifest(layers, frames, grid, width, clips, crops, shard_size, task)
    for key, value in manifest_overrides.items():
        setattr(manifest, key, value)
    num_videos = 2 * videos_per_class
    labels = [i % 2 for i in range(num_videos)]
    stored_labels = [-1 if i in unlabelled else label for i, label in enumerate(labels)]
    paths = [f"{CLASS_NAMES[task][label]}/video{i:04d}.mp4" for i, label in enumerate(labels)]
    store = Store.create(path, manifest, paths, stored_labels)
    views = clips * crops
    rng = np.random.default_rng(seed)
    frame_index = np.tile(np.arange(frames, dtype=np.int32), (clips, 1))
    for block, start in enumerate(range(0, num_videos, shard_size)):
        results = []
        for i in range(start, min(start + shard_size, num_videos)):
            if i in failed:
                results.append(VideoResult(i, paths[i], None, None, error="synthetic failure"))
                continue
            tokens = synthetic_tokens(labels[i], rng, layers, frames, grid, width, views, task)
            data = {f"layers/{layer}": values for layer, values in tokens.items()}
            results.append(VideoResult(i, paths[i], data, frame_index, num_frames=frames))
        store.write_block(block, results)
    return store
