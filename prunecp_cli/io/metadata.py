"""Check every ``prunecp.*`` metadata field of a model file before anything acts on it.

A prunecp ``.safetensors`` file may come from anyone, so its metadata is untrusted input: each field
is parsed as JSON and checked for type, range and size here, and a damaged or hostile file is refused
with one :class:`~prunecp_cli.errors.CheckpointError` line (exit 3) naming the field, instead of
failing deep inside a command (exit 1), hanging, or allocating gigabytes. Nothing a field names is
imported or called here; :func:`prunecp_cli.io.arch.check_file_arch` decides that later.

The fields (design.md §4) are ``schema_version``, ``arch`` (a ``module:factory`` spec),
``arch_kwargs`` (a JSON object), ``input_shape`` (a short list of positive sizes), ``plan`` (checked
by :func:`prunecp_cli.surgery.plan.plan_problem`) and the extra fields listed in :data:`EXTRA_CHECKS`;
extra fields prunecp does not know are kept as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prunecp_cli.errors import CheckpointError

#: Most dimensions of one input example (channels plus up to three spatial sizes).
MAX_INPUT_DIMS = 4
#: Most elements of one input example (2**22: 16 MiB of float32, e.g. 3×1182×1182).
MAX_INPUT_ELEMENTS = 2**22
#: Most records in the ``data_sha256`` list.
MAX_DATA_RECORDS = 10_000

_DAMAGED = "the file is damaged or was not written by prunecp"


def field_error(path: str | Path, key: str, problem: str) -> CheckpointError:
    """The one-line error for metadata field ``prunecp.<key>`` of ``path`` (an odd key is quoted)."""
    name = f"prunecp.{key}" if key.isprintable() and len(key) <= 80 else _describe(f"prunecp.{key}")
    return CheckpointError(f"{path}: metadata field {name} {problem}; {_DAMAGED}")


def parse_field(path: str | Path, key: str, text: Any) -> Any:
    """Parse the JSON text of field ``prunecp.<key>``.

    Raises:
        CheckpointError: the value is not a string holding JSON (or nests too deeply to parse).
    """
    if not isinstance(text, str):
        raise field_error(path, key, f"must be a JSON string, got {type(text).__name__}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise field_error(path, key, f"is not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # nesting too deep, or a number too long to convert
        raise field_error(path, key, f"is not usable JSON ({type(exc).__name__})") from None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def is_int(value: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_num(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_arch_kwargs(path: str | Path, value: Any) -> dict[str, Any]:
    """``arch_kwargs``: a JSON object with string keys.

    Raises:
        CheckpointError: anything else.
    """
    if not isinstance(value, dict):
        raise field_error(path, "arch_kwargs", f"must be a JSON object, got {type(value).__name__}")
    return value


def check_input_shape(path: str | Path, value: Any) -> list[int]:
    """``input_shape``: at most :data:`MAX_INPUT_DIMS` positive sizes, :data:`MAX_INPUT_ELEMENTS` in all.

    An empty list means "not recorded" (the data or ``--input-shape`` give it).

    Raises:
        CheckpointError: not a list of positive integers, too many dimensions or too many elements.
    """
    if not isinstance(value, list) or not all(is_int(v) for v in value[: MAX_INPUT_DIMS + 1]):
        raise field_error(path, "input_shape", f"must be a list of positive integers such as [3, 32, 32], "
                          f"got {_describe(value)}")
    if len(value) > MAX_INPUT_DIMS or any(v < 1 for v in value):
        raise field_error(path, "input_shape", f"must hold 1 to {MAX_INPUT_DIMS} positive sizes (C,H,W), "
                          f"got {_describe(value)}")
    if math.prod(value) > MAX_INPUT_ELEMENTS:
        raise field_error(path, "input_shape", f"{value} asks for {math.prod(value):,} values per example, more "
                          f"than prunecp's limit of {MAX_INPUT_ELEMENTS:,}")
    return value


def _str_field(value: Any) -> str | None:
    return None if isinstance(value, str) and len(value) <= 10_000 else "must be a string"


def _dict_field(value: Any) -> str | None:
    return None if isinstance(value, dict) else "must be a JSON object"


def _count_field(value: Any) -> str | None:
    return None if is_int(value) and value >= 0 else "must be an integer >= 0"


def _optional_count(value: Any) -> str | None:
    return None if value is None else _count_field(value)


def _members(value: Any, checks: dict[str, Callable[[Any], bool]], what: dict[str, str], *,
             required: bool) -> str | None:
    """Check the listed members of a JSON object (all present when ``required``); ``what`` describes each."""
    if not isinstance(value, dict):
        return "must be a JSON object"
    for key, ok in checks.items():
        if key not in value:
            if required:
                return f"lacks {key!r}"
            continue
        if not ok(value[key]):
            return f"has {key}={_describe(value[key])}, which is not {what[key]}"
    return None


def _optional_num(value: Any) -> bool:
    return value is None or is_num(value)


def _target(value: Any) -> str | None:
    checks = {"ratio": _optional_num, "target_flops": _optional_num, "steps": lambda v: is_int(v) and v >= 1,
              "scope": lambda v: isinstance(v, str), "granularity": lambda v: isinstance(v, str)}
    what = {"ratio": "a number or null", "target_flops": "a number or null", "steps": "an integer >= 1",
            "scope": "a string", "granularity": "a string"}
    return _members(value, checks, what, required=False)


def _finetune(value: Any) -> str | None:
    checks = {"loss": lambda v: isinstance(v, str), "epochs": lambda v: is_int(v) and v >= 0, "lr": is_num}
    what = {"loss": "a string", "epochs": "an integer >= 0", "lr": "a finite number"}
    return _members(value, checks, what, required=True)


def _schedule(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(step, dict) for step in value):
        return "must be a list of JSON objects"
    for step in value:
        if "accuracy" in step and not (is_num(step["accuracy"]) and is_num(step.get("mean_set_size"))):
            return "has a step whose accuracy or mean_set_size is not a finite number"
    return None


def _risk_control(value: Any) -> str | None:
    checks = {"statement": lambda v: isinstance(v, str), "level_text": lambda v: isinstance(v, str)}
    what = {"statement": "a string", "level_text": "a string"}
    return _members(value, checks, what, required=False)


def _sparsity(value: Any) -> str | None:
    checks = {"zeroed_fraction": lambda v: is_num(v) and 0.0 <= v <= 1.0, "zeroed": lambda v: is_int(v) and v >= 0,
              "total": lambda v: is_int(v) and v >= 0}
    what = {"zeroed_fraction": "a number in [0, 1]", "zeroed": "an integer >= 0", "total": "an integer >= 0"}
    return _members(value, checks, what, required=False)


def _data_records(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of {sha256, role, file} records"
    if len(value) > MAX_DATA_RECORDS:
        return f"holds {len(value):,} records, more than {MAX_DATA_RECORDS:,}"
    for i, record in enumerate(value):
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("sha256", "role", "file")):
            return f"has record {i} without the strings sha256, role and file"
    return None


#: The extra fields prunecp reads back, each with a check that returns what is wrong (or None).
EXTRA_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "source_sha256": _str_field,
    "source_file": _str_field,
    "method": _str_field,
    "method_params": _dict_field,
    "data_sha256": _data_records,
    "target": _target,
    "bn_recalibrated_examples": _count_field,
    "params_before": _count_field,
    "params_after": _count_field,
    "flops_before": _optional_count,
    "flops_after": _optional_count,
    "flops_unit": _str_field,
    "created_at": _str_field,
    "finetune": _finetune,
    "schedule": _schedule,
    "risk_control": _risk_control,
    "sparsity": _sparsity,
}


def check_extra(path: str | Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Check the extra fields prunecp reads back; records of ``data_sha256`` keep only their three keys.

    Raises:
        CheckpointError: the first field of the wrong type or range.
    """
    for key, check in EXTRA_CHECKS.items():
        if key in extra:
            problem = check(extra[key])
            if problem is not None:
                raise field_error(path, key, problem)
    if "data_sha256" in extra:
        extra["data_sha256"] = [{k: record[k] for k in ("sha256", "role", "file")} for record in extra["data_sha256"]]
    return extra


def check_plan_field(path: str | Path, plan: Any) -> dict[str, Any]:
    """``plan``: a JSON object (empty when unpruned) that :func:`prunecp_cli.surgery.plan.plan_problem` accepts.

    Raises:
        CheckpointError: the plan is malformed (the message names what is wrong).
    """
    from prunecp_cli.surgery.plan import plan_problem

    problem = plan_problem(plan)
    if problem is not None:
        raise field_error(path, "plan", problem)
    return plan
