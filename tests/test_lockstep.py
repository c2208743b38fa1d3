"""Lockstep training: members read each batch once and write the numbers they would write alone."""

from __future__ import annotations

import json

import pytest

from tests.helpers.cache import make_cache
from mad.adapt.config import resolve
from mad.adapt.lockstep import reading_groups, train_lockstep
from mad.adapt.train import TrainConfig, count_classes, train
from mad.cache.dataset import open_tokens
from mad.cache.store import Store

TINY = dict(width=32, heads=2, batch_size=16, lr=3e-3, warmup_epochs=1, workers=0, epochs=2, in_ram="yes")


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("caches")
    make_cache(root / "train", videos_per_class=24, seed=0)
    make_cache(root / "val", videos_per_class=8, seed=1)
    return {name: str(root / name) for name in ("train", "val")}


def config(caches, out, **overrides):
    return TrainConfig(**{**dict(cache=caches["train"], val=caches["val"], out=str(out), **TINY), **overrides})


def metric_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("epoch_seconds", "clips_per_second")} for row in rows]


def lockstep(caches, configs, **options):
    train_store, val_store = Store.open(caches["train"]), Store.open(caches["val"])
    classes = count_classes(train_store, val_store)
    members = [resolve(cfg, train_store.manifest, classes, cfg.cache) for cfg in configs]
    train_data, val_data = open_tokens(train_store, "yes", 0), open_tokens(val_store, "yes", 0)
    try:
        return train_lockstep(members, train_data, val_data, quiet=True, **options), train_data
    finally:
        train_data.close()
        val_data.close()


def assert_same_rows(alone, together):
    assert len(alone) == len(together)
    for a, b in zip(alone, together):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-3)
        assert a["val/acc/top1"] == pytest.approx(b["val/acc/top1"], abs=1.5 / 16)
        assert a["lr"] == pytest.approx(b["lr"])


@pytest.fixture
def stack_sizes(monkeypatch):
    """The size of every stacked model a lockstep builds."""
    import mad.adapt.lockstep as lockstep_module
    sizes = []

    class Counted(lockstep_module.Stack):
        def __init__(self, members):
            super().__init__(members)
            sizes.append(len(members))
    monkeypatch.setattr(lockstep_module, "Stack", Counted)
    return sizes


def test_grid_in_lockstep_matches_each_member_alone(caches, tmp_path, stack_sizes):
    """2 lr x 2 weight decays with dropout, and a mate without: one stack of 5, each member as alone."""
    grid = [dict(lr=lr, weight_decay=wd, dropout=0.2) for lr in (3e-3, 1e-3) for wd in (0.0, 0.1)] + [dict(dropout=0.0)]
    configs = [config(caches, tmp_path / "lock" / str(i), **g) for i, g in enumerate(grid)]
    summaries, _ = lockstep(caches, configs)
    assert stack_sizes == [5, 5]  # one stacked model per epoch
    for i, g in enumerate(grid):
        train(config(caches, tmp_path / "alone" / str(i), **g), quiet=True)
        assert_same_rows(metric_rows(tmp_path / "alone" / str(i)), metric_rows(tmp_path / "lock" / str(i)))
        assert summaries[i]["run"] == str(tmp_path / "lock" / str(i))
    # the settings did change the numbers: the test can fail
    assert metric_rows(tmp_path / "lock" / "0") != metric_rows(tmp_path / "lock" / "2")
    assert metric_rows(tmp_path / "lock" / "0") != metric_rows(tmp_path / "lock" / "4")


def test_dropout_member_does_not_depend_on_its_mates(caches, tmp_path):
    one = [config(caches, tmp_path / "a" / "0", dropout=0.3), config(caches, tmp_path / "a" / "1", lr=1e-3)]
    three = [config(caches, tmp_path / "b" / "0", dropout=0.3)] + [
        config(caches, tmp_path / "b" / str(i), dropout=0.3, lr=lr) for i, lr in ((1, 1e-3), (2, 2e-3), (3, 5e-4))]
    lockstep(caches, one)
    lockstep(caches, three)
    assert metric_rows(tmp_path / "a" / "0") == metric_rows(tmp_path / "b" / "0")


def test_batch_size_and_seed_split_reading_groups_and_each_batch_is_read_once(caches, tmp_path, monkeypatch):
    configs = [config(caches, tmp_path / str(i), lr=lr, batch_size=bs)
               for i, (lr, bs) in enumerate([(3e-3, 16), (1e-3, 16), (2e-3, 16), (3e-3, 8)])]
    assert list(reading_groups([(cfg, None) for cfg in configs]).values()) == [[0, 1, 2], [3]]
    assert len(reading_groups([(config(caches, "x", seed=s), None) for s in (0, 1)])) == 2
    from mad.cache.dataset import CachedTokens
    reads = []
    original = CachedTokens.train_batches

    def counted(self, batch_size, seed, epoch):
        for batch in original(self, batch_size, seed, epoch):
            reads.append(batch_size)
            yield batch
    monkeypatch.setattr(CachedTokens, "train_batches", counted)
    lockstep(caches, configs)
    videos = 48
    assert reads.count(16) == 2 * -(-videos // 16)  # once per batch for the 3 members, not 3 times
    assert reads.count(8) == 2 * -(-videos // 8)


def test_one_read_of_the_val_split_validates_every_member(caches, tmp_path, monkeypatch):
    from mad.cache.dataset import CachedTokens
    passes = []
    original = CachedTokens.eval_batches

    def counted(self, *args, **kwargs):
        passes.append(self.num_videos)
        yield from original(self, *args, **kwargs)
    monkeypatch.setattr(CachedTokens, "eval_batches", counted)
    lockstep(caches, [config(caches, tmp_path / str(i), lr=lr) for i, lr in enumerate((3e-3, 1e-3, 2e-3))])
    # 2 epochs: one val pass each for the 3 members; the summaries reuse the best epoch's probabilities
    assert len(passes) == 2, passes


def test_clipping_is_per_member(caches, tmp_path):
    """A member clipped hard and one not clipped: each matches its run alone (one norm over both would not)."""
    configs = [config(caches, tmp_path / "l0", clip_grad=0.01), config(caches, tmp_path / "l1", clip_grad=0.0)]
    lockstep(caches, configs)
    train(config(caches, tmp_path / "a0", clip_grad=0.01), quiet=True)
    assert_same_rows(metric_rows(tmp_path / "a0"), metric_rows(tmp_path / "l0"))
    assert metric_rows(tmp_path / "l0") != metric_rows(tmp_path / "l1")


def test_pruned_member_stops_and_says_when(caches, tmp_path):
    configs = [config(caches, tmp_path / str(i), lr=lr, epochs=3) for i, lr in enumerate((3e-3, 1e-3))]
    summaries, _ = lockstep(caches, configs, on_epoch_end=lambda i, row: i == 1 and row["epoch"] == 1)
    assert summaries[1]["pruned_at_epoch"] == 1 and len(metric_rows(tmp_path / "1")) == 1
    assert "pruned_at_epoch" not in summaries[0] and len(metric_rows(tmp_path / "0")) == 3


def test_max_stack_and_free_memory_set_the_stacks(caches, tmp_path, monkeypatch, stack_sizes):
    import mad.adapt.lockstep as lockstep_module
    configs = [config(caches, tmp_path / "a" / str(i), lr=lr, epochs=1) for i, lr in enumerate((3e-3, 1e-3, 2e-3))]
    lockstep(caches, configs, max_stack=2)
    assert stack_sizes == [2]  # a stack of 2, the third alone
    train_store = Store.open(caches["train"])
    members = [resolve(cfg, train_store.manifest, 2, cfg.cache) for cfg in configs]
    data = open_tokens(train_store, "yes", 0)
    try:
        assert lockstep_module.members_at_once(members, data) == 3  # a tiny branch: all fit
        monkeypatch.setattr(lockstep_module, "available_memory", lambda: 0)
        assert lockstep_module.members_at_once(members, data) == 1
    finally:
        data.close()
    configs = [config(caches, tmp_path / "b" / str(i), lr=lr, epochs=1) for i, lr in enumerate((3e-3, 1e-3, 2e-3))]
    summaries, _ = lockstep(caches, configs)  # no memory: one at a time, unstacked; still every member trained
    assert stack_sizes == [2]
    assert [len(metric_rows(tmp_path / "b" / str(i))) for i in range(3)] == [1, 1, 1] and len(summaries) == 3


def test_stacked_equals_one_after_another(caches, tmp_path):
    grid = [dict(lr=3e-3, dropout=0.3), dict(lr=1e-3, label_smoothing=0.0, clip_grad=0.05)]
    lockstep(caches, [config(caches, tmp_path / "s" / str(i), **g) for i, g in enumerate(grid)])
    lockstep(caches, [config(caches, tmp_path / "q" / str(i), **g) for i, g in enumerate(grid)], max_stack=1)
    for i in range(2):
        assert_same_rows(metric_rows(tmp_path / "q" / str(i)), metric_rows(tmp_path / "s" / str(i)))
