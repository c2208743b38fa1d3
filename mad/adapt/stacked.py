"""Same-shape members of a lockstep sweep as one stacked model (HFTA-style fusion with torch.func).

Members whose branches differ only in settings that are not shapes (lr, weight decay,
dropout rate, label smoothing, warmup, clipping, seed) hold the same parameter shapes, so
their parameters stack into [S, ...] tensors and one `vmap(functional_call)` runs all S
models on a shared batch: each matmul gets S times the work, the step S times fewer ops.

Each member keeps its own numbers:
- its own learning rate and schedule (its `torch.optim` scheduler still computes the lr),
  weight decay on matrices only, and the AdamW update of `torch.optim.AdamW`, written
  here over the stack with per-member lr, decay and step count;
- its own gradient-norm clipping: one norm per member, never one over the stack;
- its own label smoothing, and its own dropout masks: `mad.adapt.layers.Dropout` draws
  them from the member's key (seed, epoch, batch) under vmap, and its rate is a buffer
  stacked per member.

A `Stack` is built from its members' modules and optimizers at the start of an epoch and
writes its state back into them at the end (`unstack`), so checkpoints, resume and pruning
see ordinary per-member models and AdamW states.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vmap

from mad.adapt.layers import dropout_key

BETAS, EPS = (0.9, 0.999), 1e-8  # torch.optim.AdamW's defaults, as make_optimizer uses them


def stack_shape(cfg, branch) -> tuple:
    """What members must share to stack: the arch, the branch's shapes (everything but its dropout rate), the
    precision. The rest (lr, weight decay, dropout, label smoothing, warmup, clipping, seed) may differ."""
    return cfg.arch, cfg.precision, branch.replace(dropout=0.0)


class Stack:
    """S members stepping as one model. `members`: lockstep Members (model, optimizer, scheduler, cfg)."""

    def __init__(self, members: list):
        self.members = members
        self.template = template = members[0].model  # functional_call swaps the stacked tensors into it
        modules = [m.model for m in members]
        self.names = [n for n, p in template.named_parameters() if p.requires_grad]
        rate_names = [n for n, _ in template.named_buffers() if n.endswith(".rate")]  # Dropout rates
        S = len(members)
        with torch.no_grad():
            own = [dict(m.named_parameters()) for m in modules]
            self.params = {n: torch.stack([o[n].detach() for o in own]).requires_grad_() for n in self.names}
            buffers = [dict(m.named_buffers()) for m in modules]
            self.rates = {n: torch.stack([b[n] for b in buffers]) for n in rate_names}  # [S]
            self.exp_avg, self.exp_avg_sq = {}, {}
            steps = []
            for n in self.names:
                states = [m.optimizer.state.get(o[n], {}) for m, o in zip(members, own)]
                self.exp_avg[n] = torch.stack([s["exp_avg"] if s else torch.zeros_like(o[n])
                                               for s, o in zip(states, own)])
                self.exp_avg_sq[n] = torch.stack([s["exp_avg_sq"] if s else torch.zeros_like(o[n])
                                                  for s, o in zip(states, own)])
                steps.append([float(s["step"]) if s else 0.0 for s in states])
        device = self.params[self.names[0]].device
        self.steps = torch.tensor(steps[0], dtype=torch.float64)  # [S] AdamW steps taken (equal for every param)
        self.decay = torch.tensor([m.cfg.weight_decay for m in members], dtype=torch.float64)  # [S]
        self.clip = torch.tensor([m.cfg.clip_grad for m in members], device=device)  # [S]; 0: no clipping
        self.smoothing = torch.tensor([m.cfg.label_smoothing for m in members], device=device)[:, None]  # [S, 1]
        self.dropout = any(m.branch.dropout > 0 for m in members)
        self.autocast = members[0].autocast
        self.size = S
        for member in members:
            member.optimizer._opt_called = True  # its scheduler steps after our update (torch would warn)

    def logits(self, inputs, keys: torch.Tensor) -> torch.Tensor:
        """Every member's logits on one batch: keys [S] int64 (each member's dropout key) -> [S, B, C]."""
        def one(params, rates, key):
            with dropout_key(key, self.dropout):
                return functional_call(self.template, {**params, **rates}, (inputs,))
        return vmap(one)(self.params, self.rates, keys)

    def step(self, inputs, labels: torch.Tensor, keys: torch.Tensor, loss_weight: float) -> tuple:
        """One training step of every member on `inputs`, labels [B]: cross-entropy with each member's label
        smoothing (summed over the batch times `loss_weight`), backward, per-member clipping, AdamW.
        Returns (losses [S], logits [S, B, C]), detached."""
        for p in self.params.values():
            p.grad = None
        with self.autocast if self.autocast is not None else torch.autocast("cpu", enabled=False):
            logits = self.logits(inputs, keys)
        logp = logits.float().log_softmax(dim=-1)  # [S, B, C]
        nll = -logp.gather(-1, labels.expand(self.size, -1)[..., None]).squeeze(-1)  # [S, B]
        uniform = -logp.mean(dim=-1)  # [S, B]: cross-entropy against the uniform target
        losses = ((1 - self.smoothing) * nll + self.smoothing * uniform).sum(dim=1) * loss_weight  # [S]
        losses.sum().backward()  # members share no parameter: each gets the gradient of its own loss
        with torch.no_grad():
            self._clip()
            self._adamw([m.optimizer.param_groups[0]["lr"] for m in self.members])
        return losses.detach(), logits.detach()

    def _clip(self) -> None:
        """clip_grad_norm_ per member: g *= min(max_norm / (||g_member|| + 1e-6), 1)."""
        grads = [self.params[n].grad for n in self.names]
        squares = torch.stack([g.reshape(self.size, -1).float().pow(2).sum(dim=1) for g in grads])  # [params, S]
        norms = squares.sum(dim=0).sqrt()  # [S]
        coef = torch.where(self.clip > 0, (self.clip / (norms + 1e-6)).clamp(max=1.0), 1.0)
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))

    def _adamw(self, lrs: list[float]) -> None:
        """torch.optim.AdamW's single-tensor update, with lr, weight decay and step per member. Scalars are
        computed in float64 and cast once, as the optimizer's Python floats are."""
        beta1, beta2 = BETAS
        lr = torch.tensor(lrs, dtype=torch.float64)  # [S]
        self.steps += 1
        step_size = lr / (1 - beta1 ** self.steps)
        correction2 = (1 - beta2 ** self.steps).sqrt()
        for n in self.names:
            p, g, m, v = self.params[n], self.params[n].grad, self.exp_avg[n], self.exp_avg_sq[n]
            shape = (-1,) + (1,) * (p.dim() - 1)
            as_p = lambda x: x.to(p.device, p.dtype).view(shape)  # noqa: E731  [S] -> [S, 1, ...]
            if p.dim() >= 3:  # a matrix per member ([S, out, in]): decayed, as make_optimizer does
                p.mul_(as_p(1 - lr * self.decay))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / as_p(correction2)).add_(EPS)
            p.add_(m / denom * as_p(-step_size))

    def unstack(self) -> None:
        """Write each member's parameters and AdamW state back into its own model and optimizer."""
        with torch.no_grad():
            for s, member in enumerate(self.members):
                own = dict(member.model.named_parameters())
                for n in self.names:
                    own[n].copy_(self.params[n][s])
                    member.optimizer.state[own[n]] = {
                        "step": torch.tensor(float(self.steps[s])), "exp_avg": self.exp_avg[n][s].clone(),
                        "exp_avg_sq": self.exp_avg_sq[n][s].clone()}


def bytes_per_member(model: torch.nn.Module, forward) -> tuple[int, int]:
    """(held, step) bytes of one member: `held` = its model, the stacked copy, its gradient and two AdamW
    moments (5 x the trainable parameter bytes); `step` = what autograd keeps for backward in one forward
    (`forward()`: the member's model on a real batch, measured with saved-tensor hooks) times 2, since the
    backward pass holds gradients of about the same size at its peak."""
    held = 5 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())  # each storage once
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), dropout_key(torch.tensor(0)):
        out = forward()
    del out
    model.zero_grad(set_to_none=True)
    return held, 2 * sum(seen.values())
