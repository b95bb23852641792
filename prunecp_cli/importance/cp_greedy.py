"""The interaction-aware greedy schedule of cp-bruteforce, as scores that rank in removal order.

One-at-a-time effects miss redundancy: two channels that can each go alone cannot both go
(algorithms.md §1 step 3, [M]). The greedy schedule therefore removes a chunk at a time:

1. measure the cost c_f = E(channels removed so far and f off) − E(channels removed so far) of every
   remaining channel f (one masked pass per round, the removed channels already silenced);
2. silence the ``chunk`` channels of lowest cost: with ``scope="local"`` the lowest of each group
   (every group in the same round, so each sees the others' removals), with ``scope="global"`` the
   lowest over all groups (their costs are changes of the same network's efficiency, one scale).
   Given ``saved`` (the FLOPs one more channel of each group would save, at the current removals),
   the global pick ranks by cost per FLOP saved instead: a positive cost is divided by the group's
   saving relative to the mean saving, a negative one (removing it helps) multiplied by it, so among
   equally cheap channels the ones that save more FLOPs go first;
3. repeat until ``remove`` of the channels are gone (local: of each group; global: of all), never
   a group's last channel.

Scores: a channel removed in round r (0-based) scores ``r + w`` with w ∈ [0, 1) its position in the
round's chunk, cheapest first; the survivors score ``R + w`` (R rounds) with w their position by the
last round's costs. Sorting ascending thus gives the greedy removal order, so selection (local, or
global with ``comparable`` scores: :func:`prunecp_cli.importance.comparable_across_groups`) removes
exactly the greedy prefix. ``chunk`` grows to ⌈target / max_rounds⌉ when that is larger, bounding
the cost at ``max_rounds`` masked passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from prunecp_cli.importance.base import ascending_positions

Costs = dict[str, torch.Tensor]  # per group: [C] float64, the cost of each alive channel (others ignored)


@dataclass(frozen=True)
class Greedy:
    """Settings of the greedy schedule (see module docstring)."""

    scope: str = "local"
    remove: float = 0.5
    chunk: int = 2
    max_rounds: int = 16


Saved = Callable[[dict[str, torch.Tensor]], dict[str, float]]
"""``alive masks -> FLOPs that removing one more channel of each group would save``."""


def greedy_scores(channels: dict[str, int], measure: Callable[[dict[str, torch.Tensor], set[str]], Costs],
                  settings: Greedy, saved: Saved | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[float]]]]:
    """Scores whose ascending order is the greedy removal order, and per-group extras.

    Args:
        channels: channels per group.
        measure: costs of every alive channel of the given groups, given the alive masks
            (``{group: [C] bool}``) and the groups to measure (local scope skips finished groups).
        settings: scope, share to remove, chunk and round cap.
        saved: with global scope, rank by cost per FLOP saved (see module docstring); None: by cost.

    Returns:
        ``(scores, extras)``; extras hold each channel's ``round`` (−1: kept) and its ``cost`` in
        the round it was removed (the last round's cost for the survivors).
    """
    alive = {g: torch.ones(c, dtype=torch.bool) for g, c in channels.items()}
    rounds = {g: torch.full((c,), -1, dtype=torch.long) for g, c in channels.items()}
    within = {g: torch.zeros(c, dtype=torch.float64) for g, c in channels.items()}
    cost = {g: torch.zeros(c, dtype=torch.float64) for g, c in channels.items()}
    cap = {g: c - 1 for g, c in channels.items()}
    if settings.scope == "global":
        target = min(math.floor(settings.remove * sum(channels.values()) + 1e-9), sum(cap.values()))
        chunk = max(settings.chunk, math.ceil(target / settings.max_rounds))
    else:
        target_of = {g: min(math.floor(settings.remove * c + 1e-9), cap[g]) for g, c in channels.items()}
        chunk_of = {g: max(settings.chunk, math.ceil(t / settings.max_rounds)) for g, t in target_of.items()}
    done, r, last = 0, 0, None
    while True:
        if settings.scope == "global":
            pending = done < target
        else:
            pending = any(int((~alive[g]).sum()) < target_of[g] for g in channels)
        if not pending and last is not None:
            break
        if settings.scope == "global" or last is None:
            active = set(channels)
        else:  # a group that reached its target keeps the costs of its last round
            active = {g for g in channels if int((~alive[g]).sum()) < target_of[g]}
        last = measure({g: a.clone() for g, a in alive.items()}, active)
        for g in active:
            cost[g][alive[g]] = last[g][alive[g]].double()
        if not pending:
            break
        if settings.scope == "global":
            picks = _global_pick(alive, _per_flop(cost, alive, saved), cap, min(chunk, target - done))
        else:
            picks = [[(g, f) for f in _local_pick(alive[g], cost[g], min(chunk_of[g], target_of[g] - int((~alive[g]).sum())))]
                     for g in channels]
        for pick in picks:
            for position, (g, f) in enumerate(pick):
                alive[g][f] = False
                rounds[g][f] = r
                within[g][f] = position / len(pick)
                done += 1
        r += 1
    _rank_survivors(alive, _per_flop(cost, alive, saved) if settings.scope == "global" else cost, within,
                    settings.scope)
    scores = {g: torch.where(alive[g], float(r), rounds[g].double()) + within[g] for g in channels}
    extras = {g: {"round": rounds[g].double().tolist(), "cost": cost[g].tolist()} for g in channels}
    return scores, extras


def _per_flop(cost: Costs, alive: Costs, saved: Saved | None) -> Costs:
    """Costs per FLOP saved, on the scale of the mean saving (``cost`` itself when ``saved`` is None)."""
    if saved is None:
        return cost
    per_group = saved({g: a.clone() for g, a in alive.items()})
    live = [per_group[g] for g in alive if bool(alive[g].any())]
    mean = sum(live) / len(live) if live else 1.0
    out = {}
    for g, c in cost.items():
        relative = max(per_group.get(g, 0.0), 1e-9 * max(mean, 1.0)) / max(mean, 1e-12)
        out[g] = torch.where(c >= 0, c / relative, c * relative)
    return out


def _local_pick(alive: torch.Tensor, costs: torch.Tensor, count: int) -> list[int]:
    """The ``count`` alive channels of lowest cost, cheapest first (ties by index)."""
    if count <= 0:
        return []
    index = alive.nonzero().squeeze(1)
    order = torch.sort(costs[index].double(), stable=True).indices
    return index[order[:count]].tolist()


def _global_pick(alive: Costs, costs: Costs, cap: dict[str, int], count: int) -> list[list[tuple[str, int]]]:
    """The ``count`` cheapest alive channels over all groups (a group keeps at least one channel)."""
    candidates = sorted((float(costs[g][f]), position, f, g) for position, g in enumerate(alive)
                        for f in alive[g].nonzero().squeeze(1).tolist())
    removed = {g: int((~a).sum()) for g, a in alive.items()}
    pick = []
    for _, _, f, g in candidates:
        if len(pick) == count:
            break
        if removed[g] < cap[g]:
            removed[g] += 1
            pick.append((g, f))
    return [pick]


def _rank_survivors(alive: Costs, cost: Costs, within: Costs, scope: str) -> None:
    """Fill ``within`` of the kept channels with their position by the last costs (per group, or over all)."""
    if scope == "global":
        names = [g for g in alive if bool(alive[g].any())]
        if not names:
            return
        flat = ascending_positions(torch.cat([cost[g][alive[g]] for g in names]))
        start = 0
        for g in names:
            count = int(alive[g].sum())
            within[g][alive[g]] = flat[start : start + count]
            start += count
        return
    for g in alive:
        if bool(alive[g].any()):
            within[g][alive[g]] = ascending_positions(cost[g][alive[g]])
