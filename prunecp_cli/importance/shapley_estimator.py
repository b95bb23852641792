"""Model-independent Shapley-value estimators for channel pruning.

The players are the ``C`` channels of one layer. The caller supplies a *value function*

    ``value_fn(masks: BoolTensor[M, C]) -> Tensor[M, N]``

that returns, for each of ``M`` coalitions (``True`` = channel active), the value of the game on each
of ``N`` examples, e.g. minus the per-example loss of the network with the inactive channels zeroed
(Ancona et al. 2020 use ``v(S) = -L(x, y; only S active)``). This module never sees the model; it
only decides which coalitions to evaluate, asks for them in large batches and combines the answers.

Sign convention (all functions here): ``phi[i]`` estimates the Shapley value of player ``i`` in the
game ``v``, where ``v(S)`` is the value with exactly the channels in ``S`` active,

    ``phi_i = sum_{S not containing i} |S|! (C-|S|-1)! / C! * (v(S + {i}) - v(S))``.

A channel whose removal *lowers* the value (raises the loss, when ``v = -loss``) therefore gets a
*positive* value, and ``sum_i phi_i = v(all) - v(none)`` (efficiency).

References:
    Castro, Gómez & Tejada (2009), "Polynomial calculation of the Shapley value based on sampling",
    Computers & Operations Research 36(5).
    Ancona, Öztireli & Gross (2020), "Shapley Value as Principled Metric for Structured Network
    Pruning", arXiv:2006.01795.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ValueFn = Callable[[torch.Tensor], torch.Tensor]
"""``value_fn(masks: BoolTensor[M, C]) -> Tensor[M, N]``: per-example value of each coalition."""

_EXACT_MAX_PLAYERS = 16


@dataclass(frozen=True)
class ShapleyEstimate:
    """Shapley values of the channels of one layer.

    Attributes:
        per_example: ``float64[N, C]``; the estimate for each example, averaged over permutations.
        mean: ``float64[C]``; ``per_example.mean(0)``.
        std_error: ``float64[C]``; standard error of ``mean`` across permutations (see
            :func:`permutation_shapley`); zeros for :func:`exact_shapley`; NaN when there is only one
            independent sampling unit.
        evaluations: Number of coalitions passed to ``value_fn`` (rows of all mask batches).
        permutations: Number of permutations used; 0 for :func:`exact_shapley`.
        reached: ``float64[C]``; how many permutations credited each player (``depth < 1``), None when
            every permutation credits every player.
    """

    per_example: torch.Tensor
    mean: torch.Tensor
    std_error: torch.Tensor
    evaluations: int
    permutations: int
    reached: torch.Tensor | None = None


class _BatchedGame:
    """Wraps ``value_fn``: splits mask batches into calls of at most ``max_masks`` rows, checks shapes,
    converts answers to CPU float64 and counts evaluations."""

    def __init__(self, value_fn: ValueFn, num_players: int, max_masks: int) -> None:
        if max_masks < 1:
            raise ValueError(f"max_masks_per_call={max_masks} must be at least 1")
        self.value_fn = value_fn
        self.num_players = num_players
        self.max_masks = max_masks
        self.evaluations = 0
        self.num_examples: int | None = None

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, masks.shape[0], self.max_masks):
            chunk = masks[start : start + self.max_masks]
            values = torch.as_tensor(self.value_fn(chunk))
            if values.ndim == 1:
                values = values.unsqueeze(1)
            if values.ndim != 2 or values.shape[0] != chunk.shape[0]:
                raise ValueError(
                    f"value_fn returned shape {tuple(values.shape)} for {chunk.shape[0]} masks; "
                    f"it must return [num_masks, num_examples]"
                )
            if self.num_examples is None:
                self.num_examples = values.shape[1]
            elif values.shape[1] != self.num_examples:
                raise ValueError(
                    f"value_fn returned {values.shape[1]} examples after returning {self.num_examples}; "
                    f"it must evaluate the same examples on every call"
                )
            self.evaluations += chunk.shape[0]
            parts.append(values.detach().to(device="cpu", dtype=torch.float64))
        return torch.cat(parts, 0)


def _check_players(num_players: int) -> None:
    if num_players < 1:
        raise ValueError(f"num_players={num_players}: a layer needs at least one channel")


def draw_std_error(draws: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean of independent draws ``[D, C]`` per player; NaN marks a draw that did not reach it.

    The sample standard deviation (ddof 1) over a player's draws divided by the square root of their
    number; NaN where fewer than two draws reached the player.
    """
    reached = ~torch.isnan(draws)
    k = reached.sum(0)
    mean = torch.where(reached, draws, 0.0).sum(0) / k.clamp(min=1)
    var = torch.where(reached, (draws - mean) ** 2, 0.0).sum(0) / (k - 1).clamp(min=1)
    return torch.where(k > 1, (var / k.clamp(min=1)).sqrt(), torch.nan).to(torch.float64)


def permutation_shapley(
    value_fn: ValueFn,
    num_players: int,
    *,
    samples: int = 5,
    antithetic: bool = True,
    generator: torch.Generator,
    truncation_tol: float | None = None,
    max_masks_per_call: int = 256,
    depth: float = 1.0,
) -> ShapleyEstimate:
    """Estimate channel Shapley values by permutation sampling (Castro et al. 2009).

    This is the estimator of Ancona et al. (2020), algorithms.md §3(b)2. For each permutation ``pi``
    we start from the full coalition and switch players off in the order ``pi[0], pi[1], ...``. The
    player ``pi[j]`` removed at step ``j`` is credited ``v(S_j) - v(S_j minus pi[j])``, where
    ``S_j`` is the active set before the step; a player whose removal lowers the value gets a
    positive contribution. Contributions are averaged over permutations, per example. Each
    permutation's contributions sum to ``v(all) - v(none)`` exactly, so efficiency holds for every
    estimate (without truncation).

    Coalitions are evaluated in batches: ``v(all)`` and ``v(none)`` once (one call of 2 masks), then
    the ``C - 1`` intermediate coalitions of every permutation, scheduled round-robin over the
    permutations still running so that each call carries at most ``max_masks_per_call`` masks.
    Without truncation ``evaluations == 2 + P * (C - 1)`` exactly, ``P`` the number of
    permutations (identical coalitions in different permutations are not de-duplicated). The
    estimate does not depend on ``max_masks_per_call``; with truncation the evaluation count does.

    Antithetic sampling: permutations come in pairs ``pi`` and ``reversed(pi)``; an odd ``samples``
    is rounded *up* to the next even number (``ShapleyEstimate.permutations`` says how many were
    used), and the standard error treats each pair's mean as one independent draw.

    Truncation (off by default, as in Ancona et al.'s code): with ``truncation_tol`` set, a
    permutation stops as soon as ``|mean_n v_n(current) - mean_n v_n(none)| < truncation_tol``
    (checked on the full coalition too); the players not yet removed get a 0 contribution in that
    permutation and their coalitions are not scheduled. Coalitions of that permutation already
    evaluated in the same batch are counted in ``evaluations`` but ignored. Bias: exact when the game
    is flat below the truncation point (a network already at chance loss); otherwise the skipped
    marginals, whose example-mean sum is below ``truncation_tol`` in magnitude, are set to 0, so
    ``sum_i mean_i`` may miss ``v(all) - v(none)`` by up to ``truncation_tol`` and individual players
    late in permutations are shrunk towards 0. Truncation saves evaluations only when a permutation is
    spread over several calls, i.e. when ``P * (C - 1)`` exceeds ``max_masks_per_call``.

    Args:
        value_fn: Per-example value of each coalition, ``BoolTensor[M, C] -> Tensor[M, N]``; must
            return the same ``N`` examples on every call. Answers are moved to CPU float64.
        num_players: Number of channels ``C``.
        samples: Number of permutations ``P`` (rounded up to even when ``antithetic``).
        antithetic: Pair every permutation with its reverse.
        generator: Source of randomness (a CPU ``torch.Generator``); a fixed seed gives identical
            results.
        truncation_tol: Optional truncation tolerance on the example-mean value; ``None`` disables it.
        max_masks_per_call: Largest number of masks passed to one ``value_fn`` call.
        depth: fraction of each permutation played (default 1: the Shapley value). Below 1, only the
            first ``D = ceil(depth · C)`` removals from the full coalition are evaluated and credited,
            and a player's value is the mean of its marginals over the permutations that reached it:
            its expected marginal contribution to a coalition of at least ``C − D + 1`` players (a
            semivalue, not the Shapley value; efficiency does not hold). Pruning removes channels from
            the full network, where these marginals live; the Shapley value also averages marginals in
            nearly empty networks, which are large and say little about pruning. With antithetic pairs
            and ``depth >= 0.5`` every player is reached in every pair. A player no permutation
            reached gets 0 (and a NaN standard error).

    Returns:
        The estimate. ``std_error[i]`` is the sample standard deviation (ddof 1) of the per-draw
        example-mean contributions of player ``i`` divided by the square root of the number of draws
        (permutations, or antithetic pairs); NaN with a single draw.

    Raises:
        ValueError: If ``num_players``, ``samples``, ``truncation_tol`` or ``max_masks_per_call`` is
            out of range, or ``value_fn`` returns a badly shaped tensor.
    """
    _check_players(num_players)
    if samples < 1:
        raise ValueError(f"samples={samples}: permutation sampling needs at least one permutation")
    if truncation_tol is not None and not truncation_tol >= 0:
        raise ValueError(f"truncation_tol={truncation_tol} must be non-negative or None")
    if not 0.0 < depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in (0, 1]")
    game = _BatchedGame(value_fn, num_players, max_masks_per_call)
    c = num_players

    if antithetic:
        half = (samples + 1) // 2
        base = torch.stack([torch.randperm(c, generator=generator) for _ in range(half)])
        perms = torch.stack([base, base.flip(1)], 1).reshape(2 * half, c)
    else:
        perms = torch.stack([torch.randperm(c, generator=generator) for _ in range(samples)])
    num_perms = perms.shape[0]
    # rank[p, i] = step at which player i is removed in permutation p; coalition after j removals
    # of permutation p is {i : rank[p, i] >= j}.
    rank = torch.argsort(perms, dim=1)
    played = c if depth >= 1.0 else max(1, math.ceil(depth * c - 1e-9))  # removals evaluated per permutation

    ends = game(torch.stack([torch.ones(c, dtype=torch.bool), torch.zeros(c, dtype=torch.bool)]))
    v_full, v_empty = ends[0], ends[1]
    n = v_full.shape[0]
    empty_level = float(v_empty.mean())

    def saturated(values: torch.Tensor) -> torch.Tensor:
        return (values.mean(-1) - empty_level).abs() < truncation_tol

    sums = torch.zeros(n, c, dtype=torch.float64)  # per-example contributions, summed over perms
    per_perm = torch.zeros(num_perms, c, dtype=torch.float64)  # example-mean contribution per perm
    removed = torch.zeros(num_perms, dtype=torch.long)  # players removed so far (credited)
    carry = v_full.expand(num_perms, n).clone()  # value of the current coalition
    running = torch.ones(num_perms, dtype=torch.bool)
    if truncation_tol is not None and bool(saturated(v_full)):
        running[:] = False

    def credit(p: int, steps: torch.Tensor, delta: torch.Tensor) -> None:
        players = perms[p, steps]
        sums.index_add_(1, players, delta.T)
        per_perm[p, players] += delta.mean(1)

    while True:
        # A permutation with C-1 removals done needs no evaluation: the last step ends in v(none).
        active = torch.nonzero(running & (removed < min(c - 1, played))).flatten()
        if active.numel() == 0:
            break
        active = active[: game.max_masks]
        block = max(1, game.max_masks // active.numel())
        plan = [(int(p), int(removed[p]) + 1, min(int(removed[p]) + block, c - 1, played)) for p in active]
        masks = torch.cat([rank[p] >= torch.arange(lo, hi + 1).unsqueeze(1) for p, lo, hi in plan])
        values = game(masks)
        offset = 0
        for p, lo, hi in plan:
            seg = values[offset : offset + hi - lo + 1]
            offset += hi - lo + 1
            if truncation_tol is not None:
                hit = torch.nonzero(saturated(seg)).flatten()
                if hit.numel():
                    seg = seg[: int(hit[0]) + 1]
                    running[p] = False
            prev = torch.cat([carry[p : p + 1], seg[:-1]])
            credit(p, torch.arange(lo - 1, lo - 1 + seg.shape[0]), prev - seg)
            carry[p] = seg[-1]
            removed[p] = lo - 1 + seg.shape[0]

    last = torch.nonzero(running & (removed == c - 1)).flatten() if played == c else torch.zeros(0, dtype=torch.long)
    for p in last.tolist():
        credit(p, torch.tensor([c - 1]), (carry[p] - v_empty).unsqueeze(0))

    if played == c:
        per_example = sums / num_perms
        draws = per_perm.reshape(num_perms // 2, 2, c).mean(1) if antithetic else per_perm
    else:  # each player's marginals averaged over the permutations that reached it
        reached = (rank < played).double()  # [P, C]
        counts = reached.sum(0)
        per_example = sums / counts.clamp(min=1)
        if antithetic:
            pair = reached.reshape(num_perms // 2, 2, c).sum(1)
            draws = per_perm.reshape(num_perms // 2, 2, c).sum(1) / pair.clamp(min=1)
            draws = torch.where(pair > 0, draws, torch.nan)
        else:
            draws = torch.where(reached > 0, per_perm, torch.nan)
    return ShapleyEstimate(
        per_example=per_example,
        mean=per_example.mean(0),
        std_error=draw_std_error(draws),
        evaluations=game.evaluations,
        permutations=num_perms,
        reached=None if played == c else counts,
    )


def exact_shapley(value_fn: ValueFn, num_players: int, *, max_masks_per_call: int = 4096) -> ShapleyEstimate:
    """Compute exact Shapley values by enumerating all ``2**C`` coalitions.

    Uses the Shapley formula of the module docstring (same sign convention as
    :func:`permutation_shapley`). Coalition ``s`` (an integer) has player ``i`` active iff bit ``i``
    of ``s`` is set; they are evaluated in calls of at most ``max_masks_per_call`` masks. Meant for
    tests and tiny layers.

    Args:
        value_fn: Per-example value of each coalition, ``BoolTensor[M, C] -> Tensor[M, N]``.
        num_players: Number of channels ``C``; at most 16.
        max_masks_per_call: Largest number of masks passed to one ``value_fn`` call.

    Returns:
        The exact values, with ``std_error`` zero, ``evaluations == 2**C`` and ``permutations == 0``.

    Raises:
        ValueError: If ``num_players`` is below 1 or above 16 (65,536 coalitions).
    """
    _check_players(num_players)
    if num_players > _EXACT_MAX_PLAYERS:
        raise ValueError(
            f"exact Shapley values of {num_players} channels need 2**{num_players} evaluations; "
            f"the limit is {_EXACT_MAX_PLAYERS} channels, use permutation_shapley for larger layers"
        )
    c = num_players
    game = _BatchedGame(value_fn, c, max_masks_per_call)
    codes = torch.arange(2**c)
    masks = ((codes.unsqueeze(1) >> torch.arange(c)) & 1).bool()
    values = game(masks)  # [2**C, N]
    sizes = masks.sum(1)
    # weight(|S|) = |S|! (C-|S|-1)! / C!, for coalitions S that do not contain the player.
    weight = torch.tensor(
        [math.factorial(s) * math.factorial(c - s - 1) / math.factorial(c) for s in range(c)],
        dtype=torch.float64,
    )
    per_example = torch.empty(values.shape[1], c, dtype=torch.float64)
    for i in range(c):
        without = torch.nonzero(~masks[:, i]).flatten()
        with_i = without | (1 << i)
        marginal = values[with_i] - values[without]  # [2**(C-1), N]
        per_example[:, i] = weight[sizes[without]] @ marginal
    return ShapleyEstimate(
        per_example=per_example,
        mean=per_example.mean(0),
        std_error=torch.zeros(c, dtype=torch.float64),
        evaluations=game.evaluations,
        permutations=0,
    )


def aggregate(per_example: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Reduce per-example Shapley values to one importance per channel (algorithms.md §3(b)3).

    ``"mean"`` (Ancona et al.'s default) is the mean over examples. ``"mean+2std"`` is
    ``mean + 2 * std`` over examples, with the population standard deviation (ddof 0, as NumPy's
    default that TorchPruner uses); it favours channels that matter a lot for some examples.

    Args:
        per_example: ``[N, C]`` values, e.g. ``ShapleyEstimate.per_example``.
        how: ``"mean"`` or ``"mean+2std"``.

    Returns:
        ``float64[C]``; higher means more important.

    Raises:
        ValueError: If ``how`` is unknown or ``per_example`` is not 2-D.
    """
    if per_example.ndim != 2:
        raise ValueError(f"per_example must be [examples, channels], got shape {tuple(per_example.shape)}")
    values = per_example.to(torch.float64)
    if how == "mean":
        return values.mean(0)
    if how == "mean+2std":
        return values.mean(0) + 2.0 * values.std(0, correction=0)
    raise ValueError(f"unknown aggregation {how!r}; use 'mean' or 'mean+2std'")
