"""Plain result types returned by the Python API (no torch import, JSON round-trips).

``importance.json`` (design.md §4) is :class:`ImportanceTable` serialised with :meth:`to_json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prunecp_cli.errors import ScoresError

IMPORTANCE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GroupImportance:
    """Scores of one prunable group.

    Attributes:
        name: the group's root convolution.
        modules: every layer in the group.
        channels: number of channels.
        importance: one score per channel, higher = more important.
        extras: optional per-channel statistics (e.g. ``std_error``), same length as ``importance``.
    """

    name: str
    modules: list[str]
    channels: int
    importance: list[float]
    extras: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ImportanceTable:
    """The content of ``importance.json``.

    Attributes:
        method: importance method name.
        params: the method's options and the run settings that shaped the scores.
        model_sha256: hash of the checkpoint that was scored.
        data_sha256: hash of the score data (None for data-free methods).
        groups: scores per group.
        input_shape: example input shape used for tracing.
        warnings: degenerate scores and ties found.
    """

    method: str
    params: dict[str, Any]
    model_sha256: str
    data_sha256: str | None
    groups: list[GroupImportance]
    input_shape: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    schema_version: int = IMPORTANCE_SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict (design.md §4)."""
        out = asdict(self)
        for group in out["groups"]:
            extras = group.pop("extras")
            group.update(extras)
        return out

    @classmethod
    def from_json(cls, obj: Any, *, path: Path | str = "importance.json") -> ImportanceTable:
        """Validate and parse an ``importance.json`` object.

        Raises:
            ScoresError: wrong schema, missing fields, or scores that are not finite numbers.
        """
        if not isinstance(obj, dict):
            raise ScoresError(f"{path} is not a JSON object; pass a file written by prunecp score")
        version = obj.get("schema_version")
        if version != IMPORTANCE_SCHEMA_VERSION:
            raise ScoresError(
                f"{path}: schema_version {version!r} is not supported (expected {IMPORTANCE_SCHEMA_VERSION}); "
                "re-run prunecp score"
            )
        for key in ("method", "params", "model_sha256", "groups"):
            if key not in obj:
                raise ScoresError(f"{path} lacks the field {key!r}; re-run prunecp score")
        groups = []
        for i, raw in enumerate(obj["groups"]):
            try:
                name, modules, channels, scores = raw["name"], raw["modules"], int(raw["channels"]), raw["importance"]
            except (KeyError, TypeError, ValueError):
                raise ScoresError(f"{path}: group {i} lacks name, modules, channels or importance") from None
            if not isinstance(scores, list) or len(scores) != channels:
                raise ScoresError(f"{path}: group {name} has {channels} channels but {len(scores)} scores")
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in scores):
                raise ScoresError(f"{path}: group {name} has a score that is not a finite number")
            extras = {k: v for k, v in raw.items() if k not in ("name", "modules", "channels", "importance")}
            groups.append(GroupImportance(name, list(modules), channels, [float(v) for v in scores], extras))
        return cls(
            method=str(obj["method"]),
            params=dict(obj["params"]),
            model_sha256=str(obj["model_sha256"]),
            data_sha256=obj.get("data_sha256"),
            groups=groups,
            input_shape=list(obj.get("input_shape", [])),
            warnings=list(obj.get("warnings", [])),
        )


@dataclass(frozen=True)
class UsedData:
    """A data file a model has seen (for the calibration-disjointness check).

    Attributes:
        sha256: hash of the file or folder.
        role: ``score``, ``bn-recalibration``, ``fine-tune``, ``risk`` ...
        file: the file name, for messages.
    """

    sha256: str
    role: str
    file: str


@dataclass(frozen=True)
class PruneResult:
    """What ``prune`` did.

    Attributes:
        output: the written model file.
        sha256: its hash.
        params_before: parameters of the input model.
        params_after: parameters of the pruned model.
        flops_before: FLOPs of the input model (fvcore, 1 multiply-add = 1 FLOP).
        flops_after: FLOPs of the pruned model.
        channels: per group ``(before, after)`` channel counts.
        warnings: ties, degenerate scores, and other things worth reading.
        extra: method-specific results (e.g. risk control).
    """

    output: str
    sha256: str
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    channels: dict[str, tuple[int, int]]
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops_ratio(self) -> float:
        """Fraction of FLOPs kept."""
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        """Fraction of parameters kept."""
        return self.params_after / self.params_before if self.params_before else 1.0
