"""The one GPU check: every CUDA path of mad run once, and the figures users compare, in under 8 minutes.

    python benchmarks/gpu_check.py --out DIR            on a CUDA machine (benchmarks/gpu_check.sh wraps it)
    python benchmarks/gpu_check.py --smoke --out DIR    every step on the CPU at tiny sizes (tests/test_gpu_check.py)

Steps, in order of what matters most if time runs out (each has a time budget; the whole check stops
starting steps once its own budget, --budget seconds (460), is spent):

    environment      versions, GPU, nvidia-smi
    memory_vit_b16   `mad bench memory` ViT-B/16, 8 frames, batch 32 (Side4Video's setting): in-backbone
                     adapter, M-adapter online and cached, EVL online and cached
    cuda_tests       `pytest -m cuda tests/test_cuda.py` (every command on --device cuda, DDP over NCCL, ...)
    memory_vit_l14   ViT-L/14 cached M-adapter vs in-backbone adapter, batch 32 (batch 8 too if 32 does not fit)
    extract          `mad bench extract`: decode only (a worker per core), model only, full extraction
    train_streamed   `mad train` streaming a compact ViT-B/16 store: clips/s and GPU utilisation
    sweep            `mad bench sweep --ks 4`: 4 configurations in one sweep vs 4 runs

A step that fails or runs out of time is recorded (status, exit code, the end of its output), never fatal:
DIR/gpu_check.json is rewritten after every step, so even a check cut off leaves what it measured.

--smoke runs the same steps' code at the smallest sizes that still take each path (the tiny test ViT for
ViT-B/16 and ViT-L/14, 2 frames, batch 2, 4 clips, a K=2 sweep of 1 epoch, the CUDA tests' extraction and
DDP tests on the CPU), in two lanes side by side, within 540 s: ~160 CPU s, ~80 in each lane.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "tests" / "configs" / "mad-tiny-vit.json")
MEMORY_MODES = ("in-backbone-adapter", "madapter-online", "madapter-cached", "evl-online", "evl-cached")
# Side4Video (Yao et al. 2023), Table: training memory at 8 frames, ViT-B/16, batch 32 (GB)
PUBLISHED_GB = {"AIM": 35.2, "ST-Adapter": 28.8, "EVL": 17.9, "DiST": 12.7, "Side4Video-light": 8.9}
# the synthetic clips of extract and train_streamed, (count, drawn: the rest are copies): on a GPU, and in --smoke
VIDEOS, SMOKE_VIDEOS = (256, 48), (4, 4)


class Check:
    """Runs the steps, each as subprocesses with a timeout, and keeps DIR/gpu_check.json up to date."""

    def __init__(self, out: Path, smoke: bool, budget: float, device: str, order: list[str], parallel: bool = False):
        self.out, self.smoke, self.device, self.order, self.parallel = out, smoke, device, order, parallel
        self.lock = threading.Lock()  # --smoke runs two steps at a time, each saving the report
        self.started = time.monotonic()
        self.deadline = self.started + budget
        self.report = {"check": "gpu_check", "smoke": smoke, "device": device, "budget_seconds": budget,
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "published_side4video_gb": PUBLISHED_GB, "steps": {}}
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, name: str | None = None, record: dict | None = None) -> None:
        """Rewrite the JSON, with a copy of `record` as step `name`'s (the steps in order, whichever lane ran them)."""
        with self.lock:
            steps = {**self.report["steps"], **({name: dict(record)} if name else {})}
            self.report["steps"] = {n: steps[n] for n in self.order if n in steps}
            self.report["seconds"] = round(time.monotonic() - self.started, 1)
            (self.out / "gpu_check.json").write_text(json.dumps(self.report, indent=2) + "\n")

    def run(self, name: str, budget: float, step) -> None:
        """One step: `step(timeout)` returns its figures; an exception or a timeout is recorded as its result."""
        timeout = min(budget, self.left())
        record = {"status": "running", "budget_seconds": budget}
        if timeout < 5:
            record.update(status="skipped", reason=f"the check's budget is spent ({self.left():.0f} s left)")
            self.save(name, record)
            return
        self.save(name, record)
        print(f"== {name} (up to {timeout:.0f} s)", flush=True)
        started, cpu = time.monotonic(), _children_cpu_seconds()
        try:
            record.update(step(timeout))
            record["status"] = "ok" if record.get("status", "running") == "running" else record["status"]
        except StepFailed as e:
            record.update({"status": "failed", **e.details})  # or "timed_out", as the details say
        except Exception as e:  # a bug in this script's own step: recorded, the check goes on
            record.update({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        record["seconds"] = round(time.monotonic() - started, 1)
        if not self.parallel:  # its subprocesses' CPU time (side by side, the other step's would count too)
            record["cpu_seconds"] = round(_children_cpu_seconds() - cpu, 1)
        print(f"   {name}: {record['status']} in {record['seconds']} s", flush=True)
        self.save(name, record)

    def command(self, args: list[str], timeout: float, log: str, env: dict | None = None) -> str:
        """Run `args` (python -m ... or a program) with a timeout; its stdout; StepFailed with the output's end."""
        path = self.out / "logs" / f"{log}.log"
        path.parent.mkdir(exist_ok=True)
        started = time.monotonic()
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT,
                                  env={**self.env, **(env or {})})
        except subprocess.TimeoutExpired as e:
            text = _text(e.stdout) + _text(e.stderr)
            path.write_text(text)
            raise StepFailed(status="timed_out", command=_show(args), seconds=round(time.monotonic() - started, 1),
                             output_tail=text[-1500:]) from None
        path.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
        if done.returncode != 0:
            raise StepFailed(command=_show(args), exit_code=done.returncode,
                             output_tail=(done.stdout[-500:] + done.stderr[-1500:]))
        return done.stdout

    def mad(self, args: list[str], timeout: float, log: str, env: dict | None = None) -> str:
        return self.command([sys.executable, "-m", "mad", *map(str, args)], timeout, log, env)


class StepFailed(Exception):
    def __init__(self, **details):
        super().__init__(details.get("output_tail", ""))
        self.details = details


def _children_cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def _show(args: list[str]) -> str:
    return " ".join(str(a) for a in args).replace(sys.executable, "python")


# --------------------------------------------------------------------------- steps


def environment(check: Check, timeout: float) -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "cpu_cores": os.cpu_count()}
    for package in ("open_clip_torch", "zarr", "numcodecs", "av", "optuna", "numpy", "typer"):
        try:
            from importlib.metadata import version

            found[package] = version(package)
        except Exception as e:
            found[package] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     gpus=torch.cuda.device_count(), nccl=torch.cuda.nccl.version())
    if shutil.which("nvidia-smi"):
        found["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                              "--format=csv,noheader"], capture_output=True, text=True,
                                             timeout=timeout).stdout.strip()
    return found


def memory(check: Check, timeout: float, model: str, batch: int, modes: tuple[str, ...], name: str,
           one_by_one: bool = False) -> dict:
    """`mad bench memory` with all `modes` in one command; if it fails (or `one_by_one`: a mode is expected not
    to fit), each mode alone."""
    frames, layers = (8, "4,8,12") if not check.smoke else (2, "2,4")
    if check.smoke:
        model, batch = TINY_MODEL, 2
    if "L-14" in model:
        layers = "8,16,24"
    deadline = time.monotonic() + timeout

    def bench(chosen: tuple[str, ...], b: int, tag: str) -> list[dict]:
        out = check.out / name / tag
        check.mad(["bench", "memory", "--model", model, "--frames", frames, "--batch", b, "--layers", layers,
                   "--steps", 3 if not check.smoke else 1, "--device", check.device, "--precision", "bf16",
                   "--modes", ",".join(chosen), "--out", out] + (["--branch-width", "48", "--classes", "6"]
                                                                  if check.smoke else []),
                  deadline - time.monotonic(), f"{name}-{tag}")
        report = json.loads(next(out.glob("memory_*.json")).read_text())
        return [{"mode": r["mode"], "batch": r["batch"], "peak_gib": round(r["peak_bytes"] / 2**30, 3),
                 "peak_gb": round(r["peak_bytes"] / 1e9, 2), "step_seconds": round(r["step_seconds_median"], 4),
                 "trainable_parameters": r["trainable_parameters"]} for r in report["modes"]]

    result = {"model": model, "frames": frames, "batch": batch, "precision": "bf16 autocast",
              "measure": "CUDA max_memory_allocated over the timed steps" if check.device != "cpu" else "CPU RSS"}
    if not one_by_one:
        try:
            result["modes"] = bench(modes, batch, f"batch{batch}")
            return result
        except StepFailed as e:
            result["all_at_once"] = e.details
            if e.details.get("status") == "timed_out":  # no time left for the modes one by one
                raise
    rows, failed = [], {}
    for mode in modes:  # one at a time: which did not fit, or broke
        try:
            rows += bench((mode,), batch, f"batch{batch}-{mode}")
        except StepFailed as e:
            failed[mode] = e.details.get("output_tail", "")[-300:]
    result.update(modes=rows, failed_modes=failed)
    if failed:
        result["status"] = "partial" if rows else "failed"
    if failed and "L-14" in model and not check.smoke and deadline - time.monotonic() > 20:
        try:  # the pair at a batch that fits, so the ratio still has a figure
            result["batch8"] = bench(modes, 8, "batch8")
        except StepFailed as e:
            result["batch8_failed"] = e.details
    return result


def cuda_tests(check: Check, timeout: float) -> dict:
    """The CUDA tests (in a smoke run on the CPU, MAD_TEST_DEVICE=cpu: the extraction and DDP tests)."""
    junit = check.out / "cuda_tests.xml"
    args = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py", "-p", "no:cacheprovider",
            f"--junitxml={junit}"]
    env = {}
    if check.smoke:
        args += ["-k", "test_extract_writes or test_ddp"]  # the plumbing, and DDP under torchrun (gloo)
        env["MAD_TEST_DEVICE"] = "cpu"
    try:
        tail = check.command(args, timeout, "cuda_tests", env)
        failed = None
    except StepFailed as e:
        tail, failed = e.details.get("output_tail", ""), e.details
    counts = _junit_counts(junit)
    result = {**counts, "summary": tail.strip().splitlines()[-1] if tail.strip() else ""}
    if failed:
        result.update({"status": "failed", **failed})
    return result


def _junit_counts(path: Path) -> dict:
    if not path.exists():
        return {}
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed_tests"] = [case.get("name") for case in suite.iter("testcase")
                              if case.find("failure") is not None or case.find("error") is not None]
    return counts


def make_videos(check: Check, count: int, distinct: int) -> Path:
    """`count` short synthetic clips in the demo's class folders: `distinct` drawn (on every core), then copied."""
    from concurrent.futures import ProcessPoolExecutor

    root = check.out / "work" / "videos"
    if root.exists():
        return root
    size, frames = (64, 8) if check.smoke else (160, 32)
    jobs = [(str(root), i, frames, size) for i in range(distinct)]
    if check.parallel:  # a smoke run's few tiny clips: drawn here (no fork beside the other lane's thread)
        drawn = [_draw_video(job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            drawn = list(pool.map(_draw_video, jobs))
    for i in range(distinct, count):
        source = Path(drawn[i % distinct])
        shutil.copy(source, source.with_name(f"{source.stem}_copy{i}.mp4"))
    return root


def _draw_video(job) -> str:
    import numpy as np

    from mad.synthetic import CLASSES, make_clip, write_video

    root, i, frames, size = job
    name = CLASSES[i % len(CLASSES)]
    path = Path(root) / name / f"{name}_{i:04d}.mp4"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, make_clip(name, np.random.default_rng(i), frames, size), 8)
    return str(path)


def extract(check: Check, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    videos = make_videos(check, *(SMOKE_VIDEOS if check.smoke else VIDEOS))
    cores = os.cpu_count() or 1
    model, layers, limit, batch, frames = ((TINY_MODEL, "2,4", 4, 2, 2) if check.smoke
                                           else ("ViT-B-16", "4,8,12", 192, 16, 8))
    out = check.out / "extract"
    check.mad(["bench", "extract", "--videos", videos, "--model", model, "--layers", layers, "--frames", frames,
               "--limit", limit, "--repeats", 1, "--batch-size", batch, "--workers", cores, "--device",
               check.device, "--precision", "bf16", "--out", out], deadline - time.monotonic(), "extract")
    figures = json.loads(next(out.glob("extract_*.json")).read_text())
    pick = lambda key: round(figures[key]["median"], 2)  # noqa: E731
    rates = {"decode_only": pick("decode_clips_per_s"), "model_only": pick("model_clips_per_s")}
    return {"model": model, "clips": figures["settings"]["clips"], "decode_workers": cores, "batch_size": batch,
            "clips_per_second": {**rates, "full": pick("full_clips_per_s"),
                                 "full_after_first_batch": pick("full_after_first_batch_clips_per_s")},
            "bound_by": min(rates, key=rates.get)}


def train_streamed(check: Check, timeout: float) -> dict:
    """Extract a compact store of the clips, then `mad train` streaming it (--in-ram no) with GPU sampling."""
    deadline = time.monotonic() + timeout
    videos = make_videos(check, *(SMOKE_VIDEOS if check.smoke else VIDEOS))
    model, layers, frames = (TINY_MODEL, "2,4", 2) if check.smoke else ("ViT-B-16", "4,8,12", 8)
    store, run = check.out / "work" / "store", check.out / "work" / "run"
    workers = 1 if check.smoke else min(8, os.cpu_count() or 1)
    started = time.monotonic()
    check.mad(["extract", "--videos", videos, "--out", store, "--model", model, "--pretrained", "none", "--layers",
               layers, "--frames", frames, "--store", "compact", "--batch-size", 2 if check.smoke else 32, "--device",
               check.device, "--precision", "bf16", "--overwrite", "--no-progress"], deadline - time.monotonic(),
              "train_extract")
    extract_seconds = time.monotonic() - started
    sampler = GpuSampler(check.device)
    with sampler:
        check.mad(["train", "--cache", store, "--in-ram", "no", "--workers", workers, "--epochs", 3, "--batch-size",
                   32 if not check.smoke else 2, "--device", check.device, "--out", run, "--overwrite"]
                  + (["--width", "32", "--heads", "2"] if check.smoke else []), deadline - time.monotonic(),
                  "train_streamed")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    size = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return {"model": model, "store": "compact", "videos": sum(1 for _ in Path(videos).rglob("*.mp4")),
            "store_bytes": size, "extract_seconds": round(extract_seconds, 1), "reader_workers": workers,
            "clips_per_second_by_epoch": [round(r["clips_per_second"], 1) for r in rows],
            "clips_per_second_after_first_epoch": round(max(r["clips_per_second"] for r in rows[1:] or rows), 1),
            "gpu_utilisation": sampler.summary()}


class GpuSampler:
    """GPU utilisation (%) every 0.25 s while training runs: nvidia-smi, else torch.cuda.utilization (NVML)."""

    def __init__(self, device: str):
        self.device, self.samples, self.source = device, [], None
        self._stop = threading.Event()

    def __enter__(self):
        if self.device == "cpu":
            self.source = "none: CPU run"
            return self
        self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "torch.cuda.utilization"
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> float | None:
        if self.source == "nvidia-smi":
            text = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                   "-i", "0"], capture_output=True, text=True, timeout=5).stdout.strip()
            return float(text.splitlines()[0]) if text else None
        import torch

        return float(torch.cuda.utilization(0))

    def _loop(self):
        while not self._stop.is_set():
            try:
                value = self._read()
            except Exception as e:  # no NVML: say so once, stop sampling
                self.source = f"unavailable ({type(e).__name__}: {e})"
                return
            if value is not None:
                self.samples.append(value)
            self._stop.wait(0.25)

    def __exit__(self, *exc):
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join(timeout=10)

    def summary(self) -> dict:
        busy = [s for s in self.samples if s > 0]
        return {"source": self.source, "samples": len(self.samples),
                "mean_percent": round(sum(self.samples) / len(self.samples), 1) if self.samples else None,
                "mean_percent_while_busy": round(sum(busy) / len(busy), 1) if busy else None,
                "max_percent": max(self.samples) if self.samples else None}


def sweep(check: Check, timeout: float) -> dict:
    out = check.out / "sweep"
    args = ["bench", "sweep", "--device", check.device, "--out", out]
    args += ["--ks", "2" if check.smoke else "4", "--repeats", "1", "--epochs", "1"]
    # smoke: K=2 (stacked, as K=4 is) starts 7 runs; each reads in its own process (--workers 0: two spawned
    # readers a run cost ~13 s of start-up on 2 cores) from a store of 6 videos, with a small branch
    args += (["--videos-per-class", "1", "--val-per-class", "1", "--workers", "0", "--width", "32", "--heads", "2",
              "--batch-size", "4"] if check.smoke else [])
    check.mad(args, timeout, "sweep")
    figures = json.loads(next(out.glob("bench_sweep_*.json")).read_text())
    rows = {}
    for k, row in figures["results"].items():
        rows[k] = {mode: {"seconds": round(row[mode]["seconds"]["median"], 2),
                          "clips_configs_per_second": round(row[mode]["clips_configs_per_second"]["median"], 1)}
                   for mode in ("lockstep", "sequential")}
        rows[k]["lockstep_over_sequential_seconds"] = round(row["lockstep_over_sequential"]["seconds"]["median"], 3)
    return {"clips": figures["settings"]["clips"], "epochs": figures["settings"]["epochs"], "by_k": rows}


# --------------------------------------------------------------------------- main


# name -> (budget on a GPU, budget in a smoke run, step); a smoke run's budgets are 5-10 times what an idle
# 2-core machine takes (5-50 s a step): it checks the plumbing on whatever CPU it gets (a busy shared one took
# 40-160 s a step); its whole budget (540 s) still ends it, each step recorded, before its test's timeout
STEPS = {
    "environment": (20, 30, environment),
    "memory_vit_b16": (100, 240, lambda c, t: memory(c, t, "ViT-B-16", 32, MEMORY_MODES, "memory_vit_b16")),
    "cuda_tests": (150, 300, cuda_tests),
    # the in-backbone adapter may not fit an 80 GB H100 at batch 32 (~3.5x ViT-B/16's activations): alone
    "memory_vit_l14": (80, 180, lambda c, t: memory(c, t, "ViT-L-14", 32, ("in-backbone-adapter",
                                                                            "madapter-cached"), "memory_vit_l14",
                                                     one_by_one=True)),
    "extract": (45, 180, extract),
    "train_streamed": (60, 180, train_streamed),
    "sweep": (90, 400, sweep),
}
# --smoke's lanes: these steps one after another, beside the others (cuda_tests, sweep): about as long each
SMOKE_LANE = ("environment", "memory_vit_b16", "memory_vit_l14", "extract", "train_streamed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json, logs and each step's files")
    parser.add_argument("--smoke", action="store_true", help="every step on the CPU at tiny sizes (no GPU needed)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole check (default 460 on a GPU, 540 for --smoke)")
    parser.add_argument("--steps", default=None, help="only these steps, comma-separated (default: all)")
    args = parser.parse_args(argv)
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); use --smoke on a CPU machine",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = args.steps.split(",") if args.steps else list(STEPS)
    unknown = [s for s in chosen if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    # a smoke run measures nothing to quote: its steps run in two lanes side by side, since most of their time is
    # starting Python processes (one core each); on a GPU, one step at a time (its figures must not share the machine)
    parallel = args.smoke and (os.cpu_count() or 1) > 1
    check = Check(args.out, args.smoke, args.budget or (540.0 if args.smoke else 460.0),
                  "cpu" if args.smoke else "cuda", chosen, parallel)

    def run(names: list[str]) -> None:
        for name in names:
            gpu_budget, smoke_budget, step = STEPS[name]
            check.run(name, smoke_budget if args.smoke else gpu_budget, lambda t, step=step: step(check, t))

    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        lanes = [[n for n in chosen if n in SMOKE_LANE], [n for n in chosen if n not in SMOKE_LANE]]
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(run, lanes))
    else:
        run(chosen)
    shutil.rmtree(args.out / "work", ignore_errors=True)  # videos and stores: not results
    statuses = {name: s["status"] for name, s in check.report["steps"].items()}
    check.report["statuses"] = statuses
    check.save()
    print(json.dumps(statuses), flush=True)
    print(f"wrote {args.out / 'gpu_check.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
