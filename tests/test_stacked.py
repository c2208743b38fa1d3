"""A stacked step (mad.adapt.stacked) does what torch's own step does to each member alone."""

from __future__ import annotations

import types

import pytest
import torch

from mad.adapt.branch import BranchConfig
from mad.adapt.families import build_model
from mad.adapt.layers import Dropout, dropout_key, step_key
from mad.adapt.stacked import Stack, bytes_per_member
from mad.adapt.step import make_optimizer, make_scheduler, train_step

BRANCH = BranchConfig(arch="madapter", num_levels=2, in_width=32, num_tokens=17, num_frames=4, num_classes=5,
                      width=16, heads=2, correlation=0, cell_size=1)


def member(lr, weight_decay, clip_grad, dropout, smoothing=0.1, seed=0):
    torch.manual_seed(seed)
    branch = BRANCH.replace(dropout=dropout)
    model = build_model(branch)
    optimizer = make_optimizer(model, lr, weight_decay)
    cfg = types.SimpleNamespace(weight_decay=weight_decay, clip_grad=clip_grad, label_smoothing=smoothing)
    return types.SimpleNamespace(model=model.train(), optimizer=optimizer, cfg=cfg, branch=branch, autocast=None,
                                 scheduler=make_scheduler(optimizer, 2, 10))


SETTINGS = [dict(lr=3e-3, weight_decay=0.0, clip_grad=1.0, dropout=0.3),
            dict(lr=1e-3, weight_decay=0.1, clip_grad=0.01, dropout=0.0),  # clipped hard: its own norm
            dict(lr=2e-3, weight_decay=0.05, clip_grad=0.0, dropout=0.1, smoothing=0.0)]


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    levels = [torch.randn(6, 4, 17, 32, generator=generator).half() for _ in range(2)]
    return levels, torch.randint(0, 5, (6,), generator=generator)


def test_stacked_steps_equal_each_member_alone(batch):
    levels, labels = batch
    alone = [member(**s) for s in SETTINGS]
    stacked = [member(**s) for s in SETTINGS]
    stack = Stack(stacked)
    inputs = stacked[0].model.inputs(levels)
    for step in range(3):
        key = step_key(0, 1, step)
        losses, logits = stack.step(inputs, labels, torch.full((3,), key), 1 / len(labels))
        for s, m in enumerate(alone):
            with dropout_key(torch.tensor(key)):
                loss, own_logits = train_step(lambda: m.model(inputs), labels, m.optimizer, m.model.parameters(),
                                              None, m.cfg.label_smoothing, m.cfg.clip_grad)
            assert losses[s].item() == pytest.approx(loss.item(), rel=1e-5)
            assert torch.allclose(logits[s], own_logits, atol=1e-5)
            m.scheduler.step()
            stacked[s].scheduler.step()
    stack.unstack()
    for m, s in zip(alone, stacked):
        for (name, a), b in zip(m.model.named_parameters(), s.model.parameters()):
            # the key's bias has a zero true gradient (softmax ignores it): Adam scales rounding noise up to
            # lr-sized steps there, so it only gets a looser bound
            assert torch.allclose(a, b, atol=1e-3 if name.endswith("qkv.bias") else 1e-5), name
        state_a, state_b = m.optimizer.state_dict()["state"], s.optimizer.state_dict()["state"]
        assert all(torch.allclose(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"], rtol=1e-5, atol=1e-12)
                   and float(state_a[k]["step"]) == float(state_b[k]["step"]) for k in state_a)
    # the settings changed the numbers: the test can fail
    first = [p for p in alone[0].model.parameters()][3]
    assert not torch.allclose(first, [p for p in alone[1].model.parameters()][3])


def test_keyed_dropout_is_a_function_of_key_and_rate_only():
    drop = Dropout(0.5).train()
    x = torch.ones(1000)
    with dropout_key(torch.tensor(7)):
        a = drop(x)
    with dropout_key(torch.tensor(7)):
        b = drop(x)
    with dropout_key(torch.tensor(8)):
        c = drop(x)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 400 < int((a == 0).sum()) < 600 and set(a.unique().tolist()) == {0.0, 2.0}
    assert step_key(0, 1, 2) != step_key(0, 2, 1) != step_key(1, 1, 2)


def test_member_memory_is_measured(batch):
    levels, _ = batch
    m = member(**SETTINGS[0])
    inputs = m.model.inputs(levels)
    held, step = bytes_per_member(m.model, lambda: m.model(inputs))
    parameters = sum(p.numel() for p in m.model.parameters())
    assert held == 5 * 4 * parameters
    assert step > 6 * 4 * 17 * 16 * 4  # at least one [B, T, N, d] float32 activation kept for backward
    assert all(p.grad is None for p in m.model.parameters())
