"""Helpers shared by the tests: the tiny open_clip config, real clips from ../shared/data, extraction settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_MODEL = str(ROOT / "tests" / "configs" / "mad-tiny-vit.json")
SHARED_DATA = ROOT.parent / "shared" / "data"


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


def extract_config(videos, out, **overrides):
    """ExtractConfig for the tiny random-weight ViT, one process, small shards."""
    from mad.extract.run import ExtractConfig

    options = dict(videos=str(videos), out=str(out), model=TINY_MODEL, pretrained="none", layers="2,4",
                   frames=8, workers=0, progress=False, shard_size=4, precision="fp32", store="full")
    options.update(overrides)
    return ExtractConfig(**options)
