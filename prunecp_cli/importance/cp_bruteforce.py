"""Brute-force conformal-efficiency importance (``cp-bruteforce``).

The cost of removing channel f of a group is how much less efficient a split-conformal predictor on
top of the network becomes when f is silenced (Zhao, Farjudian & Bellotti, Neurocomputing 611,
128704, 2025; algorithms.md §1 steps 1-3)::

    c_f = E(θ with channel f zeroed) − E(θ)        (larger = more important)

* **Channel zeroed** after its normalisation layer, for every member of the coupled group at once
  (:class:`~prunecp_cli.surgery.gates.ChannelGates`), which equals removing it in eval mode.
* **Recalibrated, averaged over re-splits** (:mod:`~prunecp_cli.importance.cp_resplit`). All of the
  score split (after ``--max-samples``) is used. For every mask the logits of all points are computed
  once; then ``resplits`` (default 400) random calibration/evaluation splits of those points
  (``cal-fraction`` calibrates) each recalibrate the LAC threshold q̂ = the k-th smallest calibration
  nonconformity 1 − π_y(x), k = ⌈(n+1)(1−α)⌉, and E is the mean over the splits of the efficiency on
  the evaluation part. On one split of a few hundred points c_f is mostly the noise of q̂ and of the
  evaluation half; the average over re-splits of the same cached logits is cheap (vectorised).
  ``resplits=1`` is the seeded single split (split 0 is ``--seed``'s permutation).
* **Efficiency E** (option ``measure``, smaller = more efficient): ``soft-size`` (default), the
  sigmoid set size at the recalibrated threshold (temperature ``temperature``); ``size``, the mean
  set size at α; ``size-of``, the mean of set size and observed fuzziness (OF, Vovk et al. 2016: mean
  over points of the sum of the false labels' conformal p-values; algorithms.md §1 step 2); ``of``.
  A set size moves only when a threshold crosses a probability, so on a few hundred points most
  channels' ``size`` costs are ties or noise; the soft size moves with every probability. On the
  benchmark (200 score images, local greedy, mean LAC set size at 0.5 / 0.3 of the FLOPs) ``soft-size``
  gave VGG 0.922 / 1.816, ResNet 1.058 / 2.316, MobileNet 1.815 / 6.172 against 1.138 / 2.437,
  1.461 / 3.123, 2.398 / 5.204 for ``size`` (allocation_probe.py ``--opt measure=...``).
* **BatchNorm** (option ``bn``, default ``running``): the masked model normalises with the dense
  model's running statistics, though prune re-estimates them after removal. ``bn=batch`` normalises
  every mask's rows with their own batch statistics instead (step 5 of
  :mod:`~prunecp_cli.surgery.masked`), which mimics that re-estimation; measured on the benchmark
  (400 score images, seed 0, mean LAC set size at 0.5 / 0.3 of the FLOPs, allocation_probe.py
  ``--opt bn=...``) it helped only the VGG at 0.3: VGG 0.965 / 1.236, ResNet 1.598 / 2.536,
  MobileNet 3.003 / 6.661 against 0.955 / 1.613, 1.179 / 2.301, 1.149 / 3.556 for ``running``, and
  scored 1.8-2.5 times slower (55 / 172 / 657 s against 30 / 95 / 261 s).
* **Greedy schedule** (default, :mod:`~prunecp_cli.importance.cp_greedy`): one-at-a-time effects miss
  redundancy, so the cheapest ``chunk`` channels are silenced, every remaining channel is re-scored
  with them silenced, and so on until ``remove`` of the channels are gone (``scope`` local: within
  each group, the other groups intact; global: across all groups, every removal so far silenced).
  The score of a channel is its removal round plus its position within the round, so the ranking is
  the greedy removal order; the survivors follow, by their last costs. ``schedule=one-shot`` returns
  c_f of every channel alone (the estimator of the paper).
* **Lazy rounds** (``refresh``, default 8): every channel is re-measured every 8th round and in a
  group's last; the rounds between re-measure only the ``candidates`` (3) chunks of lowest last cost
  and pick among them (:mod:`~prunecp_cli.importance.cp_greedy`). A scoring costs about 2.4 times
  less, and the time is better spent on more score images: on the benchmark (local greedy, mean LAC
  set size at 0.5 / 0.3 of the FLOPs, allocation_probe.py) ``refresh=8`` on 400 images gave VGG
  0.926 / 1.785, ResNet 1.079 / 3.091, MobileNet 1.174 / 4.723 in 19 / 53 / 167 s, against
  0.922 / 1.818, 1.059 / 2.316, 1.815 / 6.160 in 15 / 44 / 199 s for ``refresh=1`` on 200.
* **Scope** (default ``local``): the local greedy's scores are ranked within each group and prune's
  global selection shares the budget by within-group rank, like the other methods; with
  ``scope=global`` prune takes the global greedy's scores unnormalised (costs of one network, one
  scale), and ``scope=auto`` takes prune's ``--scope``. On the benchmark (200 score images, mean LAC
  set size at 0.5 of the FLOPs) the global greedy was worse: VGG 3.311 against 1.138 for the local
  greedy (both ``measure=size``); with ``max-rounds=8`` VGG / ResNet / MobileNet 3.549 / 6.545 / 5.386 against 1.741 / 1.567 /
  5.187. Its pick is by cost alone (``per=channel``); ``per=flop`` ranks by cost per FLOP saved
  (VGG 1.429, ResNet 6.454 at 0.5).

On the digits CNN (tests/importance/test_cp_bruteforce.py), zeroing a layer's lowest quarter by this
estimator gave a smaller held-out set size than taylor's or l1's quarter, where the former one-shot,
single-split estimator did not.

**Cost and exactness.** Every round is one pass over the data on
:class:`~prunecp_cli.surgery.masked.MaskedEvaluator`: per batch the (base) model runs once and, per
group, only the layers after the group run, for the masks with one more channel off, a few masks per
pass (``max-rows``). Layers whose masked value is the clean value times the mask are not re-run,
and the first dense convolution after the group costs one grouped convolution per batch instead of
one per mask. With ``schedule=one-shot resplits=1`` the result equals a plain loop that re-runs the
whole model once per channel (tested to 1e-5). The greedy schedule runs at most ``max-rounds``
passes (the chunk grows to fit); each costs about one one-shot scoring of the remaining channels.

**Memory.** The float32 logits of every point are kept for every mask of a round until all batches
are seen (the thresholds need every calibration point first): 4·(Σ_g C_g + 1)·N·K bytes. Above
``max-memory-gb`` (default 2) the method stops before computing and names a ``--max-samples`` that
fits.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from prunecp_cli import dist
from prunecp_cli.conformal.quantile import min_calibration_size
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options
from prunecp_cli.importance.cp_greedy import Greedy, greedy_scores
from prunecp_cli.importance.cp_resplit import MEASURES, resplit_efficiency, split_masks
from prunecp_cli.surgery.masked import MaskedEvaluator


class CPBruteForceImportance(Importance):
    """Change of conformal efficiency when channels are zeroed, greedy by default (see module docstring)."""

    name = "cp-bruteforce"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        settings = _settings(method_options(ctx, self.name))
        data = ctx.dataset()
        rows = dataclasses.replace(ctx, shard=None).dataset().rows
        calibration = split_masks(rows, settings.fraction, settings.resplits, ctx.seed)
        _check_size(ctx, int(calibration[0].sum()), settings.alpha, settings.max_gb)
        channels = {g.name: g.channels for g in ctx.groups}
        greedy = settings.greedy
        saved = _flops_saved(ctx) if greedy is not None and greedy.scope == "global" and settings.per == "flop" else None
        with MaskedEvaluator(ctx.model, ctx.groups, max_rows=settings.max_rows,
                             batch_statistics=settings.batch_statistics) as ev:
            def measure(alive: dict[str, torch.Tensor], active: set[str] | None = None,
                        only: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
                return _costs(ctx, ev, data, alive, calibration, settings, active, only)

            if greedy is None:
                return measure({name: torch.ones(c, dtype=torch.bool) for name, c in channels.items()})
            scores, extras = greedy_scores(channels, measure, greedy, saved)
        for name, values in extras.items():
            ctx.extras.setdefault(name, {}).update(values)
        return scores


@dataclasses.dataclass(frozen=True)
class _Settings:
    alpha: float
    measure: str
    temperature: float
    fraction: float
    resplits: int
    max_rows: int
    max_gb: float
    greedy: Greedy | None  # None: one-shot
    per: str  # global greedy: cost per "flop" saved or per "channel"
    batch_statistics: bool  # bn=batch


def _settings(opts: dict) -> _Settings:
    """Validated options (UsageError naming the option otherwise)."""
    measure, schedule, scope = str(opts["measure"]), str(opts["schedule"]), str(opts["scope"])
    if measure not in MEASURES:
        raise UsageError(f"--opt measure={measure}: use one of {', '.join(MEASURES)}")
    if schedule not in ("greedy", "one-shot"):
        raise UsageError(f"--opt schedule={schedule}: use greedy or one-shot")
    if scope not in ("auto", "local", "global"):
        raise UsageError(f"--opt scope={scope}: use auto, local or global")
    per = str(opts["per"])
    if per not in ("flop", "channel"):
        raise UsageError(f"--opt per={per}: use flop or channel")
    if str(opts["bn"]) not in ("batch", "running"):
        raise UsageError(f"--opt bn={opts['bn']}: use batch or running")
    fraction, remove = float(opts["cal-fraction"]), float(opts["remove"])
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"--opt cal-fraction={fraction} must lie in (0, 1)")
    if not 0.0 <= remove < 1.0:
        raise UsageError(f"--opt remove={remove} must lie in [0, 1)")
    for key in ("resplits", "chunk", "max-rounds", "refresh", "candidates"):
        if int(opts[key]) < 1:
            raise UsageError(f"--opt {key}={opts[key]} must be at least 1")
    if float(opts["temperature"]) <= 0:
        raise UsageError(f"--opt temperature={opts['temperature']} must be positive")
    greedy = None if schedule == "one-shot" else Greedy(
        scope="global" if scope == "global" else "local", remove=remove, chunk=int(opts["chunk"]),
        max_rounds=int(opts["max-rounds"]), refresh=int(opts["refresh"]), candidates=int(opts["candidates"]))
    return _Settings(float(opts["alpha"]), measure, float(opts["temperature"]), fraction, int(opts["resplits"]),
                     int(opts["max-rows"]), float(opts["max-memory-gb"]), greedy, per, str(opts["bn"]) == "batch")


def _flops_saved(ctx: ImportanceContext):
    """``alive masks -> FLOPs one more channel of each group would save`` (:class:`FlopsModel`, exact for
    conv/linear/normalisation layers)."""
    from prunecp_cli.measure import flops_by_module
    from prunecp_cli.surgery.select import FlopsModel

    flops = FlopsModel(ctx.model, ctx.groups, flops_by_module(ctx.model, ctx.graph.example))

    def saved(alive: dict[str, torch.Tensor]) -> dict[str, float]:
        removal = {g: (~a).nonzero().squeeze(1).tolist() for g, a in alive.items()}
        now = flops(removal)
        out = {}
        for g, a in alive.items():
            live = a.nonzero().squeeze(1)
            out[g] = now - flops({**removal, g: [*removal[g], int(live[0])]}) if len(live) else 0.0
        return out

    return saved


@torch.no_grad()
def _costs(ctx: ImportanceContext, ev: MaskedEvaluator, data, alive: dict[str, torch.Tensor],
           calibration: torch.Tensor, settings: _Settings, active: set[str] | None = None,
           only: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """E(removed so far, f off) − E(removed so far) for every alive channel f of the ``active`` groups (all: None).

    Only the channels of ``only`` (``{group: [C] bool}``; None: every alive channel) are measured; the
    other channels, and every channel of an inactive group, get 0.

    One pass over the data: per batch the model runs once, then every group's masks (its removed
    channels and one more off) on the masked evaluator. With the global greedy schedule the removed
    channels of *every* group are silenced in all passes (the evaluator's base masks); otherwise each
    group sees only its own removals, and its first mask (its removals alone) is the reference. The
    efficiency is averaged over the re-splits of ``calibration``.
    """
    joint = settings.greedy is not None and settings.greedy.scope == "global"
    ev.set_base({g: a.float() for g, a in alive.items() if joint and not bool(a.all())})
    masks = {}
    for group in ctx.groups:
        wanted = alive[group.name] if only is None else only.get(group.name, torch.zeros_like(alive[group.name]))
        live = wanted.nonzero().squeeze(1)
        if active is not None and group.name not in active:
            live = live[:0]
        rows = alive[group.name].float().repeat(len(live) + 1, 1)
        rows[torch.arange(1, len(live) + 1), live] = 0.0
        masks[group.name] = (live, rows if not joint else rows[1:])
    store: dict[str, list[torch.Tensor]] = {g.name: [] for g in ctx.groups}
    base, labels, index = [], [], []
    work = sum(len(live) for live, _ in masks.values())
    batches = -(-len(data) // ctx.batch_size)
    for batch in ctx.reporter.track(data.batches(ctx.batch_size, device=ctx.device), total=batches,
                                    description=f"cp-bruteforce: {work} channels × {batches} batch(es)"):
        base.append(ev.prepare(batch.x).float().cpu())
        labels.append(batch.y.cpu())
        index.append(batch.index.cpu())
        for group in ctx.groups:
            if len(masks[group.name][0]):
                store[group.name].append(ev.evaluate(group.name, masks[group.name][1]).float().cpu())
    index = torch.cat(index)
    gathered = lambda t, dim: dist.gather_rows(t.movedim(dim, 0).contiguous(), index).movedim(0, dim)  # noqa: E731
    labels = gathered(torch.cat(labels), 0)
    efficiency = lambda logits: resplit_efficiency(logits, labels, calibration, alpha=settings.alpha,  # noqa: E731
                                                   measure=settings.measure, temperature=settings.temperature)
    reference = efficiency(gathered(torch.cat(base), 0)[None])[0] if joint else None
    out = {}
    for group in ctx.groups:
        live = masks[group.name][0]
        costs = torch.zeros(group.channels, dtype=torch.float64)
        if len(live):
            values = efficiency(gathered(torch.cat(store[group.name], dim=1), 1))
            costs[live] = values - reference if joint else values[1:] - values[0]
        out[group.name] = costs
    return out


def _check_size(ctx: ImportanceContext, n_cal: int, alpha: float, max_gb: float) -> None:
    """Fail early, with a ``--max-samples`` that works, when the data are too few or too many."""
    total = len(dataclasses.replace(ctx, shard=None).dataset())
    if n_cal < min_calibration_size(alpha) or total - n_cal < 1:
        raise UsageError(
            f"cp-bruteforce splits its {total} score examples into {n_cal} calibration and {total - n_cal} "
            f"evaluation points; alpha={alpha} needs at least {min_calibration_size(alpha)} calibration points "
            "and one evaluation point: pass more score data or change --opt cal-fraction"
        )
    with torch.no_grad():
        classes = int(ctx.model(ctx.dataset().first_batch(1).x.to(ctx.device)).shape[-1])
    masks = sum(g.channels for g in ctx.groups) + 1
    per_example = masks * 4 * classes  # float32 logits of a point, every mask of one round
    need = per_example * total
    if need > max_gb * 2**30:
        fits = math.floor(max_gb * 2**30 / per_example)
        raise UsageError(
            f"cp-bruteforce would keep {need / 2**30:.1f} GiB of logits ({masks} masks × {total} examples × "
            f"{classes} classes); pass --max-samples {max(fits, 2 * min_calibration_size(alpha))} or raise "
            "--opt max-memory-gb"
        )
