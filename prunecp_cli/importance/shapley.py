"""Shapley-value importance (``shapley``): each channel's average marginal value to its layer.

Ancona, Öztireli & Gross, "Shapley Value as Principled Metric for Structured Network Pruning",
arXiv:2006.01795 (2020); algorithms.md §3. Per prunable group, the players are its ``C`` channels
and the game is played on a small set of labelled examples:

* **Value.** ``v_n(S)`` is the value on example ``n`` of the network with only the channels in
  ``S`` active; the others are zeroed at the group's gate points, i.e. after BatchNorm (and so
  after the ReLU, which maps 0 to 0), exactly as removing them would (in eval mode). Option
  ``value``:

  - ``loss`` (default, as in the paper): ``v_n(S) = -CE(x_n, y_n; S)``.
  - ``cp-size`` (**new in prunecp**, not in the paper; algorithms.md §3(d) "CP-aware variant"):
    ``v_n(S) = -sum_k C_k(x_n; S)``, the negated *smooth conformal set size* of
    :func:`prunecp_cli.conformal.smooth.smooth_set_size_loss`. The examples are split once (seeded)
    into a calibration half, which sets the smooth threshold q(S) anew for every coalition, and a
    prediction half, whose examples are the game's examples; the mean of ``v_n`` over them is
    ``-smooth_set_size_loss`` of that split. Options ``alpha``, ``temperature`` (on
    -log-probabilities) and ``dispersion`` shape it. A channel is then valuable when silencing it
    makes the recalibrated prediction sets larger.

* **Estimator.** Permutation sampling (Castro et al. 2009) from
  :func:`~prunecp_cli.importance.shapley_estimator.permutation_shapley`: ``samples`` permutations
  (default 5, rounded up to an even number because they come in antithetic pairs ``pi`` and
  ``reversed(pi)``), drawn from a generator seeded by ``--seed`` and the group's position, the same
  permutations for every example. Each permutation switches the channels off one by one and credits
  each with the value lost. Cost per group: ``2 + P (C - 1)`` coalitions, each a pass of the layers
  *after* the group only (:class:`~prunecp_cli.surgery.masked.MaskedEvaluator` reuses the group's
  input activations), with many coalitions stacked into one batch (``max-rows``).
  ``truncation > 0`` stops a permutation once the mean value is within ``truncation`` of the value
  with every channel off (the loss has saturated); 0 (default) disables it, as in the paper's code.

* **Depth** (``depth``, default **0.5**; new in prunecp): only the first ``depth·C`` removals of each
  permutation from the full layer are played and credited, and each channel is averaged over the
  permutations that reached it: the mean marginal value over coalitions of at least half the
  channels, a semivalue rather than the Shapley value (``depth=1``). With antithetic pairs every
  channel is reached exactly once per pair, and a draw costs half the coalitions. Pruning never
  visits the small coalitions, where marginals are large and noisy and dominate the full Shapley
  value. Measured on the benchmark's three MNIST-5k models at 0.5 of the FLOPs (global scope, equal
  shares, mean over scoring seeds 0-2 of the mean LAC set size over 500 re-splits;
  ``examples/benchmarks/allocation_probe.py --methods shapley``): the paper's setting (depth 1,
  mean) gave 3.19 / 4.79 / 5.16 (VGG / ResNet / MobileNet), worse than ``random`` (2.78 / 2.53 /
  4.68); depth 0.5 with the mean 3.09 / 2.31 / 3.96; depth 0.5 with ``mean+2std`` **1.18 / 1.46 /
  2.14**, the defaults.

* **Schedule** (``schedule``): ``one-shot`` (default) plays each layer's game once. ``greedy`` (new in
  prunecp, after cp-bruteforce's schedule) removes the ``chunk`` channels of lowest value, re-plays
  the game on the channels left (the removed ones off in every coalition) and repeats until
  ``remove`` of the layer is gone, at most ``max-rounds`` games per layer (the chunk grows to fit):
  redundant channels, which split one value between them, are then not both removed. It costs up
  to ``max-rounds`` times as many coalitions; no ``std_error`` is written.

* **Aggregation** over examples (``aggregate``): ``mean+2std`` (default: mean plus twice the
  population standard deviation over examples; it favours channels that matter a lot for a few
  examples, Ancona et al.'s "SV mean+2std", their best variant) or ``mean`` (the efficient value:
  with ``depth=1`` a group's values sum to its loss change from all channels on to all off).

* **Standard error.** ``importance.json`` gets ``std_error`` per channel: the standard error of the
  example-mean Shapley value over the independent draws (antithetic pairs), i.e. the Monte-Carlo
  error of the estimate for *these* examples (of the mean, whatever ``aggregate``). It needs at least
  two draws (``samples >= 3``).

**Examples.** The game is played on ``--max-samples`` examples of the score split (a seeded
subset), or on :data:`DEFAULT_EXAMPLES` = 128 when ``--max-samples`` is not given: Shapley values
cost ``O(P C N)`` suffix passes, and a small batch is what the method was designed for. All of
them form one batch per group; ``max-rows`` bounds the rows (coalitions × examples) of one pass.

**Distributed runs** split the *groups* over ranks (every rank plays its groups on all examples)
and sum the results, so ``torchrun`` gives exactly the single-process values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from prunecp_cli import dist
from prunecp_cli.conformal.quantile import min_calibration_size
from prunecp_cli.conformal.smooth import smooth_threshold, soft_set_membership
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options
from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores
from prunecp_cli.importance.shapley_estimator import (
    ShapleyEstimate,
    ValueFn,
    aggregate,
    draw_std_error,
    permutation_shapley,
)
from prunecp_cli.surgery.masked import MaskedEvaluator

DEFAULT_EXAMPLES = 128
VALUES = ("loss", "cp-size")
AGGREGATIONS = ("mean", "mean+2std")
SCHEDULES = ("one-shot", "greedy")

ValueOfLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(logits [M, N, K], labels [N]) -> per-example values [M, N']`` of ``M`` coalitions."""


def loss_value(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``-CE`` of every coalition on every example: ``[M, N, K], [N] -> [M, N]``."""
    copies, n, classes = logits.shape
    ce = F.cross_entropy(logits.reshape(-1, classes).float(), labels.repeat(copies), reduction="none")
    return -ce.reshape(copies, n)


def cp_size_value(*, calibration: torch.Tensor, alpha: float, temperature: float, dispersion: float) -> ValueOfLogits:
    """Negated smooth conformal set size of the non-calibration examples, per coalition.

    Args:
        calibration: boolean ``[N]``, True for the examples that calibrate the smooth threshold.
        alpha: miscoverage of the threshold.
        temperature: soft-set temperature, on -log-probabilities.
        dispersion: smooth-quantile width (see :func:`prunecp_cli.conformal.smooth.smooth_quantile`).

    Returns:
        ``(logits [M, N, K], labels [N]) -> [M, N_pred]``, ``N_pred`` the non-calibration examples.
    """

    def value(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cal = calibration.to(logits.device)
        out = []
        for coalition in logits.float():
            q = smooth_threshold(coalition[cal], labels[cal], alpha=alpha, dispersion=dispersion,
                                 nonconformity="logp")
            member = soft_set_membership(coalition[~cal], q, temperature=temperature, nonconformity="logp")
            out.append(-member.sum(1))
        return torch.stack(out)

    return value


def game_value(kind: str, *, examples: int, seed: int, alpha: float = 0.1, temperature: float = 1.0,
               dispersion: float = 0.1) -> ValueOfLogits:
    """The per-example value of option ``value`` on ``examples`` game examples.

    ``cp-size`` calibrates on the examples ``torch.randperm(examples, seed)[: examples // 2]``, the
    split :func:`~prunecp_cli.conformal.smooth.smooth_set_size_loss` draws from the same generator,
    so the mean value over the other half is ``-smooth_set_size_loss``.

    Raises:
        UsageError: an unknown kind, or too few examples to calibrate at ``alpha``.
    """
    if kind == "loss":
        return loss_value
    if kind != "cp-size":
        raise UsageError(f"--opt value={kind}: use one of {', '.join(VALUES)}")
    n_cal = examples // 2
    need = min_calibration_size(alpha)
    if n_cal < need or examples - n_cal < 1:
        raise UsageError(
            f"--opt value=cp-size calibrates on half of the {examples} game examples ({n_cal}); alpha={alpha} "
            f"needs at least {need}: pass --max-samples {2 * need} or more, or a larger --opt alpha"
        )
    order = torch.randperm(examples, generator=torch.Generator().manual_seed(seed))
    calibration = torch.zeros(examples, dtype=torch.bool)
    calibration[order[:n_cal]] = True
    return cp_size_value(calibration=calibration, alpha=alpha, temperature=temperature, dispersion=dispersion)


def make_value_fn(evaluator: MaskedEvaluator, group: str, labels: torch.Tensor, value: ValueOfLogits) -> ValueFn:
    """The game of one group on the evaluator's prepared batch: ``masks [M, C] -> values [M, N']``."""

    def value_fn(masks: torch.Tensor) -> torch.Tensor:
        return value(evaluator.evaluate(group, masks), labels).detach()

    return value_fn


@dataclasses.dataclass(frozen=True)
class GroupShapley:
    """Shapley values of one group, combined over antithetic draws.

    Attributes:
        per_example: ``float64[N, C]`` values averaged over permutations.
        std_error: ``float64[C]`` standard error of the example mean over draws (NaN with one draw).
        draws: number of independent draws (antithetic pairs, or single permutations).
        evaluations: coalitions evaluated.
    """

    per_example: torch.Tensor
    std_error: torch.Tensor
    draws: int
    evaluations: int


def draw_estimates(value_fn: ValueFn, channels: int, *, samples: int, generator: torch.Generator,
                   antithetic: bool = True, truncation: float | None = None,
                   max_masks: int = 256, depth: float = 1.0) -> Iterator[ShapleyEstimate]:
    """One :func:`permutation_shapley` estimate per independent draw (antithetic pair or permutation).

    All draws share ``generator``, so together they use exactly the permutations, and give the
    values, of a single call with ``samples`` permutations; drawing one at a time lets a progress bar
    advance. Combine them with :func:`combine_draws`.

    Args:
        value_fn: the game, ``BoolTensor[M, C] -> Tensor[M, N]``.
        channels: players ``C``.
        samples: permutations (rounded up to even when ``antithetic``).
        generator: seeded CPU generator.
        antithetic: pair each permutation with its reverse.
        truncation: truncation tolerance on the example-mean value (None: off).
        max_masks: most coalitions per ``value_fn`` call.
        depth: fraction of each permutation played (:func:`permutation_shapley`).
    """
    per_call = 2 if antithetic else 1
    for _ in range(max(1, math.ceil(samples / per_call))):
        yield permutation_shapley(value_fn, channels, samples=per_call, antithetic=antithetic, generator=generator,
                                  truncation_tol=truncation, max_masks_per_call=max_masks, depth=depth)


def combine_draws(draws: list[ShapleyEstimate]) -> GroupShapley:
    """Average the draws; the standard error is the spread of their example means over sqrt(draws).

    With ``depth < 1`` a draw credits only the channels its permutations reached: each channel's average
    is weighted by how often each draw reached it, and its standard error is over the draws that did.
    """
    means = torch.stack([d.mean for d in draws])
    channels = means.shape[1]
    weight = torch.stack([torch.ones(channels, dtype=torch.float64) if d.reached is None else d.reached.double()
                          for d in draws])  # [D, C]
    per_example = (torch.stack([d.per_example for d in draws]) * weight[:, None]).sum(0) / weight.sum(0).clamp(min=1)
    std_error = draw_std_error(torch.where(weight > 0, means, torch.nan))
    return GroupShapley(per_example=per_example, std_error=std_error, draws=len(draws),
                        evaluations=sum(d.evaluations for d in draws))


def estimate_group(value_fn: ValueFn, channels: int, *, samples: int, generator: torch.Generator,
                   antithetic: bool = True, truncation: float | None = None, max_masks: int = 256) -> GroupShapley:
    """Permutation-sampling Shapley values of one group (all draws of :func:`draw_estimates`, combined)."""
    return combine_draws(list(draw_estimates(value_fn, channels, samples=samples, generator=generator,
                                             antithetic=antithetic, truncation=truncation, max_masks=max_masks)))


def group_generator(seed: int, position: int, round_: int = 0) -> torch.Generator:
    """The permutation generator of the group at ``position`` (in greedy round ``round_`` > 0): independent of
    the other groups and rounds."""
    entropy = [int(seed), int(position)] + ([int(round_)] if round_ else [])  # round 0: the one-shot stream
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def game_examples(ctx: ImportanceContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples every group's game is played on: ``--max-samples`` or 128, all ranks alike."""
    limit = ctx.max_samples if ctx.max_samples is not None else DEFAULT_EXAMPLES
    data = dataclasses.replace(ctx, max_samples=limit, shard=None).dataset()
    xs, ys = [], []
    for batch in data.batches(ctx.batch_size, device=ctx.device):
        xs.append(batch.x)
        ys.append(batch.y.to(ctx.device))
    return torch.cat(xs), torch.cat(ys)


class ShapleyImportance(Importance):
    """Permutation-sampled Shapley value of each channel in its layer's game (see module docstring)."""

    name = "shapley"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        opts = method_options(ctx, self.name)
        samples, how = int(opts["samples"]), str(opts["aggregate"])
        truncation, depth = float(opts["truncation"]), float(opts["depth"])
        if not 0.0 < depth <= 1.0:
            raise UsageError(f"--opt depth={depth} must lie in (0, 1] (1: the Shapley value)")
        if samples < 1:
            raise UsageError(f"--opt samples={samples}: permutation sampling needs at least 1 permutation")
        if how not in AGGREGATIONS:
            raise UsageError(f"--opt aggregate={how}: use one of {', '.join(AGGREGATIONS)}")
        if truncation < 0:
            raise UsageError(f"--opt truncation={truncation} must be >= 0 (0 disables truncation)")
        x, y = game_examples(ctx)
        value = game_value(str(opts["value"]), examples=len(y), seed=ctx.seed, alpha=float(opts["alpha"]),
                           temperature=float(opts["temperature"]), dispersion=float(opts["dispersion"]))
        max_rows = int(opts["max-rows"])
        antithetic = bool(opts["antithetic"])
        draws = max(1, math.ceil(samples / (2 if antithetic else 1)))
        schedule = str(opts["schedule"])
        if schedule not in SCHEDULES:
            raise UsageError(f"--opt schedule={schedule}: use one of {', '.join(SCHEDULES)}")
        errors = schedule == "one-shot" and draws >= 2  # greedy scores are removal rounds: no errors to write
        if schedule == "one-shot" and not errors:
            ctx.reporter.warn(f"--opt samples={samples} gives a single independent draw: no std_error is written; "
                              "use samples >= 3 for standard errors")
        mine = _my_groups(ctx.groups)
        results: dict[str, GroupShapley] = {}
        play = functools.partial(draw_estimates, samples=samples, antithetic=antithetic, truncation=truncation or None,
                                 max_masks=max(1, max_rows // len(y)), depth=depth)
        with MaskedEvaluator(ctx.model, ctx.groups, max_rows=max_rows) as evaluator:
            evaluator.prepare(x)
            games = {g.name: make_value_fn(evaluator, g.name, y, value) for g in ctx.groups if g.name in mine}
            if schedule == "greedy":
                greedy = Greedy(scope="local", remove=float(opts["remove"]), chunk=int(opts["chunk"]),
                                max_rounds=int(opts["max-rounds"]))
                self._greedy(ctx, games, results, play, greedy, how)
            else:
                work = self._play(ctx, games, results, play)
                total = sum(draws for g in ctx.groups if g.name in mine)
                description = f"shapley: {len(mine)} group(s) × {draws} draw(s), {len(y)} examples"
                for _ in ctx.reporter.track(work, total=total, description=description):
                    pass
        scores = {}
        for group in ctx.groups:  # every rank reduces every group, in the same order
            result = results.get(group.name)
            channels = group.channels
            local = (aggregate(result.per_example, how) if result else torch.zeros(channels, dtype=torch.float64))
            error = result.std_error if result else torch.zeros(channels, dtype=torch.float64)
            combined = ctx.reduce(torch.stack([local, error]).to(ctx.device)).cpu()
            scores[group.name] = combined[0]
            if errors:
                ctx.extras.setdefault(group.name, {})["std_error"] = combined[1].tolist()
        return scores

    @staticmethod
    def _play(ctx, games, results, play):
        """Fill ``results`` group by group; yields once per draw (for the progress bar)."""
        for position, group in enumerate(ctx.groups):
            if group.name not in games:
                continue
            draws = []
            for estimate in play(games[group.name], group.channels, generator=group_generator(ctx.seed, position)):
                draws.append(estimate)
                yield
            results[group.name] = combine_draws(draws)

    @staticmethod
    def _greedy(ctx, games, results, play, greedy, how):
        """Fill ``results`` with greedy-schedule scores (:func:`greedy_shapley`)."""
        positions = {g.name: i for i, g in enumerate(ctx.groups)}
        channels = {g.name: g.channels for g in ctx.groups if g.name in games}
        with ctx.reporter.status(f"shapley, greedy: {len(channels)} group(s), chunks of {greedy.chunk}"):
            scores, rounds = greedy_shapley(games, channels, play, greedy, how,
                                            generator=lambda name, r: group_generator(ctx.seed, positions[name], r))
        for name, score in scores.items():
            ctx.extras.setdefault(name, {})["round"] = rounds[name]
            results[name] = GroupShapley(per_example=score[None, :], std_error=torch.full_like(score, torch.nan),
                                         draws=1, evaluations=0)


def greedy_shapley(games: dict[str, ValueFn], channels: dict[str, int], play: Callable[..., Iterator[ShapleyEstimate]],
                   greedy: Greedy, how: str, *, generator: Callable[[str, int], torch.Generator],
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]]]:
    """Scores whose ascending order is the greedy removal order of each group (``schedule=greedy``).

    Round r plays each group's game on the channels still alive (those removed so far stay off in
    every coalition), estimates their values with ``play`` (draws of :func:`draw_estimates`, the
    generator ``generator(group, r)``) and removes the ``greedy.chunk`` of lowest value, until
    ``greedy.remove`` of the group is gone (:func:`~prunecp_cli.importance.cp_greedy.greedy_scores`,
    local scope). Two channels that copy each other split one value between them, so a one-shot
    ranking can drop both; after the first goes, the second carries the whole value and stays.

    Returns:
        ``(scores, rounds)``: per group ``float64[C]`` scores, and the round each channel went in (−1: kept).
    """
    rounds = 0

    def measure(alive: dict[str, torch.Tensor], active: set[str]) -> dict[str, torch.Tensor]:
        nonlocal rounds
        rounds += 1
        out = {}
        for name in active:
            players = alive[name].nonzero().squeeze(1)
            game = _sub_game(games[name], players, channels[name])
            draws = list(play(game, len(players), generator=generator(name, rounds)))
            values = torch.zeros(channels[name], dtype=torch.float64)
            values[players] = aggregate(combine_draws(draws).per_example, how)
            out[name] = values
        return out

    scores, extras = greedy_scores(channels, measure, dataclasses.replace(greedy, scope="local"))
    return scores, {name: extras[name]["round"] for name in scores}


def _sub_game(game: ValueFn, players: torch.Tensor, channels: int) -> ValueFn:
    """``game`` restricted to ``players``: the other channels stay off in every coalition."""

    def value_fn(masks: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(masks.shape[0], channels, dtype=torch.bool, device=masks.device)
        full[:, players.to(masks.device)] = masks
        return game(full)

    return value_fn


def _my_groups(groups) -> set[str]:
    """Names of the groups this rank plays: all of them, or every world-size-th under torchrun."""
    if not dist.is_distributed():
        return {g.name for g in groups}
    import torch.distributed as tdist

    rank, world = tdist.get_rank(), tdist.get_world_size()
    return {g.name for i, g in enumerate(groups) if i % world == rank}
