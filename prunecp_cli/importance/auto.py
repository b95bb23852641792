"""``--method auto``: score with several methods, so that ``prune`` can keep the best pruning.

No single ranking wins everywhere: which method gives the smallest conformal sets depends on the
model and the budget. ``auto`` therefore scores the channels with every candidate method (default
``l1``, ``taylor``, ``cp-taylor``, each with its registry defaults) and leaves the choice to ``prune``,
which knows the target: it prunes a copy of the model with each candidate's ranking, re-estimates
BatchNorm, and keeps the one with the smallest mean LAC set size on a held-out part of the score
data (:mod:`prunecp_cli.pipeline.auto`).

The score data are split once, at random with the run's seed, into a *fit* part (``1 − holdout``:
the candidates are scored and the candidates' BatchNorm statistics re-estimated on it) and a
*holdout* part (only the set sizes are measured on it), so the choice is not judged on the examples
that made the rankings. The calibration split is never touched: prune only ever reads the score
data, and its disjointness records are those of any data-driven method.

The importance a table of ``auto`` carries is its first candidate's (so the file stays a valid
ranking); every candidate's scores are kept per group as the extra ``auto:<method>``, and
``prune --scores`` with such a table re-runs the choice on the same ``--data``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import numpy as np
import torch

from prunecp_cli import importance as registry
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.base import Importance, ImportanceContext, Needs, method_options

PREFIX = "auto:"
"""Extras key prefix of a candidate's scores in an importance table."""
MIN_HOLDOUT = 40
"""Fewest held-out examples the choice is measured on (two halves of 20 at α = 0.1)."""


def candidates(text: str) -> list[str]:
    """The candidate methods of an ``auto`` run, from ``"l1,taylor,cp-taylor"``.

    Raises:
        UsageError: an unknown method, ``auto`` itself, a repeat, or none.
    """
    names = [n.strip() for n in str(text).split(",") if n.strip()]
    if not names:
        raise UsageError("--opt candidates: name at least one method, e.g. candidates=l1,taylor")
    for name in names:
        if name == "auto":
            raise UsageError("--opt candidates: auto cannot be its own candidate")
        registry.info(name)  # raises for an unknown method
    if len(set(names)) != len(names):
        raise UsageError(f"--opt candidates={text}: a method is named twice")
    return names


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices of the fit and holdout parts of ``n`` score examples.

    Raises:
        UsageError: ``holdout`` outside (0, 1), or a part too small to use.
    """
    if not 0.0 < holdout < 1.0:
        raise UsageError(f"--opt holdout={holdout}: give a fraction in (0, 1)")
    order = np.random.default_rng(seed).permutation(n)
    count = int(round(holdout * n))
    if count < MIN_HOLDOUT or n - count < 1:
        raise UsageError(f"--method auto holds out {count} of {n} score examples to compare the candidates, fewer "
                         f"than {MIN_HOLDOUT}: pass more --data or raise --opt holdout")
    return np.sort(order[count:]), np.sort(order[:count])


class AutoImportance(Importance):
    """Every candidate's scores on the fit part of the score data (see the module docstring)."""

    name = "auto"
    needs: ClassVar[Needs] = Needs.DATA | Needs.LABELS

    def __call__(self, ctx: ImportanceContext) -> dict[str, torch.Tensor]:
        options = method_options(ctx, self.name)
        names = candidates(options["candidates"])
        if ctx.data is None:
            ctx.dataset()  # raises the needs-data error
        fit, _ = split(len(ctx.data), options["holdout"], ctx.seed)
        fit_data = ctx.data.subset(fit)
        results = {}
        for name in names:
            sub = replace(ctx, data=fit_data, options=registry.parse_options(name, None), extras={})
            with ctx.reporter.status(f"auto: scoring with {name}"):
                results[name] = {k: v.double().cpu() for k, v in registry.create(name)(sub).items()}
        for group in ctx.groups:
            ctx.extras[group.name] = {PREFIX + name: results[name][group.name].tolist() for name in names}
        return results[names[0]]
