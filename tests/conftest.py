"""Shared fixtures: the tiny open_clip config, real clips from ../shared/data, extraction helpers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY_MODEL = str(ROOT / "tests" / "configs" / "mad-tiny-vit.json")
SHARED_DATA = ROOT.parent / "shared" / "data"

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests' own helper modules


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip: a user's checkout has no shared/."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real clips not available: {path} is absent (only in the project's workspace)")
    return path


def copy_videos(sources: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for src in sources:
        shutil.copy(src, dest / src.name)
    return dest


@pytest.fixture
def tiny_model() -> str:
    return TINY_MODEL


def extract_config(videos, out, **overrides):
    from mad.extract.run import ExtractConfig

    options = dict(videos=str(videos), out=str(out), model=TINY_MODEL, pretrained="none", layers="2,4",
                   frames=8, workers=0, progress=False, shard_size=4, precision="fp32")
    options.update(overrides)
    return ExtractConfig(**options)
