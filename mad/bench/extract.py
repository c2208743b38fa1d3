"""`mad bench extract`: where extraction time goes, and how close the pipeline gets to its bound.

Measured side by side in one process on the same videos:
- decode only: the decoding workers alone (same worker count as a real run);
- model only: the frozen model on frames decoded beforehand;
- full: `mad extract` into a fresh store (worker start-up, writes and bookkeeping included).
On a CPU the decoder and the model share the cores, so the bound is the serial one,
1 / (1/decode + 1/model): the full run should reach 0.9 of it (writes hidden). On a
GPU they overlap, and the full run should reach 0.85 of min(decode, model).
Also: the decode time of T frames from a short and a long clip of the same
encoding (the short one is the long one's first seconds, stream-copied).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import shutil
import tempfile
import time
from pathlib import Path

import av
import torch

from mad.extract.backbone import load_backbone
from mad.extract.decode import decode_clip
from mad.extract.run import ExtractConfig, extract
from mad.extract.workers import VideoDecodeDataset, decoded_videos
from mad.bench import video_subset
from mad.errors import MadError
from mad.options import at_least, check_counts, check_number
from mad.extract.videos import find_videos
from mad.runtime import machine_info, resolve_device


class BenchExtractError(MadError):
    """An extraction the benchmark started failed (message says which and why)."""


def _cut(source: Path, dest: Path, seconds: float) -> None:
    """Copy the first `seconds` of a video stream without re-encoding (same encoding, shorter)."""
    with av.open(str(source)) as src, av.open(str(dest), "w") as out:
        stream = src.streams.video[0]
        copy = out.add_stream_from_template(stream)
        for packet in src.demux(stream):
            if packet.dts is None:
                continue
            if packet.pts is not None and float(packet.pts * stream.time_base) > seconds:
                break
            packet.stream = copy
            out.mux(packet)


def _decode_all(path: Path) -> None:
    with av.open(str(path)) as container:
        for _ in container.decode(video=0):
            pass


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm the file cache
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def short_vs_long_decode(long_clip: Path, frames: int, size: int, cuts=(5.0, 10.0, 20.0), repeats: int = 5) -> dict:
    """Decode time of T sampled frames from cuts of one clip (same encoding) and from the whole clip.

    The cost is bounded by T keyframe intervals; a cut shorter than that costs
    less simply because it has fewer frames in all. `decode_all` is the naive
    baseline: every frame of the whole clip.
    """
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seconds in cuts:
            clip = Path(tmp) / f"cut{seconds:g}{long_clip.suffix}"
            _cut(long_clip, clip, seconds)
            rows.append((f"first {seconds:g} s", clip))
        rows.append(("whole clip", long_clip))
        curve = []
        for name, clip in rows:
            decoded = decode_clip(str(clip), frames, 1, 1, size)
            seconds = _median_seconds(lambda: decode_clip(str(clip), frames, 1, 1, size), repeats)
            curve.append({"clip": name, "frames_in_video": decoded.num_frames, "seconds": seconds})
    decode_all = _median_seconds(lambda: _decode_all(long_clip), max(1, repeats // 2))
    return {"curve": curve, "decode_all_frames_seconds": decode_all,
            "ratio_long_over_short": curve[-1]["seconds"] / curve[0]["seconds"],
            "ratio_long_over_decode_all": curve[-1]["seconds"] / decode_all}


def bench_extract(videos: str, model: str = "ViT-B-16", layers: str = "4,8,12", frames: int = 8,
                  limit: int = 48, batch_size: int = 4, workers: int = -1, device: str = "auto",
                  precision: str = "bf16", long_clip: str | None = None, out: str | None = None,
                  repeats: int = 3) -> dict:
    """Decode only, model only and the full pipeline on the same `limit` clips (the folder's list
    repeated past its end), `repeats` times; rates, the CPU-time bound and the ratios against it,
    each as min / median / max over the repeats."""
    check_counts(frames=frames, limit=limit, batch_size=batch_size, repeats=repeats)
    check_number("workers", workers, at_least(-1, "-1: automatic"))
    device = resolve_device(device)
    workers = workers if workers >= 0 else (1 if device.type == "cpu" else min(8, os.cpu_count() or 1))
    backbone = load_backbone(model, "none", layers, device, precision)
    size = backbone.info.image_size
    with tempfile.TemporaryDirectory() as tmp:
        root = video_subset(videos, limit, Path(tmp) / "videos")
        paths = find_videos(root).paths
        config = ExtractConfig(videos=str(root), out="", layers=layers, model=model, pretrained="none",
                               frames=frames, batch_size=batch_size, workers=workers, device=str(device),
                               precision=precision, progress=False,
                               store="full")  # what the model-only stage computes, exactly
        runs = [_one_run(backbone, config, paths, Path(tmp) / f"cache{i}", device) for i in range(repeats)]
    result = {
        "machine": machine_info(device), "date": datetime.date.today().isoformat(),
        "settings": {"videos": videos, "clips": len(paths), "model": model, "weights": "random", "layers": layers,
                     "frames": frames, "batch_size": batch_size, "workers": workers, "device": str(device),
                     "precision": precision, "repeats": repeats},
        "runs": runs,
        **{key: _spread([r[key] for r in runs]) for key in runs[0]},
    }
    if long_clip is None:
        lengths = {p: _duration(Path(videos) / p) for p in find_videos(videos).paths[:limit]}
        long_clip = str(Path(videos) / max(lengths, key=lengths.get))
    result["short_vs_long"] = {"clip": long_clip, "max_keyframe_interval": _max_keyframe_interval(Path(long_clip)),
                               **short_vs_long_decode(Path(long_clip), frames, size)}
    _print(result)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        name = f"extract_{device.type.replace('cuda', 'gpu')}_{Path(model).stem}.json"
        (Path(out) / name).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "max": values[-1]}


def _one_run(backbone, config: ExtractConfig, paths: list[str], cache: Path, device: torch.device) -> dict:
    """One side-by-side measurement: decode only, model only, then the full pipeline into a fresh store."""
    # 1. decode only, through the same worker pool a real run uses; CPU time of this process and its workers
    dataset = VideoDecodeDataset(config.videos, paths, list(range(len(paths))), config.frames, 1, 1,
                                 backbone.info.image_size)
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    decoded = list(decoded_videos(dataset, config.workers))
    decode_seconds = time.perf_counter() - started
    decode_cpu = _cpu_seconds() - cpu_started  # the workers have exited: their CPU time is counted

    # 2. model only, on those frames, in the batches a real run uses
    clips = [frames for result, frames in decoded if result.error is None]
    del decoded
    backbone(clips[0].flatten(0, 1).to(device))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    cpu_started = _cpu_seconds()
    started = time.perf_counter()
    for i in range(0, len(clips), config.batch_size):
        levels = backbone(torch.cat([c.flatten(0, 1) for c in clips[i:i + config.batch_size]]).to(device))
        [level.to(torch.float16).cpu() for level in levels]
    model_seconds = time.perf_counter() - started
    model_cpu = _cpu_seconds() - cpu_started
    del clips

    # 3. the full pipeline into a fresh store: start-up (model load, readers) included, and after its first batch
    started = time.perf_counter()
    summary = extract(dataclasses.replace(config, out=str(cache)))
    full_seconds = time.perf_counter() - started
    shutil.rmtree(cache)

    n = len(paths)
    decode_rate, model_rate, full_rate = n / decode_seconds, n / model_seconds, summary["done_now"] / full_seconds
    steady_rate = (summary["done_now"] - summary["first_batch_clips"]) / (
        summary["seconds"] - summary["first_batch_seconds"])
    # the CPU-time bound: every core busy with decoding or the model, nothing else
    cpu_bound = (os.cpu_count() or 1) / (decode_cpu / n + model_cpu / n)
    return {
        "decode_clips_per_s": decode_rate, "model_clips_per_s": model_rate, "full_clips_per_s": full_rate,
        "full_after_first_batch_clips_per_s": steady_rate,
        "full_startup_seconds": full_seconds - summary["seconds"] + summary["first_batch_seconds"],
        "serial_bound_clips_per_s": 1.0 / (1.0 / decode_rate + 1.0 / model_rate),  # no overlap: not a bound
        "decode_cpu_seconds_per_clip": decode_cpu / n, "model_cpu_seconds_per_clip": model_cpu / n,
        "cpu_time_bound_clips_per_s": cpu_bound, "full_over_cpu_time_bound": full_rate / cpu_bound,
        "full_after_first_batch_over_cpu_time_bound": steady_rate / cpu_bound,
        "full_over_model_only": full_rate / model_rate,
        "full_over_min_decode_model": full_rate / min(decode_rate, model_rate),
    }


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _max_keyframe_interval(path: Path) -> int:
    with av.open(str(path)) as c:
        keys = [i for i, p in enumerate(p for p in c.demux(video=0) if p.size) if p.is_keyframe]
    return max((b - a for a, b in zip(keys, keys[1:])), default=0)


def _duration(path: Path) -> float:
    with av.open(str(path)) as c:
        return float(c.duration or 0) / 1e6


def _print(r: dict) -> None:
    from rich.table import Table

    from mad.progress import make_console
    from mad.tables import print_table

    s = r["settings"]
    spread = lambda key, f="{:.2f}": " / ".join(f.format(r[key][k]) for k in ("min", "median", "max"))  # noqa: E731
    table = Table(title=f"mad bench extract: {s['clips']} clips, {s['model']} ({s['precision']}, random weights), "
                        f"T={s['frames']}, {s['device']}, {s['workers']} decode worker(s); min / median / max "
                        f"over {s['repeats']} runs")
    table.add_column("stage")
    table.add_column("clips/s", justify="right")
    table.add_row("decode only", spread("decode_clips_per_s"))
    table.add_row("model only", spread("model_clips_per_s"))
    table.add_row("no overlap 1/(1/decode+1/model)", spread("serial_bound_clips_per_s"))
    table.add_row("CPU-time bound: cores / (decode + model CPU-s per clip)", spread("cpu_time_bound_clips_per_s"))
    table.add_row(f"full extract (start-up included: {spread('full_startup_seconds', '{:.1f}')} s)",
                  spread("full_clips_per_s"))
    table.add_row("full extract after its first batch", spread("full_after_first_batch_clips_per_s"))
    console = make_console()
    print_table(table, console)
    console.print(f"full / CPU-time bound = {spread('full_over_cpu_time_bound')}, after the first batch "
                  f"{spread('full_after_first_batch_over_cpu_time_bound')} (CPU target >= 0.90); "
                  f"full / model only = {spread('full_over_model_only')}; full / min(decode, model) = "
                  f"{spread('full_over_min_decode_model')} (GPU target >= 0.85)")
    sl = r["short_vs_long"]
    keyframe_note = f"keyframe interval {sl['max_keyframe_interval']} frames" if sl.get("max_keyframe_interval") else ""
    console.print(f"decode {s['frames']} sampled frames from cuts of {sl['clip']} ({keyframe_note}):")
    for row in sl["curve"]:
        console.print(f"  {row['clip']:>12}: {row['frames_in_video']:5d} frames in video, "
                      f"{row['seconds'] * 1000:6.0f} ms")
    console.print(f"  whole clip / shortest cut = {sl['ratio_long_over_short']:.2f} (target < 2); "
                  f"whole clip / decoding every frame ({sl['decode_all_frames_seconds'] * 1000:.0f} ms) = "
                  f"{sl['ratio_long_over_decode_all']:.2f}")


def bench_scaling(videos: str, model: str = "ViT-B-16", layers: str = "4,8,12", frames: int = 8, limit: int = 16,
                  processes: int = 2, precision: str = "bf16", out: str | None = None) -> dict:
    """`mad extract` throughput with 1 process vs `processes` slices side by side (--shard I/N), same clips.

    On a GPU machine launch the slices with torchrun instead, one GPU each; this
    measures how the block-sliced store scales where the processes share one machine.
    """
    import subprocess
    import sys

    check_counts(frames=frames, limit=limit, processes=processes)
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        link_root = video_subset(videos, limit, Path(tmp) / "videos")
        paths = find_videos(link_root).paths
        base = [sys.executable, "-m", "mad", "extract", "--videos", str(link_root), "--model", model,
                "--pretrained", "none", "--layers", layers, "--frames", str(frames), "--precision", precision,
                "--shard-size", "2"]
        for count in (1, processes):
            out_dir = Path(tmp) / f"cache{count}"
            started = time.perf_counter()
            commands = [base + ["--out", str(out_dir)] + (["--shard", f"{i}/{count}"] if count > 1 else [])
                        for i in range(count)]
            running = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                       for c in commands]
            for command, p in zip(commands, running):
                _, err = p.communicate()
                if p.returncode:
                    last = (err.strip().splitlines() or ["(no message)"])[-1]
                    raise BenchExtractError(f"{' '.join(command[2:])} failed: {last}")
            timings[count] = time.perf_counter() - started
    result = {"machine": machine_info("cpu"), "date": datetime.date.today().isoformat(),
              "settings": {"videos": videos, "clips": len(paths), "model": model, "layers": layers,
                           "frames": frames, "precision": precision},
              "seconds": {str(k): v for k, v in timings.items()},
              "clips_per_s": {str(k): len(paths) / v for k, v in timings.items()},
              "speedup": timings[1] / timings[processes]}
    from rich.console import Console

    Console().print(f"mad extract, {len(paths)} clips, {model}: 1 process {timings[1]:.1f} s "
                    f"({len(paths) / timings[1]:.2f} clips/s); {processes} processes (--shard I/{processes}) "
                    f"{timings[processes]:.1f} s ({len(paths) / timings[processes]:.2f} clips/s); "
                    f"speed-up {result['speedup']:.2f}x on {os.cpu_count()} cores")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"extract_scaling_cpu_{Path(model).stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
