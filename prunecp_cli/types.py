"""Plain result types returned by the Python API (no torch import, JSON round-trips).

``importance.json`` (design.md §4) is :class:`ImportanceTable` serialised with :meth:`to_json`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from prunecp_cli.checks import is_finite_number, is_int
from prunecp_cli.errors import ScoresError
from prunecp_cli.io.metadata import MAX_INPUT_DIMS, MAX_INPUT_ELEMENTS

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

        Every field is checked for type and range before it is used, so a damaged or hand-edited file
        gives one :class:`ScoresError` naming the field.

        Raises:
            ScoresError: wrong schema, missing fields, fields of the wrong type, or scores that are
                not finite numbers.
        """
        if not isinstance(obj, dict):
            raise ScoresError(f"{path} is not a JSON object; pass a file written by prunecp score")
        version = obj.get("schema_version")
        if version != IMPORTANCE_SCHEMA_VERSION or isinstance(version, bool):
            raise ScoresError(
                f"{path}: schema_version {_short(version)} is not supported (expected {IMPORTANCE_SCHEMA_VERSION}); "
                "re-run prunecp score"
            )
        for key in ("method", "params", "model_sha256", "groups"):
            if key not in obj:
                raise ScoresError(f"{path} lacks the field {key!r}; re-run prunecp score")

        def bad(field_name: str, problem: str) -> ScoresError:
            return ScoresError(f"{path}: field {field_name!r} {problem}; re-run prunecp score")

        if not isinstance(obj["method"], str) or not obj["method"]:
            raise bad("method", "must be a non-empty string")
        if not isinstance(obj["params"], dict):
            raise bad("params", "must be a JSON object")
        if not isinstance(obj["model_sha256"], str):
            raise bad("model_sha256", "must be a sha256 hex string")
        data_sha256 = obj.get("data_sha256")
        if data_sha256 is not None and not isinstance(data_sha256, str):
            raise bad("data_sha256", "must be a sha256 hex string or null")
        input_shape = obj.get("input_shape", [])
        if not _is_shape(input_shape):
            raise bad("input_shape", f"must be up to {MAX_INPUT_DIMS} positive sizes (C,H,W) of at most "
                      f"{MAX_INPUT_ELEMENTS:,} values in all, got {_short(input_shape)}")
        warnings = obj.get("warnings", [])
        if not isinstance(warnings, list) or not all(isinstance(w, str) for w in warnings):
            raise bad("warnings", "must be a list of strings")
        if not isinstance(obj["groups"], list):
            raise bad("groups", "must be a list of {name, modules, channels, importance} objects")
        groups, seen = [], set()
        for i, raw in enumerate(obj["groups"]):
            groups.append(_parse_group(raw, i, path))
            if groups[-1].name in seen:
                raise ScoresError(f"{path}: group {_label(groups[-1].name)} appears twice; re-run prunecp score")
            seen.add(groups[-1].name)
        return cls(
            method=obj["method"],
            params=dict(obj["params"]),
            model_sha256=obj["model_sha256"],
            data_sha256=data_sha256,
            groups=groups,
            input_shape=list(input_shape),
            warnings=list(warnings),
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _label(name: str) -> str:
    """A group name as it can appear in a one-line message (quoted when odd or long)."""
    return name if name.isprintable() and len(name) <= 80 else _short(name)


def _is_shape(value: Any) -> bool:
    """Up to MAX_INPUT_DIMS positive ints (or none) of at most MAX_INPUT_ELEMENTS values."""
    return (isinstance(value, list) and len(value) <= MAX_INPUT_DIMS and all(is_int(v) and v >= 1 for v in value)
            and math.prod(value) <= MAX_INPUT_ELEMENTS)


def _parse_group(raw: Any, i: int, path: Path | str) -> GroupImportance:
    """One entry of ``groups``, checked field by field."""
    if not isinstance(raw, dict) or not all(k in raw for k in ("name", "modules", "channels", "importance")):
        raise ScoresError(f"{path}: group {i} lacks name, modules, channels or importance; re-run prunecp score")
    name, modules, channels, scores = raw["name"], raw["modules"], raw["channels"], raw["importance"]
    if not isinstance(name, str) or not name:
        raise ScoresError(f"{path}: group {i} has a name that is not a non-empty string; re-run prunecp score")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ScoresError(f"{path}: group {_label(name)} has modules that are not a list of layer names; re-run prunecp score")
    if not is_int(channels) or channels < 1:
        raise ScoresError(f"{path}: group {_label(name)} has channels {_short(channels)}, not a positive integer; "
                          "re-run prunecp score")
    if not isinstance(scores, list) or len(scores) != channels:
        count = f"{len(scores)} scores" if isinstance(scores, list) else f"importance of type {type(scores).__name__}"
        raise ScoresError(f"{path}: group {_label(name)} has {channels} channels but {count}; re-run prunecp score")
    if not all(is_finite_number(v) for v in scores):
        raise ScoresError(f"{path}: group {_label(name)} has a score that is not a finite number; re-run prunecp score")
    extras = {k: v for k, v in raw.items() if k not in ("name", "modules", "channels", "importance")}
    return GroupImportance(name, list(modules), channels, [float(v) for v in scores], extras)


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


class Certificate(TypedDict, total=False):
    """``certificate.json`` as the API returns it (a plain dict at run time; see README "Formats").

    ``model`` {file, sha256, arch, num_classes, params, flops, flops_unit}; ``data`` {file, sha256, n};
    ``nonconformity`` {name, parameters, tuning}; ``quantile`` a number, or one per class.
    """

    schema_version: int
    model: dict[str, Any]
    data: dict[str, Any]
    nonconformity: dict[str, Any]
    alpha: float
    delta: float | None
    class_conditional: bool
    quantile: float | list[float]
    quantile_level: float | list[float]
    rank: int | list[int]
    class_counts: list[int] | None
    groups: dict[str, Any] | None
    guarantee: dict[str, Any]
    calibration: dict[str, Any]
    risk_control: dict[str, Any]
    created_at: str
    prunecp_version: str


class Verdict(TypedDict, total=False):
    """What ``certify`` returns (and ``certify --json`` prints): the audit of a certificate."""

    schema_version: int
    passed: bool
    coverage: float | None
    covered: int | None
    n: int
    mean_set_size: float | None
    top1_accuracy: float
    set_size_histogram: list[int]
    per_class_coverage: list[float | None]
    per_class: list[dict[str, Any]] | None
    per_group: list[dict[str, Any]] | None
    low_coverage_classes: list[dict[str, Any]]
    warnings: list[str]
    p_value: float | None
    test: str
    pac_test: str | None
    significance: float
    min_detectable_drop: float | None
    detection_power: float
    class_coverage_gap: float
    worst_class: dict[str, Any]
    sscv: float
    size_strata: list[dict[str, Any]]
    singleton_rate: float
    empty_rate: float
    groups: dict[str, Any] | None
    groups_file: dict[str, Any] | None
    alpha: float
    delta: float | None
    guarantee: str
    coverage_at_least: float
    class_conditional: bool
    checks: list[dict[str, Any]]
    model: dict[str, Any]
    data: dict[str, Any]
    certificate: dict[str, Any]
