"""Conformal efficiency averaged over random calibration/evaluation re-splits, on cached logits.

cp-bruteforce measures, for every channel mask, the efficiency of a split-conformal predictor
recalibrated on the masked model. On one split of a few hundred points that figure is dominated by
the noise of the threshold q̂ and of the evaluation half (algorithms.md §1 step 3, [M]). The logits
of a mask are computed once, on all the score data; this module then draws R random splits of those
same points into a calibration part (``cal-fraction`` of them) and an evaluation part, recalibrates
LAC on each, and averages the efficiency over the R splits. Everything is vectorised over masks and
splits (one ``kthvalue`` for the R thresholds of M masks, one comparison for the sets).

Split 0 is the seeded split cp-bruteforce has always used (``numpy.random.default_rng(seed)``'s first
permutation of the rows), so ``resplits=1`` reproduces the single-split estimator exactly.

Measures (smaller = more efficient), each the mean over the splits:

* ``size``: mean set size at α; ``of``: observed fuzziness (Vovk et al. 2016); ``size-of``: their mean.
* ``soft-size``: the smooth set size at the recalibrated threshold, Σ_k σ((log π_k − log(1 − q̂)) / T),
  i.e. the LAC set {k : 1 − π_k ≤ q̂} with its indicator replaced by a sigmoid of the log-probability
  margin (T = ``temperature``, in log-probability units, as cp-taylor's). It moves with every logit,
  not only when a label crosses the threshold, so small effects are measured instead of rounded away.
"""

from __future__ import annotations

import numpy as np
import torch

from prunecp_cli.conformal.nonconformity import LAC
from prunecp_cli.conformal.quantile import conformal_rank, min_calibration_size
from prunecp_cli.errors import CalibrationError

MEASURES = ("size-of", "size", "of", "soft-size")
_CHUNK_ELEMENTS = 4_000_000  # masks × splits × points × classes per vectorised step (memory bound)


def split_masks(rows: np.ndarray, fraction: float, resplits: int, seed: int) -> torch.Tensor:
    """``[R, N]`` calibration membership of the N rows (in sorted order) for R random splits.

    Split r takes the first ``round(fraction·N)`` entries of the r-th permutation drawn from
    ``numpy.random.default_rng(seed)``; split 0 is therefore cp-bruteforce's historical seeded split.
    """
    rows = np.asarray(rows)
    ordered = np.sort(rows)
    count = round(fraction * len(rows))
    rng = np.random.default_rng(seed)
    member = np.zeros((resplits, len(rows)), dtype=bool)
    for r in range(resplits):
        member[r, np.searchsorted(ordered, rows[rng.permutation(len(rows))[:count]])] = True
    return torch.from_numpy(member)


def resplit_efficiency(logits: torch.Tensor, labels: torch.Tensor, calibration: torch.Tensor, *, alpha: float,
                       measure: str = "size-of", temperature: float = 0.1) -> torch.Tensor:
    """Efficiency of M masked models, each averaged over R calibration/evaluation splits.

    Args:
        logits: ``[M, N, K]`` logits of every mask on all N points.
        labels: ``[N]`` true labels.
        calibration: ``[R, N]`` bool, the calibration part of each split (the rest evaluates); every
            split has the same number of calibration points.
        alpha: miscoverage of the recalibrated LAC threshold.
        measure: one of :data:`MEASURES`.
        temperature: ``soft-size`` sigmoid temperature, in log-probability units.

    Returns:
        float64 ``[M]``.

    Raises:
        CalibrationError: too few calibration points for a finite threshold at ``alpha``.
    """
    copies, points, classes = logits.shape
    n = int(calibration[0].sum())
    k = conformal_rank(n, alpha)
    if k > n:
        raise CalibrationError(
            f"cp-bruteforce calibrates on {n} points, too few for a finite threshold at alpha={alpha} "
            f"(need {min_calibration_size(alpha)}); use more score data (--max-samples) or a larger alpha"
        )
    order = torch.argsort((~calibration).to(torch.int8), dim=1, stable=True)  # calibration points first
    cal_idx, eval_idx = order[:, :n], order[:, n:]
    labels = labels.long().cpu()
    false = torch.ones(points, classes, dtype=torch.bool).scatter_(1, labels[:, None], False)
    step = max(1, _CHUNK_ELEMENTS // max(1, len(calibration) * points * classes))
    out = [_chunk(logits[s : s + step], labels, false, cal_idx, eval_idx, k, measure, temperature)
           for s in range(0, copies, step)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _chunk(logits, labels, false, cal_idx, eval_idx, k, measure, temperature) -> torch.Tensor:
    copies, points, classes = logits.shape
    scores = LAC().all_scores(logits.reshape(-1, classes).double().cpu()).reshape(copies, points, classes)
    true = scores.gather(2, labels[None, :, None].expand(copies, -1, 1)).squeeze(2)  # [M, N]
    cal = true[:, cal_idx]  # [M, R, n]
    evals = scores[:, eval_idx]  # [M, R, m, K]
    m = evals.shape[2]
    qhat = torch.kthvalue(cal, k, dim=2).values  # [M, R]
    values = []
    if measure in ("size", "size-of"):
        values.append((evals <= qhat[..., None, None]).sum(dim=(2, 3)).double() / m)
    if measure in ("of", "size-of"):
        ordered = torch.sort(cal, dim=2).values.contiguous()
        at_least = cal.shape[2] - torch.searchsorted(ordered, evals.reshape(copies, len(cal_idx), -1).contiguous())
        mask = false[eval_idx].reshape(1, len(cal_idx), -1)
        values.append(((at_least + 1) * mask).sum(dim=2).double() / (m * (cal.shape[2] + 1)))
    if measure == "soft-size":
        log_probs = torch.log_softmax(logits.double().cpu(), dim=2)[:, eval_idx]  # [M, R, m, K]
        tau = torch.log1p(-qhat.clamp(max=1 - 1e-12))  # log(1 - q̂)
        values.append(torch.sigmoid((log_probs - tau[..., None, None]) / temperature).sum(dim=3).mean(dim=2))
    value = values[0] if len(values) == 1 else (values[0] + values[1]) / 2
    return value.mean(dim=1)
