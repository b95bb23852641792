"""First-order Taylor importance of the cross-entropy loss.

The importance of channel c is the expected absolute first-order change of the loss when the
channel's activation a (after its normalisation layer) is set to zero,

    I_c = (1/N) Σ_n | Σ_{h,w} a_{n,c,h,w} · ∂L_n/∂a_{n,c,h,w} |,

summed over every place the group's channel appears (Molchanov et al., "Pruning Convolutional
Neural Networks for Resource Efficient Inference", ICLR 2017). It is computed exactly as the
gradient of the loss with respect to a per-example gate of ones on each group's channels
(:mod:`prunecp_cli.surgery.gates`): one forward and one backward pass per batch for all groups.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from prunecp_cli.importance.base import Importance, ImportanceContext, Needs
from prunecp_cli.surgery.gates import ChannelGates


def gate_gradients(ctx: ImportanceContext, loss_fn, *, description: str) -> dict[str, torch.Tensor]:
    """Σ over examples of |∂loss_n/∂gate_n| per group channel, all-reduced, divided by N.

    Args:
        ctx: the importance context (its data give the batches).
        loss_fn: ``(logits, labels) -> per-example losses`` whose sum is differentiated.
        description: progress-bar label.
    """
    totals = {g.name: torch.zeros(g.channels, dtype=torch.float64, device=ctx.device) for g in ctx.groups}
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    with ChannelGates(ctx.model, ctx.groups) as gates:
        for batch in ctx.batches(description=description):
            values = {g.name: gates.ones(g.name, batch=batch.x.shape[0], requires_grad=True, device=ctx.device)
                      for g in ctx.groups}
            with torch.enable_grad():
                losses = loss_fn(ctx.model(batch.x), batch.y)
                grads = torch.autograd.grad(losses.sum(), list(values.values()), allow_unused=True)
            for name, grad in zip(values, grads, strict=True):
                if grad is not None:
                    totals[name] += grad.detach().abs().double().sum(0)
            count += batch.x.shape[0]
    count = ctx.reduce(count)
    return {name: (ctx.reduce(total) / count).cpu() for name, total in totals.items()}


class TaylorImportance(Importance):
    """Mean |Σ_hw a·∂CE/∂a| per channel (see module docstring)."""

    name = "taylor"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        return gate_gradients(
            ctx,
            lambda logits, labels: F.cross_entropy(logits, labels, reduction="none"),
            description="taylor",
        )
