"""Stage one: extraction into the cache, fidelity to open_clip, bad input, resume and refusal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from tests.helpers import TINY_MODEL, copy_videos, extract_config, shared_data
from mad.cache.store import DONE, FAILED, Store
from mad.extract.backbone import BackboneError, parse_layers
from mad.errors import MadError
from mad.extract.run import extract

warnings.filterwarnings("ignore", message=".*random weights.*")


def test_parse_layers():
    assert parse_layers("4,8,12", 12) == [4, 8, 12]
    assert parse_layers("-1", 12) == [12]
    assert parse_layers("12,-12,3,3", 12) == [1, 3, 12]
    assert parse_layers("all", 4) == [1, 2, 3, 4]
    for bad in ("13", "0", "-13", "x", ""):
        with pytest.raises(BackboneError):
            parse_layers(bad, 12)


def test_sample_frame_indices():
    from mad.extract.decode import sample_frame_indices

    assert sample_frame_indices(80, 8).tolist() == [[5, 15, 25, 35, 45, 55, 65, 75]]
    two = sample_frame_indices(80, 8, clips=2)
    assert two.shape == (2, 8) and (two[0] < two[1]).all()
    assert sample_frame_indices(3, 8).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]  # short: repeats


def _open_clip_reference(video: str, frame_index: np.ndarray, checkpoint: str, layers: list[int]) -> list:
    """open_clip's own preprocessing and forward on frames decoded sequentially with PyAV."""
    from mad._compat import import_open_clip

    open_clip = import_open_clip()
    model = open_clip.create_model("mad-tiny-vit", pretrained=checkpoint)
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    with av.open(video) as container:
        frames = [f.to_image() for f in container.decode(video=0)]
    x = torch.stack([preprocess(frames[i]) for i in frame_index])
    out = model.visual.forward_intermediates(x, indices=[n - 1 for n in layers], output_fmt="NLC",
                                             intermediates_only=True, output_extra_tokens=True)
    return [torch.cat([c, p], 1) for c, p in zip(out["image_intermediates_prefix"], out["image_intermediates"])]


def _fidelity_videos(folder) -> list:
    """Clips for the open_clip check: two generated ones (so it never skips in a user's checkout) and,
    where ../shared/data exists, two real ones (H.264 from a phone and from Kinetics)."""
    from mad.synthetic import write_video
    from tests.helpers import SHARED_DATA

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (height, width) in {"wide.mp4": (144, 256), "tall.mp4": (256, 144)}.items():
        # smooth moving content, as camera video is (swscale's bicubic and PIL's differ on fine
        # high-contrast detail: cos 0.996 on 20 px stripes), and the crops must differ
        y, x = np.mgrid[0:height, 0:width]
        frames = [np.stack([128 + 100 * np.sin((x + 3 * t) / 20 + c) * np.cos(y / 16 - c) for c in range(3)], -1)
                  for t in range(20)]
        write_video(folder / name, np.clip(np.stack(frames) + rng.normal(0, 2, (20, height, width, 3)), 0, 255))
    real = [SHARED_DATA / "assorted" / "demo.mp4", SHARED_DATA / "k2" / "val" / "typing" / "typing41.mp4"]
    copy_videos([p for p in real if p.exists()], folder)
    return folder


@pytest.mark.slow
def test_cached_tokens_match_open_clip_forward(tmp_path):
    """fp32 extraction equals open_clip's forward on the recorded frames (cos > 0.999); never skips."""
    from mad._compat import import_open_clip

    videos = _fidelity_videos(tmp_path / "videos")
    # A local checkpoint file: the real loading path (and its sha256 in the manifest).
    open_clip = import_open_clip()
    open_clip.add_model_config(TINY_MODEL)
    torch.manual_seed(1)
    checkpoint = tmp_path / "tiny.pt"
    torch.save(open_clip.create_model("mad-tiny-vit").state_dict(), checkpoint)

    extract(extract_config(videos, tmp_path / "cache", pretrained=str(checkpoint), layers="1,-1", clips=2, crops=3))
    store = Store.open(tmp_path / "cache")
    assert store.manifest.pretrained_sha256 and store.manifest.layers == [1, 4]
    assert (store.status() == DONE).all() and store.frame_index().shape[1:] == (2, 8)
    for v, path in enumerate(store.paths()):
        for clip in range(2):  # views are clip-major, crops left / centre / right: open_clip's is the centre
            reference = _open_clip_reference(str(videos / path), store.frame_index()[v, clip], str(checkpoint),
                                             [1, 4])
            for layer, ref in zip([1, 4], reference):
                views = torch.from_numpy(store.read_layer(layer, v).astype(np.float32))  # [6, T, N, D]
                cached = views[clip * 3 + 1]
                assert cached.shape == ref.shape
                cos = torch.nn.functional.cosine_similarity(cached.flatten(1), ref.flatten(1), dim=1)
                assert cos.min() > 0.999, (path, clip, layer, cos)
                if "tall" not in path:  # not square: the side crops differ
                    assert not torch.allclose(views[clip * 3], cached)
        assert not np.array_equal(store.frame_index()[v, 0], store.frame_index()[v, 1])  # the clips are shifted


@pytest.mark.slow
def test_real_clips_and_bad_corpus_in_one_run(tmp_path):
    """Every assorted clip and a few k2 clips extract; each bad file fails with a reason; the run goes on."""
    from tests.helpers.badfiles import make_bad_corpus

    videos = tmp_path / "videos"
    assorted = sorted(p for p in shared_data("assorted").iterdir() if p.suffix in (".mp4", ".mkv", ".avi"))
    k2 = sorted(shared_data("k2", "train", "doing_exercises").iterdir())[:2] + \
        sorted(shared_data("k2", "train", "typing").iterdir())[:2]
    copy_videos(assorted + k2, videos)
    expected = make_bad_corpus(videos / "bad")
    summary = extract(extract_config(videos, tmp_path / "cache", workers=1, batch_size=3))

    store = Store.open(tmp_path / "cache")
    status = dict(zip(store.paths(), store.status()))
    for clip in assorted + k2:
        assert status[clip.name] == DONE, clip.name
    errors = {json.loads(line)["path"]: json.loads(line)["reason"]
              for line in (tmp_path / "cache" / "errors.jsonl").read_text().splitlines()}
    for name, kind in expected.items():
        if kind == "fail":
            assert status[f"bad/{name}"] == FAILED and errors[f"bad/{name}"], name
        elif kind == "ok":
            assert status[f"bad/{name}"] == DONE, (name, errors.get(f"bad/{name}"))
    assert "no video stream" in errors["bad/audio_only.mp4"]
    assert summary["failed_now"] == sum(s == FAILED for s in status.values())
    short = store.paths().index("bad/short_3_frames.mp4")
    assert store.num_frames()[short] == 3
    assert sorted(set(store.frame_index()[short, 0].tolist())) == [0, 1, 2]  # repeated frames
    # Failed videos hold no data.
    failed = np.flatnonzero(store.status() == FAILED)
    assert not store.read_layer(4, failed).any()


def test_rotated_video_is_displayed_upright(tmp_path):
    from mad.extract.decode import decode_clip
    from mad.synthetic import write_video

    frames = np.zeros((8, 60, 100, 3), np.uint8)
    frames[:, :20] = 255  # white band along the top of the stored (landscape) picture
    write_video(tmp_path / "r.mp4", frames, rotation=90)
    clip = decode_clip(str(tmp_path / "r.mp4"), frames=2, size=32)
    assert clip.frames.shape == (1, 2, 3, 32, 32)
    image = clip.frames[0, 0, 0].astype(float)
    # Displayed upright the picture is portrait and the band runs down one side, not across the top.
    assert max(image[:, :4].mean(), image[:, -4:].mean()) > 200
    assert image[:4, 12:20].mean() < 50


def _demo_videos(tmp_path, per_class=2):
    from mad.synthetic import make_demo_videos

    return make_demo_videos(tmp_path / "demo", videos_per_class=per_class, val_per_class=0, num_frames=12,
                            size=64)["train"]


def test_resume_skips_done_and_appends_new_videos(tmp_path):
    videos = _demo_videos(tmp_path)
    cfg = extract_config(videos, tmp_path / "cache", limit=5)
    first = extract(cfg)
    assert first["done_now"] == 5 and first["pending_total"] == 7
    cfg.limit = None
    second = extract(cfg)
    assert second["done_now"] == 7 and second["done_total"] == 12
    assert extract(cfg)["scheduled"] == 0  # nothing left to do
    # New videos in the folder are appended, with the same class numbering.
    (videos / "growing" / "growing_train_0000.mp4").rename(videos / "growing" / "new_clip.mp4")
    third = extract(cfg)
    store = Store.open(tmp_path / "cache")
    assert third["scheduled"] == 1 and store.paths()[-1] == "growing/new_clip.mp4"
    assert store.labels()[-1] == store.class_names.index("growing")
    # The clip that disappeared was done before and keeps its data.
    assert (store.status() == DONE).sum() == 13


def test_retry_failed_only_when_asked(tmp_path):
    videos = _demo_videos(tmp_path, per_class=1)
    (videos / "growing" / "broken.mp4").write_bytes(b"not a video at all")
    cfg = extract_config(videos, tmp_path / "cache")
    assert extract(cfg)["failed_now"] == 1
    assert extract(cfg)["scheduled"] == 0
    (videos / "growing" / "broken.mp4").write_bytes((videos / "growing" / "growing_train_0000.mp4").read_bytes())
    cfg.retry_failed = True
    assert extract(cfg)["done_now"] == 1
    assert (Store.open(tmp_path / "cache").status() == DONE).all()


@pytest.mark.parametrize("change", [{"layers": "1,4"}, {"model": "ViT-B-32"}, {"frames": 4},
                                    {"pretrained": "missing.pt"}])
@pytest.mark.slow
def test_resume_with_different_settings_is_refused(tmp_path, change):
    videos = _demo_videos(tmp_path, per_class=1)
    extract(extract_config(videos, tmp_path / "cache"))
    with pytest.raises(MadError) as error:
        extract(extract_config(videos, tmp_path / "cache", **change))
    message = str(error.value)
    if "pretrained" in change:
        assert message == "missing.pt: checkpoint file not found"
    else:
        assert str(tmp_path / "cache") in message and any(key in message for key in change)
    if "pretrained" not in change:  # --overwrite starts over
        if "model" in change:
            return  # a ViT-B-32 extraction is too slow for the test suite
        summary = extract(extract_config(videos, tmp_path / "cache", overwrite=True, **change))
        assert summary["done_total"] == 6


def test_resume_with_the_model_config_spelled_another_way(tmp_path, monkeypatch):
    """--model names a config file: relative or absolute, it is the same model; another file is refused in one line."""
    videos = _demo_videos(tmp_path, per_class=1)
    extract(extract_config(videos, tmp_path / "cache"))  # TINY_MODEL: an absolute path
    monkeypatch.chdir(Path(TINY_MODEL).parent)
    assert extract(extract_config(videos, tmp_path / "cache", model=Path(TINY_MODEL).name))["scheduled"] == 0
    narrow = json.loads(Path(TINY_MODEL).read_text())
    narrow["vision_cfg"]["width"] = 32
    (tmp_path / "mad-tiny-vit-narrow.json").write_text(json.dumps(narrow))
    with pytest.raises(MadError) as error:
        extract(extract_config(videos, tmp_path / "cache", model=str(tmp_path / "mad-tiny-vit-narrow.json")))
    message = str(error.value)
    assert "\n" not in message and f"--model: {TINY_MODEL} in the store" in message
    assert message.startswith(f"{tmp_path / 'cache'} was made with different settings")


def test_out_of_range_layer_fails_before_any_work(tmp_path):
    videos = _demo_videos(tmp_path, per_class=1)
    with pytest.raises(MadError, match="--layers 5: out of range"):
        extract(extract_config(videos, tmp_path / "cache", layers="2,5"))
    assert not (tmp_path / "cache").exists()


def test_cli_errors_are_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mad", "extract", "--videos", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "c")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: not a folder"]


def _layer_data(store: Store) -> dict:
    return {layer: store.read_layer(layer) for layer in store.layers}


@pytest.mark.slow
@pytest.mark.e2e
def test_sigkill_mid_run_then_resume_gives_identical_store(tmp_path):
    """A run killed with SIGKILL and resumed equals an uninterrupted run, per video and bitwise."""
    videos = _demo_videos(tmp_path, per_class=3)  # 18 videos, blocks of 2
    reference = extract_config(videos, tmp_path / "reference", shard_size=2, batch_size=2)
    extract(reference)

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "mad", "extract", "--videos", str(videos), "--out", str(out), "--model",
               TINY_MODEL, "--pretrained", "none", "--layers", "2,4", "--precision", "fp32", "--workers", "0",
               "--shard-size", "2", "--batch-size", "2", "--store", "full"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and process.poll() is None:
        try:
            done = int((Store.open(out).status() == DONE).sum())
        except Exception:
            done = 0
        if done >= 4:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = Store.open(out)
    status = killed.status()
    assert 4 <= (status == DONE).sum() < 18, "the kill must land mid-run"
    # No video is marked done without its data: done videos already equal the reference.
    ref = Store.open(tmp_path / "reference")
    ref_data, data = _layer_data(ref), _layer_data(killed)
    for v in np.flatnonzero(status == DONE):
        for layer in ref.layers:
            assert np.array_equal(data[layer][v], ref_data[layer][v])

    subprocess.run(command, check=True, capture_output=True)
    resumed = Store.open(out)
    assert (resumed.status() == DONE).all()
    data = _layer_data(resumed)
    assert resumed.paths() == ref.paths()
    for layer in ref.layers:
        assert np.array_equal(data[layer], ref_data[layer])  # bitwise, every video
    assert np.array_equal(resumed.frame_index(), ref.frame_index())
    assert not [p for p in os.listdir(out) if p.endswith(".partial")]


def test_info_counts_and_verify_detects_flipped_bytes(tmp_path):
    from mad.cache.info import show_info
    from rich.console import Console

    videos = _demo_videos(tmp_path, per_class=1)
    extract(extract_config(videos, tmp_path / "cache", shard_size=2))
    console = Console(record=True, width=200)
    assert show_info(str(tmp_path / "cache"), verify=True, console=console)
    text = console.export_text()
    assert "6 done" in text and "[6, 1, 8, 17, 64]" in text
    shard = tmp_path / "cache" / "layers" / "4" / "c" / "1" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = Store.open(tmp_path / "cache").verify()
    assert [(p["array"], p["videos"]) for p in problems] == [("layers/4", [2, 4])]


@pytest.mark.slow
@pytest.mark.e2e
def test_second_extraction_on_the_same_store_is_refused(tmp_path):
    videos = _demo_videos(tmp_path, per_class=1)
    command = [sys.executable, "-m", "mad", "extract", "--videos", str(videos), "--out", str(tmp_path / "cache"),
               "--model", TINY_MODEL, "--pretrained", "none", "--layers", "2,4", "--workers", "0"]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time, pathlib; p = pathlib.Path(sys.argv[1]); p.mkdir(); "
        "f = open(p / '.mad-lock', 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 1 on test'); f.flush(); "
        "print('locked', flush=True); time.sleep(60)"), str(tmp_path / "cache")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    try:
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 2
        assert "another extraction is writing to this store (pid 1 on test)" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    # The lock dies with its holder (even on SIGKILL): the next run goes ahead.
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (Store.open(tmp_path / "cache").status() == DONE).all()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("launcher, store", [("shards", "full"), ("torchrun", "compact")])
def test_two_processes_give_the_same_store_as_one(tmp_path, launcher, store):
    """Two slices (--shard 0/2 + 1/2 side by side, or torchrun with 2 ranks) equal a one-process run."""
    videos = _demo_videos(tmp_path, per_class=2)  # 12 videos, 6 blocks of 2
    extract(extract_config(videos, tmp_path / "one", shard_size=2, store=store))
    options = ["extract", "--videos", str(videos), "--out", str(tmp_path / "two"), "--model", TINY_MODEL,
               "--pretrained", "none", "--layers", "2,4", "--precision", "fp32", "--workers", "0",
               "--shard-size", "2", "--store", store]
    if launcher == "shards":
        processes = [subprocess.Popen([sys.executable, "-m", "mad", *options, "--shard", f"{i}/2"],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
        outputs = [p.communicate()[0] for p in processes]
        assert [p.returncode for p in processes] == [0, 0], outputs
    else:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                 "--master-port", "0", "-m", "mad", *options], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
    one, two = Store.open(tmp_path / "one"), Store.open(tmp_path / "two")
    assert two.paths() == one.paths() and (two.status() == DONE).all() and two.manifest.storage == store
    for name in one.data_arrays:
        assert np.array_equal(two.read(name), one.read(name))
    assert np.array_equal(two.frame_index(), one.frame_index())
