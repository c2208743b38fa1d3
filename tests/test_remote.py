"""Remote caches: extraction, resume, info and training against a real S3-compatible server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from tests.helpers import extract_config
from mad.cache.store import DONE, Store
from mad.extract.run import extract

warnings.filterwarnings("ignore", message=".*random weights.*")


pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # pytest -m 'not slow' leaves these out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on 127.0.0.1, with the usual AWS variables pointing at it."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True)
        fs.mkdir("mad-test")
        yield fs
    finally:
        server.kill()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _videos(tmp_path):
    from mad.synthetic import make_demo_videos

    videos = make_demo_videos(tmp_path / "demo", videos_per_class=2, val_per_class=0, num_frames=12, size=64)
    (videos["train"] / "growing" / "broken.mp4").write_bytes(b"not a video")
    return videos["train"]


def test_extract_resume_and_info_on_s3(s3_server, tmp_path):
    videos = _videos(tmp_path)
    url = "s3://mad-test/cache"
    first = extract(extract_config(videos, url, limit=5))
    assert (first["done_now"], first["failed_now"]) == (4, 1)  # growing/broken.mp4 sorts first
    second = extract(extract_config(videos, url))  # resumes: only what is left
    assert (second["scheduled"], second["done_now"]) == (8, 8)
    extract(extract_config(videos, tmp_path / "local"))
    remote, local = Store.open(url), Store.open(tmp_path / "local")
    assert remote.paths() == local.paths()
    assert np.array_equal(remote.status(), local.status()) and (remote.status() == DONE).sum() == 12
    for layer in local.layers:
        assert np.array_equal(remote.read_layer(layer), local.read_layer(layer))
    assert "broken.mp4" in s3_server.cat_file("mad-test/cache/errors.jsonl").decode()
    result = subprocess.run([sys.executable, "-m", "mad", "info", url, "--verify"], capture_output=True, text=True)
    assert result.returncode == 0 and "12 done" in result.stdout and "matched its checksum" in result.stdout


def test_training_from_s3_matches_training_from_a_local_copy(s3_server, tmp_path):
    from mad.adapt.train import TrainConfig, train

    videos = _videos(tmp_path)
    url = "s3://mad-test/train-cache"
    extract(extract_config(videos, url))
    extract(extract_config(videos, tmp_path / "local"))
    settings = dict(arch="madapter", width=32, heads=2, epochs=2, batch_size=4, device="cpu")
    remote = train(TrainConfig(cache=url, out=str(tmp_path / "run-s3"), **settings), quiet=True)
    streamed = train(TrainConfig(cache=url, out=str(tmp_path / "run-s3-streamed"), in_ram="no", workers=1,
                                 **settings), quiet=True)
    local = train(TrainConfig(cache=str(tmp_path / "local"), out=str(tmp_path / "run-local"), **settings), quiet=True)
    for key in ("train/loss", "train/acc"):
        assert remote[key] == local[key] == streamed[key], key
