"""``--allocation measured``: how many channels each group loses, chosen by what removing them does.

With local scope, or global scope on within-group ranks (``--allocation rank``, the default), every
group loses about the same share of its channels: the importance scores of different layers are on
different scales, so they decide *which* channels of a group go, not *how many*. ``measured``
decides how many by measuring, on the score data, what the network's output loses:

1. Start from the model with nothing removed. Each group's channels are ordered by the importance
   scores (least important first), so a group's candidate is always its next ``step`` share of
   channels in that order (rounded to ``--round-to``, within ``--max-layer-ratio`` and ``--protect``).
2. Every round, each group's candidate is silenced on top of everything removed so far (channels
   zeroed after their normalisation, as removal does in eval mode; on
   :class:`~prunecp_cli.surgery.masked.MaskedEvaluator`, which re-runs only the layers after the
   group), and its *damage* is measured: the mean KL divergence of the masked model's softmax from
   the unpruned model's, on ``examples`` score examples (labels are not needed).
3. The candidate with the smallest increase of damage per FLOP it saves (predicted by
   :class:`~prunecp_cli.surgery.select.FlopsModel`) is removed, and the next round starts, until the
   FLOPs target is passed by :data:`MARGIN` of the dense FLOPs (so that the FLOPs search has room).

The result is handed to the global selection as scores on one scale: a channel's key is the order in
which it was removed; channels never removed follow, by their within-group rank. Cost: one round per
removed chunk, each about (number of groups) passes of the network's tail over ``examples`` images.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import torch
from torch import nn

from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import Dataset
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ChannelGroup
from prunecp_cli.surgery.select import FlopsModel, Policy, Removal, fold, order_channels, policy_of, unfold

ALLOCATIONS = ("rank", "measured")
#: Score examples the damage is measured on (a seeded random subset of the score data).
DEFAULT_EXAMPLES = 256
#: Share of a group's channels removed per round.
STEP = 0.05
#: The greedy rounds stop this fraction of the dense FLOPs below the target.
MARGIN = 0.02


@dataclasses.dataclass(frozen=True)
class Allocation:
    """How groups share a FLOPs target.

    Attributes:
        how: ``rank`` (every group about the same share) or ``measured`` (module docstring).
        examples: score examples the damage is measured on.
        step: share of a group's channels removed per greedy round.
        lazy: re-measure only the candidates that may be cheapest (module docstring); False measures
            every group's candidate every round.
    """

    how: str = "rank"
    examples: int = DEFAULT_EXAMPLES
    step: float = STEP
    lazy: bool = True

    def __post_init__(self) -> None:
        if self.how not in ALLOCATIONS:
            raise UsageError(f"{{arg}} {self.how!r}: use {' or '.join(ALLOCATIONS)}", arguments={"arg": "allocation"})
        if self.examples < 1 or not 0.0 < self.step < 1.0:
            raise UsageError(f"allocation examples {self.examples} must be at least 1 and step {self.step} in (0, 1)")

    def check(self, *, scope: str, target_flops: float | None, has_data: bool) -> None:
        """Refuse, before any work, a ``measured`` allocation that cannot run."""
        if self.how == "rank":
            return
        if target_flops is None:
            raise UsageError("{allocation} measured shares a FLOPs target: use {flops} instead of {ratio}",
                             arguments={"allocation": "allocation", "flops": "target_flops", "ratio": "ratio"})
        if scope != "global":
            raise UsageError("{allocation} measured chooses each group's share, which local scope fixes: use "
                             "{scope} global", arguments={"allocation": "allocation", "scope": "scope"})
        if not has_data:
            raise UsageError("{allocation} measured measures on the score data: pass {data}",
                             arguments={"allocation": "allocation", "data": "data"})


def allocate(groups: list[ChannelGroup], scores: dict[str, torch.Tensor], *, policy: Policy,
             allocation: Allocation, target_flops: float | None, flops_model: FlopsModel | None,
             model: torch.nn.Module | None = None, data: Dataset | None = None, batch_size: int = 128,
             reporter: Reporter = SILENT) -> tuple[dict[str, torch.Tensor], Policy]:
    """The scores and policy to select with: unchanged for ``rank``, the greedy keys (unnormalised) for ``measured``.

    Raises:
        UsageError: ``measured`` without a FLOPs target, global scope or score data.
    """
    allocation.check(scope=policy.scope, target_flops=target_flops, has_data=data is not None)
    if allocation.how == "rank":
        return scores, policy
    assert flops_model is not None
    keys = measured_keys(model, groups, scores, data, policy=policy, flops_model=flops_model,
                         goal=target_flops - MARGIN, allocation=allocation, batch_size=batch_size, reporter=reporter)
    return keys, dataclasses.replace(policy, normalise="none")


@torch.no_grad()
def measured_keys(model: torch.nn.Module, groups: list[ChannelGroup], scores: dict[str, torch.Tensor],
                  data: Dataset, *, policy: Policy, flops_model: FlopsModel, goal: float, allocation: Allocation,
                  batch_size: int = 128,
                  reporter: Reporter = SILENT) -> dict[str, torch.Tensor]:
    """Per group, one key per channel: the greedy removal order (module docstring), on one scale for all groups."""
    folded, folded_scores = fold(groups, scores)
    by_name = {g.name: g for g in groups}
    order = {g.name: order_channels(folded_scores[g.name]) for g in folded}
    cap = {g.name: policy_of(policy, g).max_removable(g.channels) if by_name[g.name].channel_groups else 0
           for g in folded}
    removed = {g.name: 0 for g in folded}
    keys = {g.name: torch.zeros(g.channels, dtype=torch.float64) for g in folded}
    was_on = next(iter(model.parameters())).device
    rows = np.sort(np.random.default_rng(0).permutation(len(data))[: allocation.examples])
    batches = [b.x.to(was_on) for b in data.subset(rows).batches(batch_size, device=was_on)]

    def next_count(g: ChannelGroup) -> int:  # at least one --round-to block, so rounding cannot stall a group
        rules = policy_of(policy, g)
        chunk = max(rules.round_to, math.ceil(allocation.step * g.channels - 1e-9))
        return rules.rounded(g.channels, min(cap[g.name], removed[g.name] + chunk))

    def removal(counts: dict[str, int]) -> Removal:
        return unfold(groups, {name: order[name][:n].tolist() for name, n in counts.items()})

    def mask(name: str, count: int) -> torch.Tensor:
        full = torch.ones(by_name[name].channels)
        full[unfold([by_name[name]], {name: order[name][:count].tolist()})[name]] = 0.0
        return full

    counter = 0
    cost: dict[str, float] = {}  # group -> damage per FLOP of its candidate, as last measured
    damage_of = _Damage(model, groups, batches)
    flops_now = flops_model(removal(removed))
    now = damage_of({})  # the damage of what is removed so far; then the accepted candidate's
    with reporter.status("allocation: measuring each group's next channels"):
        while flops_now > goal * flops_model.total:
            candidates = {g.name: n for g in folded if (n := next_count(g)) > removed[g.name]}
            if not candidates:
                break
            base = {name: mask(name, n) for name, n in removed.items() if n}
            fresh: dict[str, tuple[float, float]] = {}  # group -> (FLOPs, damage) after its candidate, this round

            def measure(name: str, base=base, now=now, fresh=fresh, candidates=candidates, flops_now=flops_now) -> None:
                after = flops_model(removal({**removed, name: candidates[name]}))
                fresh[name] = after, damage_of({**base, name: mask(name, candidates[name])})
                cost[name] = (fresh[name][1] - now) / max(flops_now - after, 1e-9)

            for name in () if allocation.lazy else candidates:
                measure(name)
            # lazy greedy: re-measure the cheapest-looking candidate until the cheapest one is current
            while (best := min(candidates, key=lambda name: cost.get(name, -math.inf))) not in fresh:
                measure(best)
            best_flops, now = fresh[best]
            for position in range(removed[best], candidates[best]):
                keys[best][order[best][position]] = counter
                counter += 1
            removed[best], flops_now = candidates[best], best_flops
    for g in folded:  # never removed: after every removed channel, by within-group rank
        rest = order[g.name][removed[g.name]:]
        keys[g.name][rest] = counter + (torch.arange(removed[g.name], g.channels, dtype=torch.float64) + 0.5) / g.channels
    return {g.name: keys[g.name] if g.channel_groups == 1 else
            keys[g.name].repeat(g.channel_groups) if g.channel_groups > 1 else torch.zeros(g.channels, dtype=torch.float64)
            for g in groups}


class _Damage:
    """Mean KL divergence of the gated model's softmax from the unpruned model's, BatchNorm re-estimated.

    The gated copy runs its normalisation layers on batch statistics (train mode, on a copy), so each
    masked network is judged as it will be after prune's BatchNorm recalibration, not with the dense
    statistics (which overstate what a deep cut costs).
    """

    def __init__(self, model: torch.nn.Module, groups: list[ChannelGroup], batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.copy = copy.deepcopy(model).eval()
        self.reference = [torch.log_softmax(self.copy(x).float(), dim=-1) for x in batches]
        for module in self.copy.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
        self.gates = ChannelGates(self.copy, groups)
        self.count = sum(len(x) for x in batches)

    def __call__(self, masks: dict[str, torch.Tensor]) -> float:
        with self.gates:
            for name, value in masks.items():
                self.gates.set(name, value.to(self.batches[0].device))
            total = sum(_kl(ref, self.copy(x)) for x, ref in zip(self.batches, self.reference, strict=True))
        return total / self.count


def _kl(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Summed KL(reference softmax ‖ softmax of ``logits``) over the batch."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return float((reference.exp() * (reference - logp)).sum())
