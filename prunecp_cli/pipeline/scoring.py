"""``score``: rank every channel of every prunable group with a registered importance method."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from prunecp_cli import dist
from prunecp_cli import importance as registry
from prunecp_cli.errors import ScoresError
from prunecp_cli.importance.base import ImportanceContext, Needs
from prunecp_cli.options import DataSource, ModelSource, RunOptions
from prunecp_cli.pipeline.session import Session, open_source
from prunecp_cli.runtime import Reporter, seed_everything
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.types import GroupImportance, ImportanceTable


def compute_importance(
    session: Session,
    graph: ModelGraph,
    *,
    method: str,
    options: dict[str, Any],
    batch_size: int,
    seed: int,
    max_samples: int | None,
    reporter: Reporter,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[float]]]]:
    """Run ``method`` on ``graph``'s groups; return scores and per-group extras.

    Raises:
        UsageError: the method needs data or labels that were not given.
        ScoresError: the method produced scores of the wrong shape or non-finite values.
    """
    implementation = registry.create(method)
    needs = getattr(implementation, "needs", Needs.DATA)
    if needs & Needs.DATA or needs & Needs.LABELS:
        data = session.data
        if data is None:
            from prunecp_cli.errors import UsageError

            raise UsageError(f"{{method}} {method} needs data: pass {{data}} with the score split", arguments={"method": "method", "data": "data"})
        if needs & Needs.LABELS:
            data.require_labels(session.num_classes)
    seed_everything(seed)
    model = session.model.to(session.device)
    ctx = ImportanceContext(
        model=model,
        graph=graph,
        data=session.data,
        device=session.device,
        batch_size=batch_size,
        seed=seed,
        max_samples=max_samples,
        options=options,
        reporter=reporter,
        reduce=dist.all_reduce_sum,
        shard=dist.shard_dataset,
    )
    scores = implementation(ctx)
    model.cpu()
    for group in graph.groups:
        value = scores.get(group.name)
        if value is None or value.numel() != group.channels:
            raise ScoresError(f"method {method} returned no or mis-sized scores for group {group.name} (a bug)")
        if not torch.isfinite(value).all():
            raise ScoresError(
                f"method {method} produced non-finite scores for group {group.name}; "
                "check the data for extreme values or pick another method"
            )
    return {g.name: scores[g.name].double().cpu() for g in graph.groups}, ctx.extras


MIN_RELIABLE_EXAMPLES = 32
"""Fewer examples than this make BatchNorm statistics and data-driven scores unreliable."""


def few_examples_warnings(count: int, purpose: str) -> list[str]:
    """A warning when ``purpose`` (e.g. "BatchNorm recalibration") runs on fewer than 32 examples."""
    if count >= MIN_RELIABLE_EXAMPLES:
        return []
    return [f"{purpose} uses only {count} example(s); with fewer than {MIN_RELIABLE_EXAMPLES} its statistics are "
            "unreliable and can cost much accuracy: pass more --data"]


def scoring_data_warnings(session: Session, method: str, needs_data: bool, max_samples: int | None) -> list[str]:
    """The few-examples warning for a data-driven ``method`` on the session's data."""
    if not needs_data or session.data is None:
        return []
    count = len(session.data) if max_samples is None else min(len(session.data), max_samples)
    return few_examples_warnings(count, f"--method {method}")


def degenerate_warnings(scores: dict[str, torch.Tensor]) -> list[str]:
    """Warnings for groups whose scores carry no ranking information (all equal)."""
    flat = [name for name, value in scores.items() if value.numel() > 1 and bool((value == value[0]).all())]
    if not flat:
        return []
    shown = ", ".join(flat[:5]) + (f" and {len(flat) - 5} more" if len(flat) > 5 else "")
    return [
        f"importance is constant in {len(flat)} group(s) ({shown}): they carry no ranking and channels "
        "are removed by index; check the method (e.g. untrained BatchNorm scales) or use another"
    ]


def score(
    model: str | Path | ModelSource,
    data: str | Path | DataSource | None = None,
    *,
    method: str,
    options: dict[str, Any] | None = None,
    ignore: tuple[str, ...] = (),
    run: RunOptions = RunOptions(),
) -> ImportanceTable:
    """Score every channel of every prunable group of a model.

    Args:
        model: the model (a path: a prunecp file, or a dense checkpoint with ``ModelSource.arch``).
        data: the score split (needed by data-driven methods; ``max_samples`` caps the examples used).
        method: registry name (see ``prunecp score --help``).
        options: method options (``{name: value}``), defaults from the registry.
        ignore: layers whose groups are not scored (the classifier is always kept).
        run: device, batch size (default 128), seed and reporter.

    Returns:
        The importance table (what ``importance.json`` holds).
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    batch_size, seed, reporter = run.batch(128), run.seed, run.rep
    max_samples = data.max_samples if data is not None else None
    info = registry.info(method)
    options = {**{k: d for k, (d, _) in info.options.items()}, **(options or {})}
    session = open_source(model, data, device=run.device)
    graph = ModelGraph(session.model, session.example, ignore=ignore)
    scores, extras = compute_importance(session, graph, method=method, options=options, batch_size=batch_size,
                                        seed=seed, max_samples=max_samples, reporter=reporter)
    warnings = scoring_data_warnings(session, method, info.needs_data, max_samples) + degenerate_warnings(scores)
    for message in warnings:
        reporter.warn(message)
    groups = [
        GroupImportance(g.name, g.modules, g.channels, scores[g.name].tolist(), extras.get(g.name, {}))
        for g in graph.groups
    ]
    return ImportanceTable(
        method=method,
        params={**options, "seed": seed, "max_samples": max_samples, "ignore": list(ignore),
                "batch_size": batch_size},
        model_sha256=session.loaded.sha256,
        data_sha256=session.data.sha256 if session.data is not None and info.needs_data else None,
        groups=groups,
        input_shape=session.input_shape,
        warnings=warnings,
    )


def read_importance(path: str | Path) -> ImportanceTable:
    """Read and validate an ``importance.json`` file.

    Raises:
        ScoresError: missing, not JSON, or malformed.
    """
    path = Path(path)
    if not path.is_file():
        raise ScoresError(f"scores file {path} does not exist or is not a file; run prunecp score first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScoresError(f"scores file {path} cannot be read ({exc.strerror or type(exc).__name__}); check its "
                          "permissions") from None
    except json.JSONDecodeError as exc:
        raise ScoresError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); pass a file written by "
                          "prunecp score") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # not text, or nested/sized beyond parsing
        raise ScoresError(f"{path} is not a JSON file prunecp can read ({type(exc).__name__}); pass a file "
                          "written by prunecp score") from None
    return ImportanceTable.from_json(obj, path=path)


def scores_for_graph(table: ImportanceTable, graph: ModelGraph, *, model_sha256: str,
                     path: str | Path) -> dict[str, torch.Tensor]:
    """Match an importance table to a model's groups.

    Raises:
        ScoresError: the table belongs to another model, or misses or mis-sizes a group.
    """
    if table.model_sha256 != model_sha256:
        raise ScoresError(
            f"{path} scores another model (sha256 {table.model_sha256[:12]}…, this one is {model_sha256[:12]}…); "
            "re-run prunecp score on this checkpoint"
        )
    by_name = {g.name: g for g in table.groups}
    scores = {}
    for group in graph.groups:
        entry = by_name.get(group.name)
        if entry is None:
            raise ScoresError(f"{path} has no scores for group {group.name}; re-run score with the same --ignore")
        if entry.channels != group.channels:
            raise ScoresError(f"{path}: group {group.name} has {entry.channels} channels there, {group.channels} here")
        scores[group.name] = torch.tensor(entry.importance, dtype=torch.float64)
    return scores
