"""Random importance: a baseline that any real method must beat."""

from __future__ import annotations

from typing import ClassVar

import torch

from prunecp_cli.importance.base import Importance, ImportanceContext, Needs


class RandomImportance(Importance):
    """Independent U(0, 1) scores, reproducible from ``--seed`` and the group names."""

    name = "random"
    needs: ClassVar[Needs] = Needs.NONE

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(ctx.seed)
        return {g.name: torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in ctx.groups}
