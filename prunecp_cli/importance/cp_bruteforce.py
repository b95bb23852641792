"""Brute-force conformal-efficiency importance (``cp-bruteforce``).

The importance of channel f of a group is how much less efficient a split-conformal predictor on
top of the network becomes when f is silenced (Zhao, Farjudian & Bellotti, Neurocomputing 611,
128704, 2025; algorithms.md §1 steps 1-3)::

    c_f = E(θ with channel f zeroed) − E(θ)        (larger = more important)

* **Channel zeroed** after its normalisation layer, for every member of the coupled group at once
  (:class:`~prunecp_cli.surgery.gates.ChannelGates`), which equals removing it in eval mode.
* **Data.** The score split (after ``--max-samples``) is split at random by ``--seed`` into a
  calibration part (``cal-fraction``, default one half) and an evaluation part. For *every* mask the
  LAC threshold q̂ = the k-th smallest calibration nonconformity 1 − π_y(x), k = ⌈(n+1)(1−α)⌉, is
  recomputed, so c_f measures the efficiency of the *recalibrated* predictor, as after pruning.
* **Efficiency E** on the evaluation part (option ``measure``, smaller = more efficient):

  - ``size-of`` (default, algorithms.md §1 step 2): the average of the mean set size at α and the
    observed fuzziness (OF, Vovk et al. 2016: mean over points of the sum of the false labels'
    conformal p-values). Both are step functions of the logits, but OF moves whenever any false
    label's score crosses any calibration score, so it breaks the many ties of the set size
    (which, at α = 0.1 on an accurate model, is mostly 0 or 1 per point).
  - ``size``: the mean set size alone; ``of``: the observed fuzziness alone.

**Cost and exactness.** Every channel needs a forward pass over the data. They come from
:class:`~prunecp_cli.surgery.masked.MaskedEvaluator`: per batch the clean model runs once and, per
group, only the layers after the group run, for the C masks with one channel off, a few masks per
pass (``max-rows``). Layers whose masked value is the clean value times the mask are not re-run,
and the first dense convolution after the group costs one grouped convolution per batch instead of
one per mask (its output with channel f off is the clean output minus channel f's term). The
result equals a plain loop that re-runs the whole model once per channel (tested to 1e-5; the
convolution terms differ from a direct convolution by float rounding only, about 1e-7 relative).
On the ResNet-style benchmark model this measured 3.4× faster than that loop
(``examples/benchmarks/scoring_speed.py``).

**Memory.** The float32 logits of the evaluation part are kept for every mask until all batches
are seen (the threshold needs every calibration point first): 4·(Σ_g (C_g + 1))·N_eval·K bytes plus
the calibration part's true-label scores. Above ``max-memory-gb`` (default 2) the method stops
before computing and names a ``--max-samples`` that fits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import ClassVar

import numpy as np
import torch

from prunecp_cli import dist
from prunecp_cli.conformal.nonconformity import LAC
from prunecp_cli.conformal.quantile import conformal_rank, min_calibration_size
from prunecp_cli.errors import CalibrationError, UsageError
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options
from prunecp_cli.surgery.masked import MaskedEvaluator

MEASURES = ("size-of", "size", "of")


def efficiency(cal_scores: torch.Tensor, eval_scores: torch.Tensor, eval_labels: torch.Tensor, *,
               alpha: float, measure: str = "size-of") -> torch.Tensor:
    """Efficiency E of a split-conformal predictor, for M predictors at once (smaller = more efficient).

    Args:
        cal_scores: ``[M, n]`` calibration nonconformities at the true labels (one row per predictor).
        eval_scores: ``[M, m, K]`` nonconformities of every label on the evaluation points.
        eval_labels: ``[m]`` true labels of the evaluation points.
        alpha: target miscoverage of the threshold.
        measure: ``size-of`` (mean of set size and observed fuzziness), ``size`` or ``of``.

    Returns:
        float64 ``[M]``.

    Raises:
        CalibrationError: ``n`` is too small for a finite threshold at ``alpha``.
    """
    cal = cal_scores.double()
    scores = eval_scores.double()
    copies, n = cal.shape
    m = scores.shape[1]
    k = conformal_rank(n, alpha)
    if k > n:
        raise CalibrationError(
            f"cp-bruteforce calibrates on {n} points, too few for a finite threshold at alpha={alpha} "
            f"(need {min_calibration_size(alpha)}); use more score data (--max-samples) or a larger alpha"
        )
    ordered = torch.sort(cal, dim=1).values.contiguous()
    qhat = ordered[:, k - 1]
    size = (scores <= qhat[:, None, None]).sum(dim=(1, 2)).double() / m
    if measure == "size":
        return size
    # OF = mean_x Σ_{y≠y_x} (#{i : s_i ≥ s(x, y)} + 1) / (n + 1), exact integer counts
    at_least = n - torch.searchsorted(ordered, scores.reshape(copies, -1).contiguous(), side="left")
    false = torch.ones(m, scores.shape[2], dtype=torch.bool).scatter_(1, eval_labels.long().cpu()[:, None], False)
    totals = ((at_least + 1) * false.reshape(1, -1).to(at_least.device)).sum(dim=1)
    fuzziness = totals.double() / (m * (n + 1))
    return fuzziness if measure == "of" else (size + fuzziness) / 2


def calibration_rows(ctx: ImportanceContext, fraction: float) -> torch.Tensor:
    """Data rows of the internal calibration part: a ``ctx.seed`` random ``fraction`` of the used rows.

    Taken over all ranks' rows (before sharding), so every rank splits the same way.
    """
    rows = dataclasses.replace(ctx, shard=None).dataset().rows
    chosen = np.random.default_rng(ctx.seed).permutation(len(rows))[: round(fraction * len(rows))]
    return torch.from_numpy(np.sort(rows[chosen]))


class CPBruteForceImportance(Importance):
    """Change of conformal efficiency when each channel is zeroed, exactly (see module docstring)."""

    name = "cp-bruteforce"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        opts = method_options(ctx, self.name)
        alpha, measure = float(opts["alpha"]), str(opts["measure"])
        if measure not in MEASURES:
            raise UsageError(f"--opt measure={measure}: use one of {', '.join(MEASURES)}")
        fraction = float(opts["cal-fraction"])
        if not 0.0 < fraction < 1.0:
            raise UsageError(f"--opt cal-fraction={fraction} must lie in (0, 1)")
        data = ctx.dataset()
        cal_rows = calibration_rows(ctx, fraction)
        _check_size(ctx, len(cal_rows), alpha, float(opts["max-memory-gb"]))
        store = {g.name: _Store() for g in ctx.groups}
        channels = sum(g.channels for g in ctx.groups)
        batches = -(-len(data) // ctx.batch_size)
        work = self._collect(ctx, data, cal_rows, store, int(opts["max-rows"]))
        description = f"cp-bruteforce: {channels} channels × {batches} batch(es)"
        for _ in ctx.reporter.track(work, total=channels * batches, description=description):
            pass
        scores = {}
        for group in ctx.groups:
            cal, evals, labels = store[group.name].gathered()
            value = efficiency(cal, LAC().all_scores(evals.reshape(-1, evals.shape[-1])).reshape(*evals.shape),
                               labels, alpha=alpha, measure=measure)
            scores[group.name] = (value[1:] - value[0]).cpu()
        return scores

    @staticmethod
    @torch.no_grad()
    def _collect(ctx: ImportanceContext, data, cal_rows: torch.Tensor, store: dict[str, _Store],
                 max_rows: int) -> Iterator[None]:
        """Fill ``store`` batch by batch; yields once per channel evaluated (for the progress bar)."""
        with MaskedEvaluator(ctx.model, ctx.groups, max_rows=max_rows) as ev:
            for batch in data.batches(ctx.batch_size, device=ctx.device):
                clean = ev.prepare(batch.x).float()[None]  # mask 0: no channel off
                is_cal = torch.isin(batch.index, cal_rows).to(batch.x.device)
                labels = batch.y.to(batch.x.device)
                for group in ctx.groups:
                    masks = 1 - torch.eye(group.channels)  # mask f + 1: channel f off
                    logits = torch.cat([clean, ev.evaluate(group.name, masks).float()])  # [C + 1, B, K]
                    store[group.name].add(logits, labels, batch.index, is_cal)
                    yield from (None for _ in range(group.channels))


@dataclasses.dataclass
class _Store:
    """Per-group record of what the efficiency needs, batch by batch."""

    cal: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [M, b] true-label LAC scores
    cal_index: list[torch.Tensor] = dataclasses.field(default_factory=list)
    evals: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [M, b, K] float32 logits
    eval_labels: list[torch.Tensor] = dataclasses.field(default_factory=list)
    eval_index: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, is_cal: torch.Tensor) -> None:
        copies, batch, classes = logits.shape
        if bool(is_cal.any()):
            cal_logits = logits[:, is_cal].reshape(-1, classes)
            cal_labels = labels[is_cal].repeat(copies)
            self.cal.append(LAC().label_scores(cal_logits, cal_labels).reshape(copies, -1).cpu())
            self.cal_index.append(index[is_cal.cpu()])
        if bool((~is_cal).any()):
            self.evals.append(logits[:, ~is_cal].cpu())
            self.eval_labels.append(labels[~is_cal].cpu())
            self.eval_index.append(index[(~is_cal).cpu()])

    def gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cal [M, n], eval logits [M, m, K], eval labels [m])`` over all batches and ranks."""
        cal = dist.gather_rows(torch.cat(self.cal, dim=1).T.contiguous(), torch.cat(self.cal_index)).T
        evals = dist.gather_rows(torch.cat(self.evals, dim=1).transpose(0, 1).contiguous(),
                                 torch.cat(self.eval_index)).transpose(0, 1)
        labels = dist.gather_rows(torch.cat(self.eval_labels), torch.cat(self.eval_index))
        return cal, evals, labels


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
    masks = sum(g.channels + 1 for g in ctx.groups)
    per_example = masks * 4 * classes  # float32 logits of an evaluation point, every mask
    need = per_example * (total - n_cal) + masks * 8 * n_cal
    if need > max_gb * 2**30:
        fits = math.floor(max_gb * 2**30 / (per_example + masks * 8))
        raise UsageError(
            f"cp-bruteforce would keep {need / 2**30:.1f} GiB of logits ({masks} masks × {total} examples × "
            f"{classes} classes); pass --max-samples {max(fits, 2 * min_calibration_size(alpha))} or raise "
            "--opt max-memory-gb"
        )
