"""The conformal certificate: build it, and read it back with every field checked.

A certificate (``certificate.json``, design.md §4, ``schema_version`` 2) binds one model file and one
calibration file by sha256 and records everything needed to rebuild the prediction sets and to audit
them: the nonconformity and its parameters, ``alpha``/``delta``, the threshold ``quantile`` (q̂) with
its rank ``k`` among the ``n`` calibration scores, and the guarantee that rank supports.

Layout (``quantile``, ``quantile_level`` and ``rank`` are lists indexed by class when
``class_conditional`` is true, with ``class_counts`` the calibration points per class)::

    schema_version, model {file, sha256, arch, num_classes, params, flops, flops_unit},
    data {file, sha256, n}, nonconformity {name, parameters, tuning}, alpha, delta,
    class_conditional, quantile, quantile_level, rank, class_counts, groups,
    guarantee {type, coverage_at_least, coverage_at_most, confidence, statement, per_class | per_group},
    calibration {coverage, mean_set_size, top1_accuracy, set_size_histogram, per_class_coverage,
                 class_coverage_gap, worst_class, sscv, size_strata, singleton_rate, empty_rate},
    risk_control (optional), created_at, prunecp_version

``groups`` is null, or the thresholds of Mondrian calibration by user groups
(:mod:`prunecp_cli.conformal.mondrian`; then the top-level ``quantile``, ``quantile_level`` and ``rank``
are null). Schema 2 added ``groups`` and the calibration record's conditional metrics (from
:func:`~prunecp_cli.conformal.conditional.conditional_metrics`, in-sample); schema-1 certificates,
which lack them, are still read (:data:`READABLE_VERSIONS`) and mean the same.

:func:`load_certificate` rejects an unknown schema version and names the first missing or wrong
field; it does not compare ``quantile`` with the scores (``certify`` audits that on test data), but
it does check that ``rank`` is the rank the formula gives for ``n``, ``alpha`` and ``delta``, so the
audit's null distribution is the one the certificate claims.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prunecp_cli import __version__
from prunecp_cli.checks import is_finite_number, is_int
from prunecp_cli.conformal.mondrian import check_groups_section
from prunecp_cli.conformal.nonconformity import NONCONFORMITY, Nonconformity, from_parameters
from prunecp_cli.conformal.quantile import QuantileResult, conformal_rank, pac_rank
from prunecp_cli.errors import CertificateError

__all__ = [
    "SCHEMA_VERSION",
    "build_certificate",
    "class_conditional_guarantee",
    "load_certificate",
    "validate_certificate",
]

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Schema versions :func:`load_certificate` accepts (1 lacks the calibration conditional metrics)."""
GUARANTEE_TYPES = ("marginal", "training-conditional")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FIX = "recalibrate with prunecp calibrate to write a fresh certificate"
#: The largest count (calibration points, classes, parameters, FLOPs) a certificate may state.
MAX_COUNT = 10**15


def class_conditional_guarantee(per_class: Sequence[dict[str, Any]], *, alpha: float,
                                delta: float | None) -> dict[str, Any]:
    """Combine per-class guarantees (Mondrian calibration) into the certificate's ``guarantee``.

    Each class ``c`` keeps its own statement (for test points whose true label is ``c``). The
    top-level bounds follow: coverage is at least ``1 - alpha`` in every class, hence marginally; the
    upper bound is the largest per-class one, stated only when every class has one.

    Args:
        per_class: One :func:`~prunecp_cli.conformal.quantile.guarantee` dict per class.
        alpha: Target miscoverage.
        delta: PAC failure probability per class, or ``None``.

    Returns:
        The combined guarantee, with ``per_class`` holding the class guarantees.
    """
    kind = per_class[0]["type"]
    uppers = [g["coverage_at_most"] for g in per_class]
    upper = None if any(u is None for u in uppers) else max(uppers)
    if kind == "marginal":
        statement = (
            f"Class-conditional (Mondrian) guarantee: for every class c, a new test point of true class c "
            f"exchangeable with the calibration points of class c gets a prediction set containing c with "
            f"probability at least {per_class[0]['coverage_at_least']:.6g}; each class's own statement and "
            "bounds are under per_class."
        )
    else:
        statement = (
            f"Class-conditional training-conditional (PAC) guarantee: for each class c separately, with "
            f"probability at least {1 - delta:.6g} over the draw of its calibration points, the coverage of "
            f"test points of true class c is at least {1 - alpha:.6g}; the K events are not joint, so all "
            f"classes hold together with probability at least {max(0.0, 1 - len(per_class) * delta):.6g} "
            "(union bound); each class's statement is under per_class."
        )
    return {
        "type": kind,
        "coverage_at_least": per_class[0]["coverage_at_least"],
        "coverage_at_most": upper,
        "confidence": per_class[0]["confidence"],
        "statement": statement,
        "per_class": [dict(g) for g in per_class],
    }


def build_certificate(
    *,
    model: dict[str, Any],
    data: dict[str, Any],
    nonconformity: Nonconformity,
    alpha: float,
    delta: float | None,
    results: QuantileResult | Sequence[QuantileResult],
    guarantee: dict[str, Any],
    calibration: dict[str, Any],
    tuning: dict[str, Any] | None = None,
    risk_control: dict[str, Any] | None = None,
    groups: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble a schema-2 certificate (and validate it, so a bad one is never written).

    Args:
        model: ``{file, sha256, arch, num_classes, params, flops, flops_unit}``.
        data: ``{file, sha256, n}`` of the points the quantile was taken on.
        nonconformity: The nonconformity used (its ``parameters()`` rebuild it).
        alpha: Target miscoverage.
        delta: PAC failure probability, or ``None`` for the marginal guarantee.
        results: One quantile result, or one per class (class-conditional).
        guarantee: The guarantee dict (from ``quantile.guarantee`` or
            :func:`class_conditional_guarantee`).
        calibration: In-sample metrics on the calibration points.
        tuning: How a nonconformity parameter was chosen on data held out from the quantile, or None.
        risk_control: The model's Learn-then-Test record, copied when present.
        groups: The ``groups`` section of a group-conditional certificate (``results`` are then the
            groups'; see :mod:`prunecp_cli.conformal.mondrian`), or None.

    Returns:
        The certificate, a JSON-ready dict.
    """
    per_class = not isinstance(results, QuantileResult) and groups is None
    items = [results] if isinstance(results, QuantileResult) else list(results)
    top = groups is None
    cert: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": dict(model),
        "data": dict(data),
        "nonconformity": {"name": nonconformity.name, "parameters": nonconformity.parameters(), "tuning": tuning},
        "alpha": float(alpha),
        "delta": None if delta is None else float(delta),
        "class_conditional": per_class,
        "quantile": ([r.qhat for r in items] if per_class else items[0].qhat) if top else None,
        "quantile_level": ([r.level for r in items] if per_class else items[0].level) if top else None,
        "rank": ([r.k for r in items] if per_class else items[0].k) if top else None,
        "class_counts": [r.n for r in items] if per_class else None,
        "groups": groups,
        "guarantee": dict(guarantee),
        "calibration": dict(calibration),
    }
    if risk_control is not None:
        cert["risk_control"] = risk_control
    cert["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    cert["prunecp_version"] = __version__
    return validate_certificate(cert, source="the new certificate")


def load_certificate(path: str | Path) -> dict[str, Any]:
    """Read and validate a ``certificate.json``.

    Args:
        path: The file written by ``prunecp calibrate``.

    Returns:
        The certificate dict (see the module docstring for its fields).

    Raises:
        CertificateError: The file is missing, not JSON, of another schema version, or has a missing
            or wrong field (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise CertificateError(f"certificate {path} does not exist or is not a file; run prunecp calibrate first")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CertificateError(f"certificate {path} cannot be read ({exc.strerror or type(exc).__name__}); check "
                               "its permissions") from None
    except UnicodeDecodeError:
        raise CertificateError(f"{path} is not a text JSON file; pass the certificate.json from prunecp calibrate") from None
    except json.JSONDecodeError as exc:
        raise CertificateError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); pass the certificate.json from prunecp calibrate"
        ) from None
    except (ValueError, RecursionError) as exc:  # nested too deeply, or an integer too long to convert
        raise CertificateError(f"{path} is not a JSON file prunecp can read ({type(exc).__name__}); pass the "
                               "certificate.json from prunecp calibrate") from None
    return validate_certificate(obj, source=str(path))


def _bad(source: str, field: str, problem: str) -> CertificateError:
    return CertificateError(f"{source}: field '{field}' {problem}; {_FIX}")


def _get(obj: dict[str, Any], key: str, source: str, prefix: str = "") -> Any:
    if key not in obj:
        raise _bad(source, prefix + key, "is missing")
    return obj[key]


def _int(obj, key, source, prefix, *, low: int = 0, high: int = MAX_COUNT, nullable: bool = False) -> int | None:
    value = _get(obj, key, source, prefix)
    if value is None and nullable:
        return None
    if not is_int(value) or not low <= value <= high:
        raise _bad(source, prefix + key, f"must be an integer in [{low}, {high:.0e}], got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def _num(obj, key, source, prefix, *, low=None, high=None, open_=False, nullable=False) -> float | None:
    value = _get(obj, key, source, prefix)
    if value is None and nullable:
        return None
    ok = is_finite_number(value)
    if ok and low is not None:
        ok = value > low if open_ else value >= low
    if ok and high is not None:
        ok = value < high if open_ else value <= high
    if not ok:
        span = "" if low is None else f" in {'(' if open_ else '['}{low}, {high}{')' if open_ else ']'}"
        raise _bad(source, prefix + key, f"must be a finite number{span}{' or null' if nullable else ''}, "
                   f"got {_short(value)}")
    return value


def _str(obj, key, source, prefix, *, pattern: re.Pattern | None = None) -> str:
    value = _get(obj, key, source, prefix)
    if not isinstance(value, str) or not value or (pattern is not None and not pattern.match(value)):
        what = "a sha256 hex digest (64 lowercase hex characters)" if pattern is _SHA256 else "a non-empty string"
        raise _bad(source, prefix + key, f"must be {what}, got {_short(value)}")
    return value


def _dict(obj, key, source, prefix="", *, nullable: bool = False) -> dict[str, Any] | None:
    value = _get(obj, key, source, prefix)
    if value is None and nullable:
        return None
    if not isinstance(value, dict):
        raise _bad(source, prefix + key, f"must be a JSON object, got {type(value).__name__}")
    return value


def _per_class(value: Any, field: str, source: str, k: int, check) -> list[Any]:
    if not isinstance(value, list) or len(value) != k:
        raise _bad(source, field, f"must be a list of {k} values (one per class) with class_conditional true")
    for c, item in enumerate(value):
        if not check(item):
            raise _bad(source, f"{field}[{c}]", f"has the wrong type or range ({_short(item)})")
    return value


def _check_guarantee(g: dict[str, Any], source: str, prefix: str, *, kind: str) -> None:
    value = _get(g, "type", source, prefix)
    if value != kind:
        expected = "training-conditional (delta is set)" if kind == GUARANTEE_TYPES[1] else "marginal (delta is null)"
        raise _bad(source, prefix + "type", f"is {value!r} but must be {expected}")
    _num(g, "coverage_at_least", source, prefix, low=0.0, high=1.0)
    _num(g, "coverage_at_most", source, prefix, low=0.0, high=1.0, nullable=True)
    _num(g, "confidence", source, prefix, low=0.0, high=1.0, open_=True, nullable=True)
    _str(g, "statement", source, prefix)


def _check_conditional(calib: dict[str, Any], source: str, classes: int) -> None:
    """The schema-2 conditional metrics of the calibration record."""
    prefix = "calibration."
    for key in ("class_coverage_gap", "sscv"):
        _num(calib, key, source, prefix, low=0.0, high=1.0)
    for key in ("singleton_rate", "empty_rate"):
        _num(calib, key, source, prefix, low=0.0, high=1.0)
    worst = _dict(calib, "worst_class", source, prefix)
    _int(worst, "class", source, prefix + "worst_class.", high=classes - 1)
    _int(worst, "n", source, prefix + "worst_class.", low=1)
    _num(worst, "coverage", source, prefix + "worst_class.", low=0.0, high=1.0)
    strata = _get(calib, "size_strata", source, prefix)
    if not isinstance(strata, list) or not strata or len(strata) > 16 or not all(
            isinstance(s, dict) and isinstance(s.get("sizes"), str) and is_int(s.get("n"))
            and is_finite_number(s.get("coverage")) for s in strata):
        raise _bad(source, prefix + "size_strata", "must be a list of {sizes, n, coverage} objects")


def validate_certificate(obj: Any, *, source: str = "certificate") -> dict[str, Any]:
    """Check a certificate object field by field (see the module docstring).

    Args:
        obj: The parsed JSON.
        source: How to name it in messages (usually the file path).

    Returns:
        ``obj`` itself, unchanged.

    Raises:
        CertificateError: The first problem found, naming the field.
    """
    if not isinstance(obj, dict):
        raise CertificateError(f"{source} is not a JSON object; pass the certificate.json from prunecp calibrate")
    version = _get(obj, "schema_version", source)
    if not is_int(version) or version not in READABLE_VERSIONS:
        raise CertificateError(
            f"{source}: schema_version {_short(version)} is not supported; prunecp {__version__} reads certificate "
            f"schemas {', '.join(map(str, READABLE_VERSIONS))}, so {_FIX} (or use the prunecp version that wrote it)"
        )
    model = _dict(obj, "model", source)
    _str(model, "file", source, "model.")
    _str(model, "sha256", source, "model.", pattern=_SHA256)
    classes = _int(model, "num_classes", source, "model.", low=1)
    _int(model, "params", source, "model.")
    _int(model, "flops", source, "model.", nullable=True)
    data = _dict(obj, "data", source)
    _str(data, "file", source, "data.")
    _str(data, "sha256", source, "data.", pattern=_SHA256)
    n = _int(data, "n", source, "data.", low=1)
    nc = _dict(obj, "nonconformity", source)
    name = _get(nc, "name", source, "nonconformity.")
    if not isinstance(name, str) or name not in NONCONFORMITY:
        raise _bad(source, "nonconformity.name", f"is {_short(name)}, not one of {', '.join(NONCONFORMITY)}")
    params = _dict(nc, "parameters", source, "nonconformity.")
    for key, value in params.items():
        if not (value is None or isinstance(value, bool) or (is_int(value) and abs(value) < 2**63) or is_finite_number(value)):
            raise _bad(source, f"nonconformity.parameters.{_short(key)}", f"is {_short(value)}, not a plain number")
    from_parameters(name, params)  # CertificateError naming the parameters when they do not fit
    if "tuning" in nc:
        _dict(nc, "tuning", source, "nonconformity.", nullable=True)
    alpha = _num(obj, "alpha", source, "", low=0.0, high=1.0, open_=True)
    delta = _num(obj, "delta", source, "", low=0.0, high=1.0, open_=True, nullable=True)
    per_class = _get(obj, "class_conditional", source)
    if not isinstance(per_class, bool) or (per_class and obj.get("groups") is not None):
        raise _bad(source, "class_conditional", f"must be true or false (false with groups), got {per_class!r}")
    rank_of = (lambda m: conformal_rank(m, alpha)) if delta is None else (lambda m: pac_rank(m, alpha, delta))
    kind = GUARANTEE_TYPES[0] if delta is None else GUARANTEE_TYPES[1]
    guarantee = _dict(obj, "guarantee", source)
    _check_guarantee(guarantee, source, "guarantee.", kind=kind)
    if per_class:
        counts = _per_class(_get(obj, "class_counts", source), "class_counts", source, classes,
                            lambda v: is_int(v) and v >= 1)
        if sum(counts) != n:
            raise _bad(source, "class_counts", f"sums to {sum(counts)}, not data.n={n}")
        _per_class(_get(obj, "quantile", source), "quantile", source, classes, is_finite_number)
        _per_class(_get(obj, "quantile_level", source), "quantile_level", source, classes,
                   lambda v: is_finite_number(v) and 0 < v <= 1)
        ranks = _per_class(_get(obj, "rank", source), "rank", source, classes, is_int)
        for c, (k, m) in enumerate(zip(ranks, counts, strict=True)):
            if k != rank_of(m):
                raise _bad(source, f"rank[{c}]", f"is {k}, but n={m}, alpha={alpha}, delta={delta} give {rank_of(m)}")
        gpc = _per_class(_get(guarantee, "per_class", source, "guarantee."), "guarantee.per_class", source, classes,
                         lambda v: isinstance(v, dict))
        for c, g in enumerate(gpc):
            _check_guarantee(g, source, f"guarantee.per_class[{c}].", kind=kind)
    elif obj.get("groups") is not None:
        if version < 2:
            raise _bad(source, "groups", "needs schema_version 2")
        labels = check_groups_section(obj["groups"], source=source, n=n, rank_of=rank_of)
        for key in ("quantile", "quantile_level", "rank"):
            if _get(obj, key, source) is not None:
                raise _bad(source, key, "must be null in a group-conditional certificate (see groups)")
        gpg = _get(guarantee, "per_group", source, "guarantee.")
        if not isinstance(gpg, list) or len(gpg) != len(labels) or not all(isinstance(g, dict) for g in gpg):
            raise _bad(source, "guarantee.per_group", f"must be {len(labels)} guarantees (one per group)")
        for g, item in enumerate(gpg):
            _check_guarantee(item, source, f"guarantee.per_group[{g}].", kind=kind)
    else:
        _num(obj, "quantile", source, "")
        _num(obj, "quantile_level", source, "", low=0.0, high=1.0, open_=False)
        k = _int(obj, "rank", source, "", low=1)
        if k != rank_of(n):
            raise _bad(source, "rank", f"is {k}, but n={n}, alpha={alpha}, delta={delta} give {rank_of(n)}")
    calib = _dict(obj, "calibration", source)
    _num(calib, "coverage", source, "calibration.", low=0.0, high=1.0)
    _num(calib, "mean_set_size", source, "calibration.", low=0.0)
    _num(calib, "top1_accuracy", source, "calibration.", low=0.0, high=1.0)
    hist = _get(calib, "set_size_histogram", source, "calibration.")
    if not isinstance(hist, list) or len(hist) != classes + 1 or not all(is_int(v) and v >= 0 for v in hist):
        raise _bad(source, "calibration.set_size_histogram", f"must be {classes + 1} counts (set sizes 0..{classes})")
    if version >= 2:
        _check_conditional(calib, source, classes)
    if "risk_control" in obj:
        _dict(obj, "risk_control", source, nullable=True)
    _str(obj, "created_at", source, "")
    _str(obj, "prunecp_version", source, "")
    return obj
