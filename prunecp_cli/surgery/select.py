"""Choose which channels to remove from importance scores.

Two targets and two scopes:

* ``ratio``: remove a fraction of channels. With ``scope="local"`` each group loses that fraction of
  its own channels; with ``scope="global"`` the channels of all groups are ranked together (after
  putting each group's importances on one scale, :func:`normalised`; by default their within-group
  rank) and the fraction applies to the total.
* ``target_flops``: keep that fraction of the dense FLOPs. Local scope searches (by bisection) one
  ratio shared by all groups; global scope searches the number of globally lowest channels to drop.
  During the search FLOPs come from :class:`FlopsModel`, exact for convolutions, linear layers and
  normalisations (their FLOPs are bilinear in input and output channels); the final model is then
  counted with fvcore (the model holds pooling FLOPs constant; they are well under 0.1 % here).

Every group keeps at least one channel and loses at most ``max_layer_ratio`` of its channels;
``protect`` keeps each group's top ⌈protect·C⌉ channels out of the ranking; ``round_to`` keeps
channel counts multiples of N (for hardware-friendly widths). Ties are broken by channel index.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prunecp_cli.errors import PlanError, UsageError
from prunecp_cli.surgery.groups import CONV_TYPES, NORM_TYPES, ChannelGroup

Removal = dict[str, list[int]]
NORMALISATIONS = ("standard", "rank", "mean-abs", "none")


@dataclass(frozen=True)
class Policy:
    """Constraints on every group.

    Attributes:
        scope: ``"local"`` or ``"global"``.
        max_layer_ratio: the largest fraction of a group's channels that may be removed.
        round_to: remaining channel counts are multiples of this.
        protect: fraction of each group's most important channels never removed.
        normalise: how global selection puts each group's scores on one scale (:func:`normalised`).
    """

    scope: str = "local"
    max_layer_ratio: float = 0.9
    round_to: int = 1
    protect: float = 0.0
    normalise: str = "rank"

    def __post_init__(self) -> None:
        if self.scope not in ("local", "global"):
            raise UsageError(f"{{arg}} {self.scope!r}: use local or global", arguments={"arg": "scope"})
        if self.normalise not in NORMALISATIONS:
            raise UsageError(f"{{arg}} {self.normalise!r}: use one of {', '.join(NORMALISATIONS)}",
                             arguments={"arg": "normalise"})
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise UsageError(f"{{arg}} {self.max_layer_ratio} must lie in (0, 1)", arguments={"arg": "max_layer_ratio"})
        if self.round_to < 1:
            raise UsageError(f"{{arg}} {self.round_to} must be at least 1", arguments={"arg": "round_to"})
        if not 0.0 <= self.protect < 1.0:
            raise UsageError(f"{{arg}} {self.protect} must lie in [0, 1)", arguments={"arg": "protect"})

    def max_removable(self, channels: int) -> int:
        """Most channels a group of ``channels`` may lose under the caps and protection."""
        cap = min(math.floor(self.max_layer_ratio * channels + 1e-9), channels - 1)
        if self.protect > 0:
            cap = min(cap, channels - max(1, math.ceil(self.protect * channels - 1e-9)))
        return self.rounded(channels, max(cap, 0))

    def rounded(self, channels: int, remove: int) -> int:
        """Largest removal ≤ ``remove`` that leaves a multiple of ``round_to`` channels."""
        if self.round_to == 1:
            return remove
        keep = math.ceil((channels - remove) / self.round_to) * self.round_to
        return max(channels - min(keep, channels), 0)


def fold(groups: list[ChannelGroup], scores: dict[str, torch.Tensor]):
    """Groups and scores with each block-structured group seen as its block width.

    A group of ``C`` channels in ``k`` blocks that must shrink together (grouped convolutions,
    :attr:`ChannelGroup.channel_groups`) becomes ``C/k`` offsets, each scored by the mean of its
    ``k`` channels; removing offset ``j`` removes channel ``j`` of every block. A group whose
    grouping cannot be followed (``channel_groups == 0``) becomes a group of one offset, which the
    caps never remove.
    """
    folded, folded_scores = [], {}
    for group in groups:
        blocks = group.channel_groups
        if blocks == 1:
            folded.append(group)
            folded_scores[group.name] = scores[group.name]
        elif blocks == 0:
            folded.append(dataclasses.replace(group, channels=1))
            folded_scores[group.name] = torch.zeros(1, dtype=torch.float64)
        else:
            folded.append(dataclasses.replace(group, channels=group.channels // blocks))
            folded_scores[group.name] = scores[group.name].double().reshape(blocks, -1).mean(0)
    return folded, folded_scores


def unfold(groups: list[ChannelGroup], removal: Removal) -> Removal:
    """Channel indices of a removal chosen on :func:`fold`'s offsets."""
    out = {}
    for group in groups:
        offsets = removal.get(group.name, [])
        blocks = group.channel_groups
        if blocks == 0:
            out[group.name] = []
        elif blocks == 1:
            out[group.name] = list(offsets)
        else:
            width = group.channels // blocks
            out[group.name] = sorted(j + b * width for b in range(blocks) for j in offsets)
    return out


def policy_of(policy: Policy, group: ChannelGroup) -> Policy:
    """The policy on a folded group: ``k`` blocks of kept offsets must give a multiple of round_to channels."""
    blocks = group.channel_groups
    if blocks <= 1 or policy.round_to == 1:
        return policy
    return dataclasses.replace(policy, round_to=policy.round_to // math.gcd(policy.round_to, blocks))


def order_channels(scores: torch.Tensor) -> torch.Tensor:
    """Channel indices from least to most important (stable: ties by index)."""
    return torch.sort(scores.double(), stable=True).indices


def select_local_ratio(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], ratio: float,
                       policy: Policy) -> Removal:
    """Remove ⌊ratio·C⌋ lowest channels of each group (within the caps)."""
    removal = {}
    for group in groups:
        rule = policy_of(policy, group)
        count = min(math.floor(ratio * group.channels + 1e-9), rule.max_removable(group.channels))
        count = rule.rounded(group.channels, count)
        removal[group.name] = sorted(order_channels(scores[group.name])[:count].tolist())
    return removal


def normalised(scores: dict[str, torch.Tensor], how: str = "rank") -> dict[str, torch.Tensor]:
    """Each group's importances on a scale shared by all groups, for global selection.

    ``how``:

    * ``rank`` (the default): the within-group rank, (position + ½) / C, so every group spreads over
      (0, 1) alike; correct for signed scores and for any monotone change of a group's scale.
      Measured with examples/benchmarks/select_normalisation.py (vgg_small and resnet_small, 0.5 and
      0.3 of FLOPs, global scope, BatchNorm re-estimated, mean LAC set size over 100 re-splits): over
      l1, taylor and cp-taylor (non-negative scores) rank 3.16 = mean-abs 3.16 < standard 3.25; over
      shapley and one-shot cp-bruteforce (signed) rank 4.79 < standard 4.93 < mean-abs 5.36.
    * ``standard``: (s − group mean) / group standard deviation (constant groups become 0), also
      correct for signed scores and unchanged by a group-wise scale or offset.
    * ``mean-abs``: s / group mean of |s| (the former rule: a group of signed scores with a mean
      near zero gets huge values, and noise can cut a layer deeply).
    * ``none``: as they are (scores already on one scale, e.g. cp-bruteforce's global greedy rounds).
    """
    out = {}
    for name, value in scores.items():
        value = value.double()
        if how == "none":
            out[name] = value
        elif how == "rank":
            rank = torch.empty_like(value)
            rank[order_channels(value)] = torch.arange(len(value), dtype=torch.float64)
            out[name] = (rank + 0.5) / len(value)
        elif how == "mean-abs":
            mean = value.abs().mean()
            out[name] = value / mean if mean > 0 else torch.zeros_like(value)
        else:
            spread = value.std(unbiased=False) if len(value) > 1 else value.new_zeros(())
            out[name] = (value - value.mean()) / spread if spread > 0 else torch.zeros_like(value)
    return out


def global_order(groups: list[ChannelGroup], scores: dict[str, torch.Tensor],
                 policy: Policy) -> list[tuple[str, int]]:
    """All removable (group, channel) pairs, least important first, respecting the per-group caps."""
    norm = normalised({g.name: scores[g.name] for g in groups}, policy.normalise)
    candidates = []
    for position, group in enumerate(groups):
        order = order_channels(norm[group.name])[: policy_of(policy, group).max_removable(group.channels)]
        for rank, channel in enumerate(order.tolist()):
            candidates.append((float(norm[group.name][channel]), position, rank, group.name, channel))
    candidates.sort()
    return [(name, channel) for *_, name, channel in candidates]


def select_global_count(groups: list[ChannelGroup], order: list[tuple[str, int]], count: int,
                        policy: Policy) -> Removal:
    """Remove the first ``count`` channels of the global order, then round each group."""
    removal: Removal = {g.name: [] for g in groups}
    for name, channel in order[:count]:
        removal[name].append(channel)
    by_name = {g.name: g for g in groups}
    for name, chosen in removal.items():
        keep = policy_of(policy, by_name[name]).rounded(by_name[name].channels, len(chosen))
        removal[name] = sorted(chosen[:keep])
    return removal


class FlopsModel:
    """Predict a pruned model's FLOPs from the dense per-layer counts, without pruning it.

    For a convolution or linear layer the count scales with (kept inputs / inputs) × (kept outputs /
    outputs); a depthwise convolution and a normalisation scale with kept channels; FLOPs outside
    these layers (pooling, functional ops) are held constant.

    Args:
        model: the dense model.
        groups: its prunable groups.
        per_module: fvcore FLOPs per module name (``''`` for the total).
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], per_module: dict[str, int]) -> None:
        self.total = per_module[""]
        self.groups = groups
        self._layers: dict[str, tuple[int, int, int, bool]] = {}
        layer_flops = 0
        for name, module in model.named_modules():
            flops = per_module.get(name, 0)
            if flops == 0 or not isinstance(module, (nn.Linear, *CONV_TYPES, *NORM_TYPES)):
                continue
            if isinstance(module, CONV_TYPES):
                c_in, c_out = module.in_channels, module.out_channels
                depthwise = module.groups > 1 and module.groups == c_in
            elif isinstance(module, nn.Linear):
                c_in, c_out, depthwise = module.in_features, module.out_features, False
            else:
                c_in = c_out = _norm_channels(module)
                depthwise = True
            self._layers[name] = (flops, c_in, c_out, depthwise)
            layer_flops += flops
        self.fixed = self.total - layer_flops

    def __call__(self, removal: Removal) -> float:
        """Predicted FLOPs after removing ``removal``."""
        removed_in: dict[str, int] = {}
        removed_out: dict[str, int] = {}
        for group in self.groups:
            chosen = set(removal.get(group.name, ()))
            if not chosen:
                continue
            for member in group.members:
                count = sum(1 for r in member.root_idxs if r in chosen)
                target = removed_out if member.direction == "out" else removed_in
                target[member.module] = target.get(member.module, 0) + count
        total = float(self.fixed)
        for name, (flops, c_in, c_out, depthwise) in self._layers.items():
            keep_out = (c_out - removed_out.get(name, 0)) / c_out
            if depthwise:
                total += flops * keep_out
            else:
                total += flops * keep_out * (c_in - removed_in.get(name, 0)) / c_in
        return total


def _norm_channels(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    return module.num_features


def check_target(ratio: float | None, target_flops: float | None) -> None:
    """Exactly one target, inside (0, 1).

    Raises:
        UsageError: neither or both targets, or a value outside (0, 1).
    """
    if (ratio is None) == (target_flops is None):
        raise UsageError("give exactly one of {ratio} and {flops}", arguments={"ratio": "ratio", "flops": "target_flops"})
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise UsageError(f"{{arg}} {ratio} must lie in (0, 1): the fraction of channels to remove", arguments={"arg": "ratio"})
    if target_flops is not None and not 0.0 < target_flops < 1.0:
        raise UsageError(f"{{arg}} {target_flops} must lie in (0, 1): the fraction of dense FLOPs to keep",
                         arguments={"arg": "target_flops"})


def select(
    groups: list[ChannelGroup],
    scores: dict[str, torch.Tensor],
    *,
    policy: Policy,
    ratio: float | None = None,
    target_flops: float | None = None,
    flops_model: FlopsModel | None = None,
) -> Removal:
    """Channels to remove per group, for a ratio or a FLOPs target (see module docstring).

    Raises:
        UsageError: neither or both targets, or a target outside (0, 1).
        PlanError: the FLOPs target cannot be reached under the caps.
    """
    check_target(ratio, target_flops)
    if not groups:
        raise PlanError("the model has no prunable convolution groups (all are ignored or protected)")
    folded, folded_scores = fold(groups, scores)
    if ratio is not None:
        if policy.scope == "local":
            return unfold(groups, select_local_ratio(folded, folded_scores, ratio, policy))
        order = global_order(folded, folded_scores, policy)
        total = sum(g.channels for g in folded)
        count = min(math.floor(ratio * total + 1e-9), len(order))
        return unfold(groups, select_global_count(folded, order, count, policy))
    if flops_model is None:
        raise ValueError("select(target_flops=...) needs a flops_model")
    goal = target_flops * flops_model.total
    if policy.scope == "local":
        candidates = lambda r: unfold(groups, select_local_ratio(folded, folded_scores, r, policy))  # noqa: E731
        lo, hi = 0.0, 1.0
        search = _bisect_real
    else:
        order = global_order(folded, folded_scores, policy)
        candidates = lambda k: unfold(groups, select_global_count(folded, order, int(k), policy))  # noqa: E731
        lo, hi = 0, len(order)
        search = _bisect_int
    fewest = flops_model(candidates(hi))
    if fewest > goal * 1.01:
        reachable = fewest / flops_model.total
        raise PlanError(
            f"{{flops}} {target_flops} is unreachable: at most {1 - reachable:.1%} of FLOPs can be removed "
            f"under {{limit}} {policy.max_layer_ratio} (lowest reachable: {reachable:.3f}); "
            "ask for a larger fraction or raise {limit}", arguments={"flops": "target_flops", "limit": "max_layer_ratio"}
        )
    return candidates(search(lambda v: flops_model(candidates(v)), goal, lo, hi))


def _bisect_real(flops: Callable[[float], float], goal: float, lo: float, hi: float) -> float:
    """The ratio whose predicted FLOPs are closest to ``goal`` (FLOPs fall as the ratio grows)."""
    for _ in range(40):
        mid = (lo + hi) / 2
        if flops(mid) > goal:
            lo = mid
        else:
            hi = mid
    return lo if abs(flops(lo) - goal) < abs(flops(hi) - goal) else hi


def _bisect_int(flops: Callable[[int], float], goal: float, lo: int, hi: int) -> int:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if flops(mid) > goal:
            lo = mid
        else:
            hi = mid
    return lo if abs(flops(lo) - goal) < abs(flops(hi) - goal) else hi
