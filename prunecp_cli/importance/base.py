"""The interface every importance method implements, and what the pipeline hands it.

An importance method is a class with a ``name``, a ``needs`` flag set and a ``__call__(ctx)`` that
returns one 1-D tensor per prunable group: one score per channel, **higher = more important**.
Methods may also return extra per-channel statistics (e.g. a standard error) through
``ctx.extras``. The pipeline prepares only what ``needs`` declares (data, labels).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from prunecp_cli import importance as registry
from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import Batch, Dataset
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.groups import ModelGraph


class Needs(enum.Flag):
    """What an importance method needs besides the model."""

    NONE = 0
    DATA = enum.auto()
    LABELS = enum.auto()


@dataclass
class ImportanceContext:
    """Everything an importance method may use.

    Attributes:
        model: the model, in eval mode, on ``device``.
        graph: its dependency graph and prunable groups.
        data: the score split (None for data-free methods).
        device: where to compute.
        batch_size: examples per forward pass.
        seed: seed for any randomness.
        max_samples: use at most this many examples (a seeded random subset), None for all.
        options: method options (already validated and typed by the registry).
        reporter: progress bars and messages.
        extras: per-group extra arrays a method wants written to importance.json.
        reduce: sums a tensor over distributed ranks (identity otherwise).
        shard: data rows this rank handles (all rows when not distributed).
    """

    model: nn.Module
    graph: ModelGraph
    data: Dataset | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 128
    seed: int = 0
    max_samples: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    reporter: Reporter = field(default_factory=lambda: SILENT)
    extras: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    reduce: Any = None
    shard: Any = None

    def __post_init__(self) -> None:
        if self.reduce is None:
            self.reduce = lambda t: t

    @property
    def groups(self):
        """The prunable groups."""
        return self.graph.groups

    def dataset(self) -> Dataset:
        """The score data after ``max_samples`` (and, when distributed, this rank's shard).

        Raises:
            UsageError: the method needs data but none was given.
        """
        if self.data is None:
            raise UsageError("this importance method needs data: pass --data with the score split")
        data = self.data
        if self.max_samples is not None and self.max_samples < len(data):
            rng = np.random.default_rng(self.seed)
            data = data.subset(np.sort(rng.choice(len(data), self.max_samples, replace=False)))
        if self.shard is not None:
            data = self.shard(data)
        return data

    def batches(self, *, description: str = "") -> Iterator[Batch]:
        """Batches of :meth:`dataset` on the device, with a progress bar."""
        data = self.dataset()
        total = -(-len(data) // self.batch_size)
        yield from self.reporter.track(
            data.batches(self.batch_size, device=self.device), total=total, description=description
        )


class Importance:
    """Base class of importance methods (subclass it, or follow the same shape).

    Attributes:
        name: the registry name.
        needs: what the method needs besides the model.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[Needs] = Needs.NONE

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        """One score per channel of every group of ``ctx.graph`` (higher = more important)."""
        raise NotImplementedError


def method_options(ctx: ImportanceContext, name: str) -> dict[str, Any]:
    """``ctx.options`` over the registry defaults of method ``name`` (for direct, registry-free calls)."""
    return {**{key: default for key, (default, _) in registry.info(name).options.items()}, **ctx.options}


def ascending_positions(values: torch.Tensor) -> torch.Tensor:
    """Position of each entry in ascending order (stable: ties by index), as a float64 in [0, 1)."""
    order = torch.sort(values.double(), stable=True).indices
    out = torch.empty(len(values), dtype=torch.float64)
    out[order] = torch.arange(len(values), dtype=torch.float64) / max(len(values), 1)
    return out
