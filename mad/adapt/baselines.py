"""The static baselines: what a branch scores without any temporal modelling (`mad demo` compares them).

    meanpool   every level averaged over time and tokens -> projection + fusion -> head
    linear     deepest level's CLS averaged over time -> head

They read what M-adapter reads (the store's --layers, full or compact).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mad.adapt.branch import BranchConfig, register
from mad.adapt.layers import GatedFusion, Head
from mad.adapt.madapter import LayersFamily
from mad.cache.inputs import BranchInputs, branch_inputs


class MeanPool(nn.Module):
    """Baseline: every level averaged over time and tokens, then projection and fusion. No temporal module."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.fusion = GatedFusion(cfg.num_levels, cfg.in_width, cfg.width)
        self.head = Head(cfg.width, cfg.num_classes, cfg.dropout)

    def forward(self, x: list[torch.Tensor] | BranchInputs) -> torch.Tensor:
        x = x if isinstance(x, BranchInputs) else branch_inputs(x, cells=False)
        pooled = [m.mean(dim=1) for m in x.token_mean]  # K x [B, D]
        return self.head(self.fusion(pooled))


class LinearProbe(nn.Module):
    """Baseline: the deepest level's CLS token averaged over time, LayerNorm, Linear."""

    def __init__(self, cfg: BranchConfig):
        super().__init__()
        self.head = Head(cfg.in_width, cfg.num_classes, cfg.dropout)

    def forward(self, x: list[torch.Tensor] | BranchInputs) -> torch.Tensor:
        cls = x.cls[-1] if isinstance(x, BranchInputs) else x[-1][:, :, 0].float()  # [B, T, D]
        return self.head(cls.mean(dim=1))  # [B, D] -> [B, C]


class MeanPoolFamily(LayersFamily):
    name = "meanpool"
    description = "baseline: every level averaged over time and tokens, fused, linear head (no temporal model)"
    trains = "meanpool head"
    model = MeanPool


class LinearFamily(LayersFamily):
    name = "linear"
    description = "baseline: the deepest level's CLS averaged over time, linear head"
    trains = "linear probe"
    model = LinearProbe


register(MeanPoolFamily())
register(LinearFamily())
