"""The base of every nonconformity score: :class:`Nonconformity`, and the shared softmax, ranking and label checks.

The conventions (float64 scores, ranks with ties broken by label index, one ``U`` per example for
randomised scores) are those stated in :mod:`prunecp_cli.conformal.nonconformity`, which re-exports
everything here.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import numpy as np
import torch

from prunecp_cli.errors import DataError, UsageError

__all__ = ["Nonconformity", "RandomizedScore", "label_ranks"]


def _probs(logits: torch.Tensor) -> torch.Tensor:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a 2-D float tensor [N, K], got {shape}")
    return torch.softmax(logits.to(torch.float64), dim=1)


def _sorted_order(probs: torch.Tensor) -> torch.Tensor:
    """Label indices per row, most probable first; equal probabilities keep label order."""
    return torch.sort(probs, dim=1, descending=True, stable=True).indices


def _check_labels(labels: torch.Tensor, n: int, k: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must be a 1-D tensor of length {n}, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise DataError(
            f"label {bad} is outside 0..{k - 1} for a model with {k} outputs; "
            "check that the data's labels match the model's classes"
        )
    return labels.to(torch.int64)


def label_ranks(logits: torch.Tensor) -> torch.Tensor:
    """1-based rank ``o(x, y)`` of every label when the softmax is sorted descending.

    Args:
        logits: Float tensor [N, K].

    Returns:
        Int64 tensor [N, K]; ``out[i, y]`` is 1 for the most probable label. Ties are broken by label
        index, lower index ranked first.
    """
    order = _sorted_order(_probs(logits))
    ranks = torch.arange(1, order.shape[1] + 1, device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ranks)


class Nonconformity(abc.ABC):
    """A nonconformity function ``s(x, y)`` computed from logits (larger = stranger).

    Subclasses set ``name`` and implement :meth:`all_scores`; :meth:`label_scores` is the same
    computation gathered at the given labels, so both agree exactly for the same generator state.
    """

    name: ClassVar[str]
    randomized: bool = False
    seed: int | None = None

    def parameters(self) -> dict[str, Any]:
        """JSON-serialisable parameters; ``from_parameters(self.name, self.parameters())`` rebuilds it."""
        return {}

    @abc.abstractmethod
    def all_scores(self, logits: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Score of every candidate label.

        Args:
            logits: Float tensor [N, K].
            generator: Source of ``U`` for randomised scores; ignored otherwise.

        Returns:
            Float64 tensor [N, K] on the logits' device.
        """

    def label_scores(
        self, logits: torch.Tensor, labels: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Score of the given label of each example (``all_scores`` gathered at ``labels``).

        Args:
            logits: Float tensor [N, K].
            labels: Integer tensor [N] with values in ``0..K-1``.
            generator: Source of ``U`` for randomised scores; the same state as for ``all_scores``
                gives the same ``U`` and so the same values.

        Returns:
            Float64 tensor [N] on the logits' device.

        Raises:
            DataError: A label lies outside ``0..K-1``.
        """
        scores = self.all_scores(logits, generator=generator)
        labels = _check_labels(labels, scores.shape[0], scores.shape[1]).to(scores.device)
        return scores.gather(1, labels.unsqueeze(1)).squeeze(1)

    def make_generator(self, *, stream: int = 0) -> torch.Generator:
        """A CPU generator derived from ``(seed, stream)`` for randomised scores.

        Args:
            stream: Non-negative stream number; use one per data set (e.g. 0 calibration, 1 test).

        Returns:
            A freshly seeded ``torch.Generator`` on the CPU.
        """
        seed = 0 if self.seed is None else self.seed
        state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self.parameters().items())
        return f"{type(self).__name__}({args})"


class RandomizedScore(Nonconformity):
    """A score with an optional random part ``U ~ Unif(0, 1)``, one per example (``U = 1`` when not randomised).

    Args:
        randomized: Draw ``U ~ Unif(0, 1)``, one per example, instead of ``U = 1``.
        seed: Seed of :meth:`make_generator`; used only when ``randomized`` (default 0 then).

    Raises:
        UsageError: ``seed`` is not a non-negative integer.
    """

    def __init__(self, *, randomized: bool = False, seed: int | None = None) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise UsageError(f"seed={seed!r} is not a non-negative integer; pass a seed such as 0")
        self.randomized = bool(randomized)
        self.seed = (0 if seed is None else seed) if self.randomized else None

    def parameters(self) -> dict[str, Any]:
        params: dict[str, Any] = {"randomized": self.randomized}
        if self.randomized:
            params["seed"] = self.seed
        return params

    def _uniforms(
        self, n: int, device: torch.device, generator: torch.Generator | None
    ) -> torch.Tensor | float:
        if not self.randomized:
            return 1.0
        if generator is None:
            generator = self.make_generator(stream=0)
        u = torch.rand(n, dtype=torch.float64, generator=generator, device=generator.device)
        return u.to(device).unsqueeze(1)
