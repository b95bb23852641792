"""Weight-magnitude importance of a coupled group: the norms of every member's weights, averaged.

Removing group channel c removes, in every member of the group, the weights that touch it:

* a producer's filter (convolution or linear output channel): ``weight[c]``, all its input channels
  and kernel positions (for a depthwise convolution: its 9 weights);
* a consumer's input slice (convolution or linear input channel): ``weight[:, c]`` (a grouped
  convolution's slice repeats over its groups; a linear layer after a flatten has one column per
  position, all counted for the channel);
* a normalisation layer's affine scale ``weight[c]`` (BatchNorm, LayerNorm, GroupNorm).

``members="all"`` (the default) gives every member's per-channel norm n_m(c) (L1: Σ|w|; L2: ‖w‖₂
over the weights of channel c in member m) and averages over the members: ``I(c) = (1/M) Σ_m n_m(c)``
(``normalise="none"``, the default), which is Torch-Pruning's ``MagnitudeImportance``
(``group_reduction="mean"``; it sums ``|w|^p`` without the p-th root, the same order for L1).
``normalise="mean"`` first **divides each member's norms by their mean over the group's channels**
(so a 9-weight depthwise filter, a 1-weight BatchNorm scale and a 1,152-weight dense filter weigh
alike): ``I(c) = (1/M) Σ_m n_m(c) / mean_c' n_m(c')``, whose scores have mean 1 per group. Neither won
on every benchmark model (README, "Importance methods"); the default is the one that matches the
reference tool.

``members="filters"`` is the earlier behaviour: the sum of the producers' filter norms only
(consumers and normalisation scales ignored), Li et al., "Pruning Filters for Efficient ConvNets",
ICLR 2017, summed over a group's producers.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options
from prunecp_cli.surgery.groups import CONV_TYPES, ChannelGroup, Member, layer_width

MEMBERS = ("all", "filters")
NORMALISE = ("mean", "none")


def _slices(module: nn.Module, member: Member) -> torch.Tensor | None:
    """The member's weights per channel it loses, ``[len(member_idxs), k]`` (None: no weights)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() == 0:
        return None
    w = weight.detach().double()
    idxs = torch.tensor(member.member_idxs, dtype=torch.long)
    if member.direction == "out":
        if isinstance(module, CONV_TYPES) and getattr(module, "transposed", False):
            w = w.transpose(0, 1)
        return w[idxs].reshape(len(idxs), -1)
    if isinstance(module, nn.Linear):
        return w.t()[idxs]
    if isinstance(module, CONV_TYPES):
        if module.transposed:
            return w[idxs].flatten(1)
        cols = w.transpose(0, 1).flatten(1)  # [in_channels / groups, out * k]
        if module.groups > 1 and cols.shape[0] != module.in_channels:
            cols = cols.repeat(module.groups, 1)  # grouped: every group reads its own slice
        return cols[idxs]
    return None


def _norms(slices: torch.Tensor, p: int) -> torch.Tensor:
    return slices.abs().sum(1) if p == 1 else slices.pow(2).sum(1).sqrt()


def group_magnitude(modules: dict[str, nn.Module], group: ChannelGroup, *, p: int, members: str = "all",
                    normalise: str = "none") -> torch.Tensor:
    """Magnitude importance of ``group``'s channels (see the module docstring), float64 ``[channels]``."""
    parts = []
    chosen = group.producers() if members == "filters" else group.members
    for member in chosen:
        if member.kind not in ("conv", "linear", "norm"):
            continue
        width = layer_width(modules[member.module], member.direction == "out")
        if width is not None and max(member.member_idxs, default=-1) >= width:
            continue  # a mapping the graph could not follow (its group is kept whole)
        slices = _slices(modules[member.module], member)  # a norm's scale: one weight per channel
        if slices is None:
            continue  # e.g. a norm without an affine scale
        norm = torch.zeros(group.channels, dtype=torch.float64)
        norm.index_add_(0, torch.tensor(member.root_idxs), _norms(slices, p))
        if normalise == "mean":
            mean = norm.mean()
            if not mean > 0:
                continue  # an all-zero member ranks nothing
            norm = norm / mean
        parts.append(norm)
    if not parts:
        return torch.zeros(group.channels, dtype=torch.float64)
    return torch.stack(parts).mean(0)


class _NormImportance(Importance):
    needs: ClassVar[Needs] = Needs.NONE
    p: ClassVar[int] = 1

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        options = method_options(ctx, self.name)
        for key, allowed in (("members", MEMBERS), ("normalise", NORMALISE)):
            if options[key] not in allowed:
                raise UsageError(f"--opt {key}={options[key]}: use one of {', '.join(allowed)}")
        modules = dict(ctx.model.named_modules())
        return {group.name: group_magnitude(modules, group, p=self.p, members=options["members"],
                                            normalise=options["normalise"])
                for group in ctx.groups}


class L1Importance(_NormImportance):
    """Mean over the group's members of each member's Σ|w| per channel."""

    name = "l1"
    p = 1


class L2Importance(_NormImportance):
    """Mean over the group's members of each member's ‖w‖₂ per channel."""

    name = "l2"
    p = 2
