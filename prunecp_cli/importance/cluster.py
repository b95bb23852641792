"""Clustering importance (``cluster``): MCICP channel clustering with crowding-distance selection.

Sun, Chen, Wu, Li & Ma, "A Clustering Pruning Method Based on Multidimensional Channel Information",
Neural Processing Letters (2024), doi:10.1007/s11063-024-11684-z; algorithms.md §4. Only the
abstract was available, so the concrete choices below are prunecp's (algorithms.md §4 [I]).

1. **Features** of channel ``c`` of a group, z-scored within the group
   (:func:`~prunecp_cli.importance.clustering.standardize`):

   - ``mu`` and ``sigma2``: mean and population variance of the channel's filter weights, the
     filters of every layer producing the group's channels concatenated (a residual group has
     several);
   - ``d = 1 - cos(m_c, 1)``: the cosine distance to the all-ones direction of the channel's *mean
     activation map* ``m_c`` (option ``cosine-source=activation``, the default): the mean over the
     feature part of the score split of the channel's output at its gate points (after BatchNorm,
     before any separate nonlinearity), all gate points' maps concatenated. On the weights
     (``cosine-source=weight``, the paper's reading) ``d = 1 - mu / sqrt(mu**2 + sigma2)`` is a
     function of the other two features (algorithms.md §4(d)) and adds nothing; the README reports
     how much the two variants' importances differ.

2. **Clusters.** k-means++ with ``restarts`` seedings on each group's standardised features, with
   ``K_l`` clusters (:func:`~prunecp_cli.importance.clustering.kmeans_pp`; seeded by ``--seed``, the
   group and ``K_l``; cached per ``(group, K_l)``).

3. **Cluster counts by self-adaptive DE** (jDE, :func:`~prunecp_cli.importance.jde.jde_integer_search`)
   over ``K = (K_1..K_L)``, ``K_l in [2, C_l - 1]``, ``population`` individuals, ``generations``
   generations. **Objective** of a candidate ``K``, to maximise::

       accuracy(one-shot pruned model, held-out part) - penalty * max(0, FLOPs / FLOPs_dense - keep)

   The held-out part is a seeded ``holdout`` fraction of the score split (at most 2,000 examples);
   the activation maps use the rest. The candidate is pruned as MCICP does (§4(b)4): every cluster
   ``g`` keeps its ``max(1, ceil(f |g|))`` least crowded members (crowding distance over the three
   features), with one keep fraction ``f`` for all groups, the largest whose FLOPs do not exceed
   ``keep`` of the scored model's FLOPs. Since every cluster keeps a channel, many clusters can
   force the FLOPs over ``keep``; the penalty (default 10: one per cent of the dense FLOPs over
   costs 0.1 accuracy) makes that a soft constraint. Removal is simulated exactly with channel
   gates (zero gates == removal in eval mode) and FLOPs with
   :class:`~prunecp_cli.surgery.select.FlopsModel` (exact for conv/linear/BN), so no model is copied.

   **BatchNorm is re-estimated for every candidate** (``bn-recalibrate``, default on), as ``prune``
   does, on up to 2,000 non-held-out examples, then restored. Without it the objective misranks: on
   the digits CNN at keep 0.5, 49 random feasible candidates scored 0.22 mean held-out accuracy
   without re-estimation and 0.70 with it, Spearman 0.28 between the two, no top-5 in common.

4. **Importance.** With the best ``K``, each channel's importance is its
   :func:`~prunecp_cli.importance.clustering.crowding_scores` value: ``(n - r) / n`` for the member
   at crowding rank ``r`` of a cluster of ``n`` (the least crowded member of every cluster scores 1).
   Pruning the lowest importances removes the most crowded channels of each cluster first, in
   proportion to cluster size, whatever target ``prune`` is given. The cluster of every channel is
   written to ``importance.json`` (``cluster``).

   These scores tie often (every cluster's least crowded member scores 1, every cluster of the same
   size repeats the same levels), and a tie is otherwise broken by channel index, which is arbitrary.
   ``tiebreak=l1`` (the default) orders the channels of one level by their group L1 magnitude
   (:func:`~prunecp_cli.importance.magnitude.group_magnitude`, smaller goes first) by adding less
   than half of the smallest gap between two distinct levels (levels ``(n - r) / n`` with
   ``n <= C`` differ by at least ``1 / C**2``), so the crowding order itself is unchanged;
   ``tiebreak=index`` keeps the bare crowding scores. On the benchmark at 0.5 of the FLOPs (population
   6 x 1 generation, 250 images, seeds 0-2) the mean set size went from 1.64 / 3.35 / 3.29 (index) to
   1.63 / 1.82 / 2.91 (l1) on VGG / ResNet / MobileNet (allocation_probe.py; random: 2.78 / 2.53 / 4.68).

``--verbose`` prints, per DE generation, the best individual's cluster counts, objective, accuracy
and FLOPs. Everything is deterministic for a fixed ``--seed``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from prunecp_cli.errors import UsageError
from prunecp_cli.importance import base
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options
from prunecp_cli.importance.clustering import (
    activation_cosine_feature,
    crowding_scores,
    kmeans_pp,
    standardize,
)
from prunecp_cli.importance.jde import DEGeneration, jde_integer_search
from prunecp_cli.importance.magnitude import group_magnitude
from prunecp_cli.surgery.batchnorm import BN_TYPES, recalibrate_batchnorm
from prunecp_cli.surgery.gates import ChannelGates, output_channel_dim
from prunecp_cli.surgery.groups import ChannelGroup
from prunecp_cli.surgery.select import FlopsModel

MAX_HOLDOUT = 2000
COSINE_SOURCES = ("activation", "weight")
TIEBREAKS = ("l1", "index")


def weight_features(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """``(mu, sigma2, 1 - cos(w, 1))`` of each channel's filter weights, producers concatenated: ``[C, 3]``."""
    modules = dict(model.named_modules())
    total = torch.zeros(group.channels, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for member in group.producers():
        rows = modules[member.module].weight.detach()[list(member.member_idxs)].flatten(1).double().cpu()
        roots = torch.tensor(member.root_idxs)
        total.index_add_(0, roots, rows.sum(1))
        squares.index_add_(0, roots, rows.pow(2).sum(1))
        count.index_add_(0, roots, torch.full((len(roots),), float(rows.shape[1]), dtype=torch.float64))
    count = count.clamp_min(1.0)
    mu = total / count
    var = (squares / count - mu.pow(2)).clamp_min(0.0)
    norm = squares.sqrt()
    cos = torch.where(norm > 0, total / count.sqrt() / norm.clamp_min(1e-300), 0.0)
    return torch.stack([mu, var, 1.0 - cos], 1)


def mean_activation_maps(model: nn.Module, groups: list[ChannelGroup], batches, *, reduce=lambda t: t,
                         device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Each channel's mean output map at its group's gate points over ``batches``: ``{group: [C, S]}``.

    ``S`` is the sum over gate points of their spatial sizes (1 for a linear layer). Sums and the
    example count go through ``reduce`` (all ranks' examples).
    """
    modules = dict(model.named_modules())
    sums: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def hook(key, member_idxs):
        def accumulate(module, inputs, output):
            channel_dim = output_channel_dim(module, output)
            values = output.detach().movedim(channel_dim, 1)[:, member_idxs].double()
            values = values.reshape(values.shape[0], values.shape[1], -1).sum(0)
            sums[key] = values if key not in sums else sums[key] + values
        return accumulate

    for group in groups:
        for i, point in enumerate(group.gate_points):
            idx = torch.tensor(point.member_idxs, device=device)
            handles.append(modules[point.module].register_forward_hook(hook((group.name, i), idx)))
    examples = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch.x)
                examples += batch.x.shape[0]
    finally:
        for handle in handles:
            handle.remove()
    examples = reduce(examples).clamp_min(1.0)
    maps = {}
    for group in groups:
        parts = []
        for i, point in enumerate(group.gate_points):
            local = sums[(group.name, i)]
            full = torch.zeros(group.channels, local.shape[1], dtype=torch.float64, device=local.device)
            full[torch.tensor(point.root_idxs, device=local.device)] = reduce(local)
            parts.append(full / examples)
        maps[group.name] = torch.cat(parts, 1).cpu()
    return maps


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated cluster-count vector.

    Attributes:
        genes: ``K_l`` per group.
        keep_fraction: ``f``, the share of every cluster kept.
        flops: FLOPs of the pruned candidate over the scored model's FLOPs.
        accuracy: held-out accuracy of the pruned candidate.
        objective: ``accuracy - penalty * max(0, flops - keep)``.
    """

    genes: tuple[int, ...]
    keep_fraction: float
    flops: float
    accuracy: float
    objective: float


class ClusterSearch:
    """Clusters, crowding ranks, candidate prunings and their objective for one model.

    Args:
        groups: the prunable groups.
        features: ``{group: [C, 3]}`` standardised features.
        flops_model: predicts FLOPs of a removal.
        accuracy: ``removal -> held-out accuracy`` of the model with ``removal`` silenced.
        keep: target fraction of the FLOPs.
        penalty: objective lost per unit of FLOPs fraction above ``keep``.
        seed: seeds k-means.
        restarts: k-means++ seedings.
    """

    def __init__(self, groups: list[ChannelGroup], features: dict[str, torch.Tensor], *, flops_model: FlopsModel,
                 accuracy, keep: float, penalty: float, seed: int, restarts: int = 10) -> None:
        self.groups, self.features = groups, features
        self.flops_model, self.accuracy = flops_model, accuracy
        self.keep, self.penalty, self.seed, self.restarts = keep, penalty, seed, restarts
        self._partitions: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.evaluated: dict[tuple[int, ...], Candidate] = {}

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive gene bounds: ``[min(2, C), max(that, C - 1)]`` per group."""
        lower = np.array([min(2, g.channels) for g in self.groups])
        upper = np.maximum(lower, np.array([g.channels - 1 for g in self.groups]))
        return lower, upper

    def partition(self, position: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(labels, importance)`` of group ``position`` with ``k`` clusters (cached)."""
        key = (position, int(k))
        if key not in self._partitions:
            features = self.features[self.groups[position].name]
            seed = np.random.SeedSequence([self.seed, position, int(k)])
            labels, _, _ = kmeans_pp(features, int(k), seed=np.random.default_rng(seed), restarts=self.restarts)
            self._partitions[key] = (labels, crowding_scores(features, labels))
        return self._partitions[key]

    def removal(self, genes, fraction: float) -> dict[str, list[int]]:
        """Channels removed when every cluster keeps ``max(1, ceil(fraction |g|))`` least crowded members."""
        removal = {}
        for position, (group, k) in enumerate(zip(self.groups, genes, strict=True)):
            labels, importance = self.partition(position, k)
            size = torch.bincount(labels)[labels].double()
            rank = torch.round(size * (1.0 - importance))  # importance = (n - r) / n
            kept = torch.clamp(torch.ceil(torch.round(fraction * size, decimals=9)), min=1.0)
            removal[group.name] = torch.nonzero(rank >= kept).flatten().tolist()
        return removal

    def evaluate(self, genes) -> Candidate:
        """Prune the candidate to the FLOPs budget, measure it and cache the result."""
        key = tuple(int(g) for g in genes)
        if key in self.evaluated:
            return self.evaluated[key]
        goal = self.keep * self.flops_model.total
        lo, hi = 0.0, 1.0
        if self.flops_model(self.removal(key, 0.0)) <= goal:
            for _ in range(30):  # FLOPs grow with the keep fraction
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if self.flops_model(self.removal(key, mid)) <= goal else (lo, mid)
        removal = self.removal(key, lo)
        flops = self.flops_model(removal) / self.flops_model.total
        accuracy = float(self.accuracy(removal))
        objective = accuracy - self.penalty * max(0.0, flops - self.keep)
        self.evaluated[key] = Candidate(key, lo, flops, accuracy, objective)
        return self.evaluated[key]

    def importance(self, genes) -> dict[str, torch.Tensor]:
        """Crowding importance of every channel under cluster counts ``genes``."""
        return {g.name: self.partition(i, k)[1] for i, (g, k) in enumerate(zip(self.groups, genes, strict=True))}


def gated_accuracy(model: nn.Module, groups: list[ChannelGroup], batches: list, *, recalibrate_on: list | None = None,
                   reduce=lambda t: t):
    """``removal -> accuracy`` of ``model`` on ``batches`` with the removed channels gated to zero.

    With ``recalibrate_on`` (input tensors), BatchNorm statistics are first re-estimated on them
    with the gates in place (:func:`~prunecp_cli.surgery.batchnorm.recalibrate_batchnorm`, as
    ``prune`` does after removing the channels) and restored afterwards, so the model is unchanged.
    """
    norms = [m for m in model.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]

    def accuracy(removal: dict[str, list[int]]) -> float:
        device = batches[0].x.device if batches else torch.device("cpu")
        counts = torch.zeros(2, dtype=torch.float64, device=device)
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in norms]
        try:
            with ChannelGates(model, groups) as gates, torch.no_grad():
                for group in groups:
                    mask = torch.ones(group.channels, device=device)
                    mask[removal.get(group.name, [])] = 0.0
                    gates.set(group.name, mask)
                if recalibrate_on is not None:
                    recalibrate_batchnorm(model, recalibrate_on, reduce=reduce)
                for batch in batches:
                    counts[0] += (model(batch.x).argmax(-1) == batch.y).sum()
                    counts[1] += batch.x.shape[0]
        finally:
            for module, (mean, var, tracked) in zip(norms, saved, strict=True):
                module.running_mean.copy_(mean)
                module.running_var.copy_(var)
                module.num_batches_tracked.copy_(tracked)
        counts = reduce(counts)
        return float(counts[0] / counts[1].clamp_min(1.0))

    return accuracy


def break_ties(levels: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """``levels`` (crowding scores ``(n - r) / n``, ``n <= C``) with exact ties ordered by ``secondary``, ascending.

    Adds ``position / (2 C**2)``, ``position`` in ``[0, 1)`` the channel's place by ``secondary``
    (ties by index): less than half the smallest gap ``1 / C**2`` between distinct levels.
    """
    return levels.double() + base.ascending_positions(secondary) / (2.0 * max(len(levels), 1) ** 2)


def split_rows(ctx: ImportanceContext, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Dataset rows of the held-out part and of the BN re-estimation part (seeded, at most 2,000 each).

    The held-out part is a ``fraction`` of all used rows (all ranks' rows alike); the re-estimation
    part comes from the other rows.
    """
    rows = dataclasses.replace(ctx, shard=None).dataset().rows
    order = rows[np.random.default_rng(ctx.seed).permutation(len(rows))]
    count = min(MAX_HOLDOUT, max(1, round(fraction * len(rows))))
    return np.sort(order[:count]), np.sort(order[count : count + MAX_HOLDOUT])


class ClusterImportance(Importance):
    """MCICP clustering with DE-chosen cluster counts and crowding-distance ranking (see module docstring)."""

    name = "cluster"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        opts = _checked(method_options(ctx, self.name))
        data = ctx.dataset()
        held_rows, recal_rows = split_rows(ctx, opts["holdout"])
        held = np.isin(data.rows, held_rows)
        if len(held_rows) + len(recal_rows) > 0 and len(recal_rows) == 0:
            raise UsageError(f"the score split has {len(held_rows)} example(s): too few to hold some out for the DE "
                             "objective and keep some for activation maps and BatchNorm; pass more data")
        features = self.features(ctx, data.subset(np.flatnonzero(~held)), opts["cosine-source"])
        held_batches = list(data.subset(np.flatnonzero(held)).batches(ctx.batch_size, device=ctx.device))
        recal = None
        if opts["bn-recalibrate"]:
            recal_data = data.subset(np.flatnonzero(np.isin(data.rows, recal_rows)))
            recal = [b.x for b in recal_data.batches(ctx.batch_size, device=ctx.device)]
        from prunecp_cli.measure import flops_by_module

        example = ctx.graph.example.to(ctx.device)
        search = ClusterSearch(ctx.groups, features, keep=opts["keep"], penalty=opts["penalty"], seed=ctx.seed,
                               restarts=opts["restarts"],
                               flops_model=FlopsModel(ctx.model, ctx.groups, flops_by_module(ctx.model, example)),
                               accuracy=gated_accuracy(ctx.model, ctx.groups, held_batches, recalibrate_on=recal,
                                                       reduce=ctx.reduce))
        lower, upper = search.bounds()
        ctx.reporter.detail("cluster DE: genes are the cluster counts of " + ", ".join(g.name for g in ctx.groups))

        def report(entry: DEGeneration) -> None:
            best = search.evaluate(entry.best_genes)
            ctx.reporter.detail(
                f"cluster DE generation {entry.generation}/{opts['generations']}: clusters "
                f"{list(best.genes)} objective {best.objective:.4f} (accuracy {best.accuracy:.4f}, FLOPs "
                f"{best.flops:.3f} of the model's, keep fraction {best.keep_fraction:.3f}); population mean "
                f"objective {entry.mean_fitness:.4f}; {entry.evaluations} candidates evaluated")

        with ctx.reporter.status(f"cluster: differential evolution over {len(ctx.groups)} group(s)"):
            result = jde_integer_search(lambda genes: search.evaluate(genes).objective, lower, upper,
                                        population=opts["population"], generations=opts["generations"],
                                        seed=np.random.default_rng([ctx.seed, 1]), verbose_callback=report)
        for position, group in enumerate(ctx.groups):
            labels = search.partition(position, result.best_genes[position])[0]
            ctx.extras.setdefault(group.name, {})["cluster"] = labels.double().tolist()
        importance = search.importance(result.best_genes)
        if opts["tiebreak"] == "index":
            return importance
        modules = dict(ctx.model.named_modules())
        return {g.name: break_ties(importance[g.name], group_magnitude(modules, g, p=1)) for g in ctx.groups}

    @staticmethod
    def features(ctx: ImportanceContext, data, source: str) -> dict[str, torch.Tensor]:
        """Standardised ``(mu, sigma2, d)`` per group, ``d`` from ``source`` (see module docstring)."""
        weights = {g.name: weight_features(ctx.model, g) for g in ctx.groups}
        if source == "activation":
            total = -(-len(data) // ctx.batch_size)
            batches = ctx.reporter.track(data.batches(ctx.batch_size, device=ctx.device), total=total,
                                         description="cluster: mean activation maps")
            maps = mean_activation_maps(ctx.model, ctx.groups, batches, reduce=ctx.reduce, device=ctx.device)
            for name, value in maps.items():
                weights[name][:, 2] = activation_cosine_feature(value)
        return {name: standardize(value) for name, value in weights.items()}


def _checked(opts: dict[str, Any]) -> dict[str, Any]:
    """Typed, range-checked options (UsageError naming the option otherwise)."""
    out = {"population": int(opts["population"]), "generations": int(opts["generations"]),
           "keep": float(opts["keep"]), "holdout": float(opts["holdout"]), "penalty": float(opts["penalty"]),
           "restarts": int(opts["restarts"]), "cosine-source": str(opts["cosine-source"]),
           "bn-recalibrate": bool(opts["bn-recalibrate"]), "tiebreak": str(opts["tiebreak"])}
    if out["population"] < 4:
        raise UsageError(f"--opt population={out['population']}: DE/rand/1 needs at least 4 individuals")
    if out["generations"] < 0 or out["restarts"] < 1:
        raise UsageError("--opt generations must be >= 0 and --opt restarts >= 1")
    for key in ("keep", "holdout"):
        if not 0.0 < out[key] < 1.0:
            raise UsageError(f"--opt {key}={out[key]} must lie in (0, 1)")
    if out["penalty"] < 0:
        raise UsageError(f"--opt penalty={out['penalty']} must be >= 0")
    if out["cosine-source"] not in COSINE_SOURCES:
        raise UsageError(f"--opt cosine-source={out['cosine-source']}: use one of {', '.join(COSINE_SOURCES)}")
    if out["tiebreak"] not in TIEBREAKS:
        raise UsageError(f"--opt tiebreak={out['tiebreak']}: use one of {', '.join(TIEBREAKS)}")
    return out
