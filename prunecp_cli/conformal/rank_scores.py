"""Top-K, SAPS and Margin nonconformity scores (the conventions of :mod:`prunecp_cli.conformal.nonconformity`).

``o(x, y)`` is the 1-based rank of ``y`` with the softmax sorted descending (ties: lower label index
first) and ``U`` the per-example uniform of randomised scores (``U = 1`` when not randomised, as for
APS), shared by all labels of an example so that sets stay nested in ``qhat``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from prunecp_cli.conformal.nonconformity_base import Nonconformity, RandomizedScore, _probs, label_ranks
from prunecp_cli.errors import UsageError

__all__ = ["SAPS", "Margin", "TopK"]


class TopK(RandomizedScore):
    """Top-K: the rank of the label, ``s(x, y) = o(x, y) - 1 + U``.

    Angelopoulos, Bates, Malik & Jordan, "Uncertainty Sets for Image Classifiers using Conformal
    Prediction", ICLR 2021 (https://arxiv.org/abs/2009.14193), the "Top-K" baseline; as TorchCP's
    ``TOPK``. Not randomised (``U = 1``) the score is the rank itself and a set holds the ``floor(qhat)``
    most probable labels, the same size for every input; randomised it breaks the ties between inputs
    so that coverage is close to exact.

    Args:
        randomized: Draw ``U ~ Unif(0, 1)`` per example instead of ``U = 1``.
        seed: Seed of :meth:`make_generator`; used only when ``randomized``.
    """

    name = "topk"

    def all_scores(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        ranks = label_ranks(logits).to(torch.float64)
        return ranks - 1.0 + self._uniforms(ranks.shape[0], ranks.device, generator)


class SAPS(RandomizedScore):
    """Sorted adaptive prediction sets: the top probability plus a fixed weight per further rank.

    Huang, Xi, Zhang, Yuan, Xu & Wei, "Conformal Prediction for Deep Classifier via Label Ranking",
    ICML 2024 (arXiv:2310.06430, 2023), Eq. (5):

    ``s(x, y) = U * pi_max(x)`` when ``o(x, y) = 1``, else ``pi_max(x) + (o(x, y) - 2 + U) * weight``,

    so only the largest probability is used and the ranks below it cost ``weight`` (the paper's
    ``lambda``) each. The paper's score is randomised (``randomized=True``); not randomised ``U = 1``:
    ``pi_max`` for the top label and ``pi_max + (o - 1) * weight`` below it, a deterministic score.

    Args:
        weight: The ranking weight ``lambda``; finite and > 0 (the paper tunes it in 0.02 … 0.6).
        randomized: Draw ``U ~ Unif(0, 1)`` per example instead of ``U = 1``.
        seed: Seed of :meth:`make_generator`; used only when ``randomized``.

    Raises:
        UsageError: ``weight`` is not a positive finite number.
    """

    name = "saps"

    def __init__(self, *, weight: float = 0.2, randomized: bool = False, seed: int | None = None) -> None:
        super().__init__(randomized=randomized, seed=seed)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
            raise UsageError(f"weight={weight!r} must be a finite number > 0; the SAPS paper uses 0.02 to 0.6")
        self.weight = float(weight)

    def parameters(self) -> dict[str, Any]:
        return {**super().parameters(), "weight": self.weight}

    def all_scores(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = _probs(logits)
        ranks = label_ranks(logits).to(torch.float64)
        top = probs.max(dim=1, keepdim=True).values
        u = self._uniforms(probs.shape[0], probs.device, generator)
        below = top + (ranks - 2.0 + u) * self.weight
        return torch.where(ranks == 1.0, u * top, below)


class Margin(Nonconformity):
    """Margin: ``s(x, y) = max_{y' != y} pi_{y'}(x) - pi_y(x)``, in ``[-1, 1]``.

    Löfström, Boström, Linusson & Johansson, "Bias reduction through conditional conformal
    prediction", Intelligent Data Analysis 19(6), 2015; as TorchCP's ``Margin``. For the top label it
    is minus its lead over the runner-up, for the others the gap to the top probability.
    """

    name = "margin"

    def all_scores(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        probs = _probs(logits)
        if probs.shape[1] < 2:
            raise ValueError("the margin score needs at least 2 classes")
        two = torch.topk(probs, 2, dim=1)
        is_top = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, two.indices[:, :1], True)
        other = torch.where(is_top, two.values[:, 1:2], two.values[:, :1])
        return other - probs
