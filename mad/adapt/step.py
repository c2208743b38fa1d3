"""One training step of a classifier, and its optimizer and schedule: what `mad train` and every benchmark run.

Only torch is imported here, so a benchmark process that must hold nothing but the
branch can use it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LABEL_SMOOTHING = 0.1
CLIP_GRAD = 1.0  # max gradient norm; 0 turns clipping off


def train_step(forward: Callable[[], torch.Tensor], labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               parameters, autocast=None, label_smoothing: float = LABEL_SMOOTHING, clip_grad: float = CLIP_GRAD,
               loss_weight: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """forward() -> logits [B, C] under `autocast`; cross-entropy, backward, clipping, optimizer step.

    The loss is the sum over the batch times `loss_weight` (default 1/B: the mean).
    Under DDP a rank passes world / global batch, so the averaged gradient equals
    the one-process gradient of the whole batch. Returns (loss, logits), detached.
    """
    optimizer.zero_grad(set_to_none=True)  # before the forward: last step's gradients are not held through it
    with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
        logits = forward()
    weight = loss_weight if loss_weight is not None else 1.0 / len(labels)
    loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing, reduction="sum") * weight
    loss.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
    optimizer.step()
    return loss.detach(), logits.detach()


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, norms, gates)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 1% of the learning rate, then cosine decay to zero, stepped every batch."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_steps])
