"""Weight-magnitude importance: the norm of each filter, summed over a coupled group.

For every layer whose output channels the group removes (convolutions, linear layers), the filter of
channel c is ``weight[c]`` (all its input channels and kernel positions); its norm is added to the
score of the group channel it belongs to. Li et al., "Pruning Filters for Efficient ConvNets",
ICLR 2017, use the L1 norm.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from prunecp_cli.importance.base import Importance, ImportanceContext, Needs


class _NormImportance(Importance):
    needs: ClassVar[Needs] = Needs.NONE
    p: ClassVar[int] = 1

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        modules = dict(ctx.model.named_modules())
        scores = {}
        for group in ctx.groups:
            total = torch.zeros(group.channels, dtype=torch.float64)
            for member in group.producers():
                weight = modules[member.module].weight.detach()
                rows = weight[list(member.member_idxs)].flatten(1).double()
                norms = rows.abs().sum(1) if self.p == 1 else rows.pow(2).sum(1).sqrt()
                total.index_add_(0, torch.tensor(member.root_idxs), norms.cpu())
            scores[group.name] = total
        return scores


class L1Importance(_NormImportance):
    """Sum over the group's filters of Σ|w| per filter."""

    name = "l1"
    p = 1


class L2Importance(_NormImportance):
    """Sum over the group's filters of ‖w‖₂ per filter."""

    name = "l2"
    p = 2
