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

**Lazy rounds** (``refresh`` > 1): a channel's cost changes little from one round to the next, and
only the cheapest can be picked, so every channel is re-measured only every ``refresh`` rounds (and
in a group's last round, whose costs order the survivors); the rounds between measure only the ``candidates`` × chunk
channels of lowest last cost (per group, or over all groups) and pick among those fresh costs. With
costs that do not change between rounds this picks exactly what the full schedule picks (tested);
a lazy round measures a fraction of the channels: on the benchmark's MobileNet (200 score images)
cp-bruteforce with ``refresh=8`` scored in 87 s where every channel every round took 199 s.

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
    refresh: int = 1  #: every channel re-measured every this many rounds (and in a group's last); 1: every round
    candidates: int = 3  #: between refreshes, chunks of cheapest channels (by their last costs) re-measured


Saved = Callable[[dict[str, torch.Tensor]], dict[str, float]]
"""``alive masks -> FLOPs that removing one more channel of each group would save``."""


def greedy_scores(channels: dict[str, int], measure: Callable[[dict[str, torch.Tensor], set[str]], Costs],
                  settings: Greedy, saved: Saved | None = None,
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[float]]]]:
    """Scores whose ascending order is the greedy removal order, and per-group extras.

    Args:
        channels: channels per group.
        measure: costs of every alive channel of the given groups, given the alive masks
            (``{group: [C] bool}``) and the groups to measure (local scope skips finished groups);
            in a lazy round (``settings.refresh`` > 1) a third argument, ``{group: [C] bool}`` of
            the active groups, names the only channels whose costs are used.
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
        only = _lazy_round(alive, cost, active, settings, r, saved, chunk if settings.scope == "global" else chunk_of,
                           target - done if settings.scope == "global" else target_of) if pending else None
        arguments = ({g: a.clone() for g, a in alive.items()}, active) + (() if only is None else (only,))
        last = measure(*arguments)
        pool = alive if only is None else {g: only.get(g, torch.zeros_like(a)) for g, a in alive.items()}
        for g in active:
            cost[g][pool[g]] = last[g][pool[g]].double()
        if not pending:
            break
        if settings.scope == "global":
            picks = _global_pick(pool, _per_flop(cost, alive, saved), cap, min(chunk, target - done), alive)
        else:
            picks = [[(g, f) for f in _local_pick(pool[g], cost[g], min(chunk_of[g], target_of[g] - int((~alive[g]).sum())))]
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


def _lazy_round(alive: Costs, cost: Costs, active: set[str], settings: Greedy, r: int, saved: Saved | None,
                chunk: int | dict[str, int], left: int | dict[str, int]) -> Costs | None:
    """The channels round ``r`` measures (``{group: [C] bool}`` of the active groups), None for all of them.

    Every channel in a refresh round and in a group's last round (whose costs order its survivors);
    otherwise the ``candidates`` × chunk alive channels of lowest last cost, per group (local) or over
    all groups (global, by cost per FLOP when ``saved`` is given). ``left``: channels still to remove.
    """
    if settings.refresh <= 1 or r % settings.refresh == 0:
        return None
    names = [g for g in alive if g in active]
    only = {g: torch.zeros_like(alive[g]) for g in names}
    if settings.scope == "global":
        if left <= chunk:
            return None
        view = _per_flop(cost, alive, saved)
        flat = sorted((float(view[g][f]), i, f, g) for i, g in enumerate(names) for f in alive[g].nonzero().squeeze(1).tolist())
        for _, _, f, g in flat[: settings.candidates * chunk]:
            only[g][f] = True
        return only
    for g in names:
        removed = int((~alive[g]).sum())
        if left[g] - removed <= chunk[g]:
            only[g] = alive[g].clone()
        else:
            only[g][_local_pick(alive[g], cost[g], settings.candidates * chunk[g])] = True
    return None if all(bool(torch.equal(only[g], alive[g])) for g in names) else only


def _global_pick(pool: Costs, costs: Costs, cap: dict[str, int], count: int, alive: Costs) -> list[list[tuple[str, int]]]:
    """The ``count`` cheapest channels of ``pool`` over all groups (a group keeps at least one channel)."""
    candidates = sorted((float(costs[g][f]), position, f, g) for position, g in enumerate(pool)
                        for f in pool[g].nonzero().squeeze(1).tolist())
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
