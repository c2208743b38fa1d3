"""Every command end to end on a CUDA device, at tiny sizes (`pytest -m cuda`).

extract (compact store for M-adapter and EVL), train from RAM and streamed (pinned batches), eval, sweep,
predict, report, demo, `mad bench memory`, DDP over NCCL under torchrun with one process, EVL's frozen q/k
on the device, and checkpoints written on the GPU read on the CPU. On a machine without CUDA the whole
module skips with that reason.

MAD_TEST_DEVICE=cpu runs the same tests on the CPU (gloo instead of NCCL): how `benchmarks/gpu_check.sh
--smoke` checks these tests before any GPU is lent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_MODEL

DEVICE = os.environ.get("MAD_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.slow]
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False (MAD_TEST_DEVICE=cpu runs these on the CPU)",
                allow_module_level=True)

BRANCH = ["--width", "32", "--heads", "2", "--batch-size", "4", "--device", DEVICE]


def mad(*args: str, launcher: tuple[str, ...] = ("-m", "mad"), timeout: float = 600) -> str:
    """`python -m mad ARGS` (or another launcher) in a fresh process; its stdout, or the test fails with stderr."""
    done = subprocess.run([sys.executable, *launcher, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"mad {' '.join(map(str, args))}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The demo's synthetic videos (2 train, 1 val per class), extracted on the device into compact stores that
    serve both M-adapter and EVL."""
    from mad.synthetic import make_demo_videos

    root = tmp_path_factory.mktemp("cuda")
    videos = make_demo_videos(root / "videos", videos_per_class=2, val_per_class=1, num_frames=16, size=64)
    for split in ("train", "val"):
        mad("extract", "--videos", videos[split], "--out", root / split, "--model", TINY_MODEL, "--pretrained",
            "none", "--layers", "2,4", "--frames", "4", "--branches", "madapter,evl", "--evl-layers", "2",
            "--workers", "0", "--batch-size", "4", "--device", DEVICE, "--precision", "bf16", "--no-progress")
    return {"root": root, "videos": videos, "train": root / "train", "val": root / "val"}


def test_extract_writes_the_stores_on_the_device(data):
    from mad.cache.store import DONE, Store

    for split, count in (("train", 12), ("val", 6)):
        store = Store.open(str(data[split]))
        assert store.manifest.storage == "compact" and "evl" in store.manifest.branches
        assert int((store.status() == DONE).sum()) == count
    assert "videos" in mad("info", data["train"])


def test_train_from_ram_and_streamed_give_the_same_epochs(data):
    root = data["root"]
    common = ["train", "--cache", data["train"], "--val", data["val"], "--epochs", "2", "--dropout", "0", *BRANCH]
    mad(*common, "--in-ram", "yes", "--out", root / "ram")
    mad(*common, "--in-ram", "no", "--workers", "1", "--out", root / "streamed")  # pinned batches on CUDA
    ram, streamed = metrics(root / "ram"), metrics(root / "streamed")
    assert len(ram) == len(streamed) == 2
    for a, b in zip(ram, streamed):  # the same batches in the same order (GPU kernels may differ in the last bits)
        assert abs(a["train/loss"] - b["train/loss"]) < 1e-2, (a, b)
    config = json.loads((root / "ram" / "config.json").read_text())
    assert config["train"]["device"] == DEVICE


def test_eval_predict_and_report_on_the_device(data):
    root = data["root"]
    run = root / "ram"
    if not (run / "model.safetensors").exists():
        mad("train", "--cache", data["train"], "--val", data["val"], "--epochs", "1", *BRANCH, "--out", run)
    out = mad("eval", "--run", run, "--cache", data["val"], "--device", DEVICE, "--batch-size", "4")
    assert "single_view" in out and "multi_view" in out
    clip = sorted(Path(data["videos"]["val"]).rglob("*.mp4"))[0]
    out = mad("predict", clip, "--run", run, "--device", DEVICE, "--top", "2")
    assert out.startswith(str(clip)) and out.count(",") >= 1
    mad("report", run, "--out", root / "report.html", "--device", DEVICE, "--worst", "2")
    assert (root / "report.html").stat().st_size > 1000


def test_sweep_on_the_device(data):
    root = data["root"]
    mad("sweep", "--grid", "lr=1e-3,3e-4 arch=madapter,linear", "--cache", data["train"], "--val", data["val"],
        "--out", root / "sweep", "--epochs", "1", "--batch-size", "4", "--device", DEVICE)
    board = (root / "sweep" / "leaderboard.csv").read_text().splitlines()
    assert len(board) == 1 + 4


def test_evl_trains_with_its_frozen_qk_on_the_device(data):
    from mad.adapt.checkpoint import load_model

    run = data["root"] / "evl"
    mad("train", "--cache", data["train"], "--val", data["val"], "--arch", "evl", "--epochs", "1",
        "--batch-size", "4", "--device", DEVICE, "--out", run)
    model, info = load_model(run / "model.safetensors", DEVICE)
    device = torch.device(DEVICE)
    for name in ("ln_weight", "ln_bias", "weight", "bias"):
        buffer = getattr(model.qk, name)
        assert buffer.device.type == device.type, name
    assert model.qk.weight.abs().sum() > 0  # loaded from the store (random ViT: its LayerNorm biases are zeros)
    assert model.decoder.cross_attention[0].index.device.type == device.type
    branch = info["branch"]
    levels = [torch.randn(2, branch.num_frames, branch.num_tokens, branch.in_width, device=device,
                          dtype=torch.float16) for _ in range(branch.num_levels)]
    q, k = model.qk(levels[0], 0)
    assert q.device.type == device.type and q.dtype == torch.float32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(levels)
    assert logits.shape == (2, branch.num_classes) and torch.isfinite(logits.float()).all()


def test_checkpoints_written_on_the_gpu_read_on_the_cpu(data):
    from mad.adapt.checkpoint import load_model, restore_training_state
    from mad.adapt.step import make_optimizer, make_scheduler

    root = data["root"]
    run = root / "ram"
    if not (run / "last.pt").exists():
        mad("train", "--cache", data["train"], "--val", data["val"], "--epochs", "1", *BRANCH, "--out", run)
    model, _ = load_model(run / "model.safetensors", "cpu")
    assert all(p.device.type == "cpu" for p in model.parameters())
    optimizer = make_optimizer(model, 1e-3, 0.05)
    scheduler = make_scheduler(optimizer, 1, 10)
    assert restore_training_state(run / "last.pt", model, optimizer, scheduler, torch.device("cpu")) >= 1
    assert all(v.device.type == "cpu" for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    out = mad("eval", "--run", run, "--cache", data["val"], "--device", "cpu", "--batch-size", "4")
    assert "single_view" in out


def test_ddp_under_torchrun_with_one_process_matches_a_plain_run(data):
    """torchrun --nproc-per-node 1 runs DDP (NCCL on CUDA, gloo on CPU): the same epochs as one plain process."""
    root = data["root"]
    common = ["train", "--cache", data["train"], "--val", data["val"], "--epochs", "2", "--dropout", "0",
              "--in-ram", "yes", *BRANCH]
    mad(*common, "--out", root / "plain")
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "mad")
    mad(*common, "--out", root / "ddp", launcher=launcher)
    plain, ddp = metrics(root / "plain"), metrics(root / "ddp")
    assert len(plain) == len(ddp) == 2
    for a, b in zip(plain, ddp):
        for key in ("train/loss", "val/acc/top1"):
            assert abs(a[key] - b[key]) < 1e-2, (key, a[key], b[key])


def test_resume_on_the_cpu_a_run_started_on_the_device(data):
    root = data["root"]
    common = ["train", "--cache", data["train"], "--epochs", "2", "--width", "32", "--heads", "2",
              "--batch-size", "4", "--out", root / "moved"]
    mad(*common, "--device", DEVICE)
    (root / "moved" / "metrics.jsonl").write_text(json.dumps(metrics(root / "moved")[0]) + "\n")  # as if cut off
    last = torch.load(root / "moved" / "last.pt", map_location="cpu", weights_only=True)
    last["epoch"] = 1
    torch.save(last, root / "moved" / "last.pt")
    mad(*common, "--device", "cpu", "--resume")
    assert [row["epoch"] for row in metrics(root / "moved")] == [1, 2]


def test_bench_memory_modes_on_the_device(tmp_path):
    mad("bench", "memory", "--model", TINY_MODEL, "--frames", "4", "--batch", "2", "--layers", "2,4", "--steps",
        "1", "--device", DEVICE, "--out", tmp_path, "--classes", "6", "--branch-width", "48", "--modes",
        "in-backbone-adapter,madapter-online,evl-cached")
    report = json.loads(next(tmp_path.glob("memory_*.json")).read_text())
    assert [row["mode"] for row in report["modes"]] == ["in-backbone-adapter", "madapter-online", "evl-cached"]
    assert all(row["peak_bytes"] > 0 for row in report["modes"])
    assert report["machine"]["device"] == ("cuda" if DEVICE.startswith("cuda") else "cpu")


def test_demo_on_the_default_device(tmp_path):
    """`mad demo` picks the GPU by itself (device auto); tiny here: 1 video per class and split, 1 epoch."""
    from mad.demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=str(tmp_path / "demo"), videos_per_class=1, val_per_class=1, epochs=1,
                                 archs=("madapter", "evl"), progress=False))
    assert set(report["results"]) == {"madapter", "evl"}
    config = json.loads((tmp_path / "demo" / "runs" / "madapter" / "config.json").read_text())
    assert config["train"]["device"] == "auto"
    if DEVICE.startswith("cuda"):
        assert torch.cuda.max_memory_allocated() > 0  # the demo's runs did reach the GPU
