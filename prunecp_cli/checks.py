"""Checks that need no model: output paths, probabilities, JSON options.

Nothing here imports torch or numpy, so every command runs these checks before it loads anything
heavy: a mistyped ``-o`` or ``--alpha`` fails in a fraction of a second, and the API runs the same
checks for callers that skip the command line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prunecp_cli.errors import UsageError

JSON_SUFFIXES = (".json",)
MODEL_SUFFIXES = (".safetensors",)
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def open_unit(value: float | None, name: str) -> None:
    """Check that ``value`` (when given) lies strictly between 0 and 1.

    Args:
        value: the number, or None when the option was not given.
        name: the API argument, e.g. ``alpha`` (the command line shows ``--alpha``).

    Raises:
        UsageError: ``value`` is not a finite number in (0, 1).
    """
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value < 1.0:
        raise UsageError(f"{{arg}} {value!r} must lie strictly between 0 and 1, e.g. {{arg}} 0.1",
                         arguments={"arg": name})


def parse_json_object(text: str | None, *, option: str = "--arch-kwargs") -> dict[str, Any]:
    """Parse an option holding a JSON object (``--arch-kwargs '{"num_classes": 10}'``).

    Raises:
        UsageError: the text is not a JSON object.
    """
    if text is None or text.strip() == "":
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"{option} is not valid JSON ({exc.msg} at column {exc.colno}); "
            'write a JSON object such as \'{"num_classes": 10}\''
        ) from None
    if not isinstance(value, dict):
        raise UsageError(f'{option} must be a JSON object such as \'{{"num_classes": 10}}\'')
    return value


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def check_output(
    out: str | Path | None,
    *,
    suffixes: tuple[str, ...],
    inputs: Iterable[tuple[str, str | Path | None]] = (),
    option: str = "output",
) -> None:
    """Refuse an output path that would clobber an input, or that has the wrong extension.

    Args:
        out: the output path (None: nothing is written; nothing to check).
        suffixes: the extensions this output may have (lower case, with the dot).
        inputs: ``(argument, path)`` of every input the command reads; None paths are skipped.
        option: the output's argument name (the command line shows ``-o``).

    Raises:
        UsageError: ``out`` is an input file (or lies inside an input folder), is a folder, or has
            another extension than ``suffixes``.
    """
    if out is None:
        return
    out = Path(out)
    for name, path in inputs:
        if path is None:
            continue
        path = Path(path)
        if _same_file(out, path) or (path.is_dir() and _inside(out, path)):
            where = "is" if _same_file(out, path) else "lies inside"
            raise UsageError(f"{{out}} {out} {where} the input {{inp}} {path}; writing it would "
                             "destroy that input: choose another {out} path", arguments={"out": option, "inp": name})
    if out.is_dir():
        raise UsageError(f"{{out}} {out} is a folder; give a file name such as "
                         f"{out / ('out' + suffixes[0])}", arguments={"out": option})
    if out.suffix.lower() not in suffixes:
        wanted = " or ".join(suffixes)
        raise UsageError(f"{{out}} {out} must end in {wanted} (this command writes {suffixes[0][1:]}); "
                         f"e.g. {{out}} {out.with_suffix(suffixes[0]).name}", arguments={"out": option})


def parse_shape(text: str | None) -> list[int] | None:
    """Parse ``--input-shape 3,32,32`` (or ``3x32x32``) into ``[3, 32, 32]``.

    The limits are those of a model file's recorded shape (:func:`prunecp_cli.io.metadata.check_input_shape`):
    at most :data:`~prunecp_cli.io.metadata.MAX_INPUT_DIMS` sizes and
    :data:`~prunecp_cli.io.metadata.MAX_INPUT_ELEMENTS` values per example, so that a typo cannot ask for
    an example tensor of many gigabytes.

    Raises:
        UsageError: not a list of positive integers, or over the limits.
    """
    from prunecp_cli.io.metadata import MAX_INPUT_DIMS, MAX_INPUT_ELEMENTS

    if text is None:
        return None
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--input-shape {text!r}: give C,H,W such as 3,32,32") from None
    if not shape or any(v < 1 for v in shape):
        raise UsageError(f"--input-shape {text!r}: give positive sizes such as 3,32,32")
    if len(shape) > MAX_INPUT_DIMS:
        raise UsageError(f"--input-shape {text!r}: give at most {MAX_INPUT_DIMS} sizes (C,H,W), without the batch")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise UsageError(f"--input-shape {text!r} asks for {math.prod(shape):,} values per example, more than "
                         f"prunecp's limit of {MAX_INPUT_ELEMENTS:,}; give the shape of one example, such as 3,224,224")
    return shape


def parse_floats(text: str | None, *, option: str) -> tuple[float, ...] | None:
    """Parse ``--mean 0.485,0.456,0.406`` style values."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated numbers, e.g. 0.485,0.456,0.406") from None


def is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (a ``bool`` is not), as parsed from JSON."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool, NaN, inf or an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
