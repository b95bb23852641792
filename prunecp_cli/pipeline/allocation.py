"""``--allocation measured``: how many channels each group loses, chosen by what removing them does.

With local scope, or global scope on within-group ranks (``--allocation rank``, the default), every
group loses about the same share of its channels: the importance scores of different layers are on
different scales, so they decide *which* channels of a group go, not *how many*. ``measured``
decides how many by measuring, on the score data, what the network's output loses:

1. Start from the model with nothing removed. Each group's channels are ordered by the importance
   scores (least important first), so a group's candidate is always its next ``step`` share of
   channels in that order (rounded to ``--round-to``, within ``--max-layer-ratio`` and ``--protect``).
2. Every round, each group's candidate is silenced on top of everything removed so far (channels
   zeroed after their normalisation by :class:`~prunecp_cli.surgery.gates.ChannelGates` on a copy of
   the model whose BatchNorm layers normalise with batch statistics, as after prune's recalibration;
   see :class:`_Damage`), and its *damage* is measured: the mean KL divergence of the masked model's
   softmax from the unpruned model's, on ``examples`` score examples (labels are not needed). Every
   measurement is a whole forward pass of the copy.
3. The candidate with the smallest increase of damage per FLOP it saves (predicted by
   :class:`~prunecp_cli.surgery.select.FlopsModel`) is removed, and the next round starts, until the
   FLOPs target is passed by :data:`MARGIN` of the dense FLOPs (so that the FLOPs search has room).

The result is handed to the global selection as scores on one scale: a channel's key is the order in
which it was removed; channels never removed follow, by their within-group rank. Cost: one round per
removed chunk; a round re-measures, lazily, only the candidate that looks cheapest by its last
measurement until the cheapest one is current (``lazy``; without it, every group's candidate, one
whole forward pass over ``examples`` images each).
The path does not depend on the target, only where it stops: within one process a path is kept and
resumed or cut for another target (:func:`measured_keys`), so a budget sweep walks it once.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import math

import numpy as np
import torch
from torch import nn

from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import Dataset
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.gates import ChannelGates
from prunecp_cli.surgery.groups import ChannelGroup
from prunecp_cli.surgery.layout import adopt_channels_last, to_channels_last
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
    """Per group, one key per channel: the greedy removal order (module docstring), on one scale for all groups.

    The greedy path does not depend on the goal, only where it stops, so one process that allocates
    the same model, scores, data and settings for several goals (a budget sweep, ``auto``'s
    candidates re-run at another budget) walks the path once: the last :data:`CACHED_PATHS` paths are
    kept, a smaller goal resumes one, a larger goal reads its prefix. The keys equal a fresh run's.
    """
    was_on = next(iter(model.parameters())).device
    rows = np.sort(np.random.default_rng(0).permutation(len(data))[: allocation.examples])
    batches = [b.x.to(was_on) for b in data.subset(rows).batches(batch_size, device=was_on)]
    key = _fingerprint(model, groups, scores, batches, (policy, allocation, flops_model.total))
    path = _PATHS.pop(key, None) or _Path(groups, scores, policy, flops_model, allocation.step, allocation.lazy)
    _PATHS[key] = path
    while len(_PATHS) > CACHED_PATHS:
        _PATHS.popitem(last=False)
    if path.flops > goal * flops_model.total and not path.exhausted:
        with reporter.status("allocation: measuring each group's next channels"):
            path.advance(goal * flops_model.total, _Damage(model, groups, batches))
    return path.keys(goal * flops_model.total)


#: Greedy paths kept per process (``auto`` allocates three candidates per budget).
CACHED_PATHS = 6
_PATHS: collections.OrderedDict[str, _Path] = collections.OrderedDict()


def _fingerprint(model: torch.nn.Module, groups: list[ChannelGroup], scores: dict[str, torch.Tensor],
                 batches: list[torch.Tensor], settings: tuple) -> str:
    """A digest of what the greedy path depends on: the model's structure and tensors, groups, scores, data, settings."""
    digest = hashlib.sha256(repr((type(model).__qualname__, str(model), settings,
                                  [(g.name, g.channels, g.channel_groups) for g in groups])).encode())
    tensors = [*model.state_dict().values(), *(scores[g.name] for g in groups), *batches]
    for tensor in tensors:
        digest.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Path:
    """The greedy removal path of one allocation (module docstring), resumable and readable at any goal.

    ``steps`` holds, per accepted candidate, ``(group, removed before, removed after, FLOPs after)``.
    """

    def __init__(self, groups: list[ChannelGroup], scores: dict[str, torch.Tensor], policy: Policy,
                 flops_model: FlopsModel, step: float, lazy: bool) -> None:
        self.groups, self.policy, self.flops_model, self.step, self.lazy = groups, policy, flops_model, step, lazy
        self.folded, folded_scores = fold(groups, scores)
        self.by_name = {g.name: g for g in groups}
        self.order = {g.name: order_channels(folded_scores[g.name]) for g in self.folded}
        self.cap = {g.name: policy_of(policy, g).max_removable(g.channels) if self.by_name[g.name].channel_groups
                    else 0 for g in self.folded}
        self.removed = {g.name: 0 for g in self.folded}
        self.cost: dict[str, float] = {}  # group -> damage per FLOP of its candidate, as last measured
        self.start = self.flops = flops_model(self._removal(self.removed))
        self.now: float | None = None  # the damage of what is removed so far
        self.steps: list[tuple[str, int, int, float]] = []
        self.exhausted = False

    def _next_count(self, g: ChannelGroup) -> int:  # at least one --round-to block, so rounding cannot stall a group
        rules = policy_of(self.policy, g)
        chunk = max(rules.round_to, math.ceil(self.step * g.channels - 1e-9))
        return rules.rounded(g.channels, min(self.cap[g.name], self.removed[g.name] + chunk))

    def _removal(self, counts: dict[str, int]) -> Removal:
        return unfold(self.groups, {name: self.order[name][:n].tolist() for name, n in counts.items()})

    def _mask(self, name: str, count: int) -> torch.Tensor:
        full = torch.ones(self.by_name[name].channels)
        full[unfold([self.by_name[name]], {name: self.order[name][:count].tolist()})[name]] = 0.0
        return full

    def advance(self, goal: float, damage_of: _Damage) -> None:
        """Accept candidates until the FLOPs are at most ``goal`` (absolute) or no group can lose more."""
        if self.now is None:
            self.now = damage_of({})
        removed, cost = self.removed, self.cost
        while self.flops > goal:
            candidates = {g.name: n for g in self.folded if (n := self._next_count(g)) > removed[g.name]}
            if not candidates:
                self.exhausted = True
                return
            base = {name: self._mask(name, n) for name, n in removed.items() if n}
            fresh: dict[str, tuple[float, float]] = {}  # group -> (FLOPs, damage) after its candidate, this round

            def measure(name: str, base=base, fresh=fresh, candidates=candidates) -> None:
                after = self.flops_model(self._removal({**removed, name: candidates[name]}))
                fresh[name] = after, damage_of({**base, name: self._mask(name, candidates[name])})
                cost[name] = (fresh[name][1] - self.now) / max(self.flops - after, 1e-9)

            for name in () if self.lazy else candidates:
                measure(name)
            # lazy greedy: re-measure the cheapest-looking candidate until the cheapest one is current
            while (best := min(candidates, key=lambda name: cost.get(name, -math.inf))) not in fresh:
                measure(best)
            self.flops, self.now = fresh[best]
            self.steps.append((best, removed[best], candidates[best], self.flops))
            removed[best] = candidates[best]

    def keys(self, goal: float) -> dict[str, torch.Tensor]:
        """The keys of a run stopped at ``goal`` (absolute FLOPs): the steps up to the first at or below it."""
        keys = {g.name: torch.zeros(g.channels, dtype=torch.float64) for g in self.folded}
        removed = {g.name: 0 for g in self.folded}
        counter, flops = 0, self.start
        for name, before, after, flops_after in self.steps:
            if flops <= goal:
                break
            for position in range(before, after):
                keys[name][self.order[name][position]] = counter
                counter += 1
            removed[name], flops = after, flops_after
        for g in self.folded:  # never removed: after every removed channel, by within-group rank
            rest = self.order[g.name][removed[g.name]:]
            keys[g.name][rest] = counter + (torch.arange(removed[g.name], g.channels, dtype=torch.float64) + 0.5) / g.channels
        return {g.name: keys[g.name] if g.channel_groups == 1 else
                keys[g.name].repeat(g.channel_groups) if g.channel_groups > 1 else
                torch.zeros(g.channels, dtype=torch.float64) for g in self.groups}


class _Damage:
    """Mean KL divergence of the gated model's softmax from the unpruned model's, BatchNorm re-estimated.

    The gated copy runs its normalisation layers on batch statistics (train mode, on a copy), so each
    masked network is judged as it will be after prune's BatchNorm recalibration, not with the dense
    statistics (which overstate what a deep cut costs).

    On a CPU the copy and the images are held channels-last (:mod:`~prunecp_cli.surgery.layout`): the
    same values to float rounding, every forward pass 1.3-1.7 times faster on the benchmark's CNNs.
    """

    def __init__(self, model: torch.nn.Module, groups: list[ChannelGroup], batches: list[torch.Tensor]) -> None:
        self.copy = copy.deepcopy(model).eval()
        with torch.no_grad():
            logits = [self.copy(x) for x in batches]
        if batches and adopt_channels_last(self.copy, batches[0], logits[0]):  # a private copy: never restored
            batches = [to_channels_last(x) for x in batches]
        self.batches = batches
        self.reference = [torch.log_softmax(z.float(), dim=-1) for z in logits]
        for module in self.copy.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
        self.gates = ChannelGates(self.copy, groups)
        self.count = sum(len(x) for x in batches)

    @torch.no_grad()
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
