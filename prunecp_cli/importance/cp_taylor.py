"""First-order Taylor estimate of the conformal-efficiency importance (``cp-taylor``).

The Molchanov et al. (ICLR 2017) Taylor criterion with the smooth ConfTr set size Ω_s in place of
the cross-entropy (Zhao, Farjudian & Bellotti, Neurocomputing 611, 128704, 2025; algorithms.md §1
step 4 and §1.1). For example n of batch b (size B_b) and channel f, the first-order term is

    t_{n,f} = B_b · Σ_{h,w} ∂Ω_b/∂a_{n,f,h,w} · a_{n,f,h,w},

a the channel's activation after its normalisation layer (equal to after BN + ReLU), computed as
the gradient with respect to a per-example gate of ones. Zeroing channel f changes Ω_b by about
−(1/B_b) Σ_{n∈b} t_{n,f}, the quantity :mod:`~prunecp_cli.importance.cp_bruteforce` measures
exactly (for the hard set size). The score is

    c_f = (1/N) Σ_n |t_{n,f}|        (``aggregate="example"``, default), or
    c_f = |(1/N) Σ_n t_{n,f}|        (``aggregate="batch"``, algorithms.md §1 step 4 as written),

then c ← c / ‖c‖₂ within each group.

**Why the default deviates from the written formula.** Ω_s is a batch-level loss, so the
formula's absolute value of a mean is well defined, but in a trained network the signed first-order
terms of whole channels carry almost no information: on the digits CNN (899 score images, 80
channels) their Spearman correlation with the exact brute-force change is 0.01-0.23, and taking
the absolute value after the mean gives 0.50-0.68 over all channels (worse with larger batches,
as more terms cancel). Averaging per-example magnitudes first, as Molchanov et al. and ``taylor``
do, gives 0.85-0.87 (the cross-entropy ``taylor`` gives 0.89; two brute-force runs on different
internal halves agree at 0.82). The magnitude of the per-example terms measures how strongly the
channel drives the soft sets, which is what removing it disturbs.

* **Ω_s per batch** (:func:`~prunecp_cli.conformal.smooth.smooth_set_size_loss`): a random half of
  the batch (drawn from ``--seed``) calibrates a smooth split-conformal threshold at ``alpha`` on
  −log π_y (ConfTr's THR on log-probabilities, smooth quantile of width ``dispersion`` standard
  errors); the other half gets soft sets σ((q − (−log π_k))/T) and Ω_b is their mean soft size.
* **Temperature** T (default 1, as ConfTr and algorithms.md §1(d)) is in −log π units: a label is
  half in the set when its log-probability equals the threshold's and 1/(1+e) in one nat below.
  On the digits CNN the correlation above hardly moves for T in 0.1-1.
* **Cost.** One forward and one backward pass per batch for all groups; the backward computes
  activation gradients only, no weight gradients (examples/benchmarks/scoring_speed.py measures it
  in plain forward passes).
* A batch whose calibration half is too small for a finite threshold at ``alpha`` (fewer than
  2 · ⌈1/α − 1⌉ examples, 18 at α = 0.1) is skipped; only a short last batch can be.
* The per-group L2 normalisation keeps the scores of importance.json on one scale; the global
  selection in :mod:`~prunecp_cli.surgery.select` re-normalises each group anyway.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from prunecp_cli.conformal.quantile import min_calibration_size
from prunecp_cli.conformal.smooth import smooth_set_size_loss
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options
from prunecp_cli.surgery.gates import ChannelGates

AGGREGATES = ("example", "batch")


def smooth_size_taylor(ctx: ImportanceContext, *, alpha: float, temperature: float, dispersion: float,
                       aggregate: str = "example") -> dict[str, torch.Tensor]:
    """First-order Taylor magnitudes of Ω_s per group channel (before the per-group normalisation).

    With t_{n,f} = B_b · ∂Ω_b/∂g_{n,f} = B_b · Σ_hw ∂Ω_b/∂a_{n,f,h,w} · a_{n,f,h,w} for example n of
    batch b (B_b its size, g a per-example gate of ones), ``aggregate="example"`` returns
    (1/N) Σ_n |t_{n,f}| and ``aggregate="batch"`` returns |(1/N) Σ_n t_{n,f}|.

    Args:
        ctx: the importance context (its data give the batches, its seed the halves).
        alpha: miscoverage of the smooth threshold.
        temperature: T of the soft sets.
        dispersion: smooth-quantile width.
        aggregate: ``"example"`` or ``"batch"`` (see above and the module docstring).

    Returns:
        Non-negative float64 ``[C]`` per group, on the CPU.

    Raises:
        UsageError: no batch is large enough for a finite threshold at ``alpha``.
    """
    smallest = 2 * min_calibration_size(alpha)
    generator = torch.Generator().manual_seed(ctx.seed)
    totals = {g.name: torch.zeros(g.channels, dtype=torch.float64, device=ctx.device) for g in ctx.groups}
    count = torch.zeros((), dtype=torch.float64, device=ctx.device)
    with ChannelGates(ctx.model, ctx.groups) as gates:
        for batch in ctx.batches(description="cp-taylor"):
            size = batch.x.shape[0]
            if size < smallest:
                continue
            values = {g.name: gates.ones(g.name, batch=size, requires_grad=True, device=ctx.device)
                      for g in ctx.groups}
            with torch.enable_grad():
                omega = smooth_set_size_loss(ctx.model(batch.x), batch.y, alpha=alpha, temperature=temperature,
                                             dispersion=dispersion, nonconformity="logp", generator=generator)
                grads = torch.autograd.grad(omega, list(values.values()), allow_unused=True)
            for name, grad in zip(values, grads, strict=True):
                if grad is not None:
                    terms = grad.detach().double() * size  # [B, C]: t_{n,f}
                    totals[name] += terms.abs().sum(0) if aggregate == "example" else terms.sum(0)
            count += size
    count = ctx.reduce(count)
    if float(count) == 0:
        raise UsageError(
            f"cp-taylor needs batches of at least {smallest} examples for a finite threshold at alpha={alpha}; "
            "raise --batch-size (and give at least that many score examples) or raise alpha"
        )
    return {name: (ctx.reduce(total) / count).abs().cpu() for name, total in totals.items()}


class CPTaylorImportance(Importance):
    """|Σ a·∂Ω_s/∂a| per channel, L2-normalised per group (see module docstring)."""

    name = "cp-taylor"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        opts = method_options(ctx, self.name)
        alpha, temperature, dispersion = float(opts["alpha"]), float(opts["temperature"]), float(opts["dispersion"])
        if not (temperature > 0 and math.isfinite(temperature)):
            raise UsageError(f"--opt temperature={temperature} must be a positive number (1 is ConfTr's default)")
        if not dispersion >= 0:
            raise UsageError(f"--opt dispersion={dispersion} must be >= 0 (0 is the hard quantile)")
        aggregate = str(opts["aggregate"])
        if aggregate not in AGGREGATES:
            raise UsageError(f"--opt aggregate={aggregate}: use one of {', '.join(AGGREGATES)}")
        magnitudes = smooth_size_taylor(ctx, alpha=alpha, temperature=temperature, dispersion=dispersion,
                                        aggregate=aggregate)
        scores = {}
        for name, value in magnitudes.items():
            norm = value.norm()
            scores[name] = value / norm if norm > 0 else value
        return scores
