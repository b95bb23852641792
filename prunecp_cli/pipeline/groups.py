"""``--groups FILE``: one group label per example, in the data's order, for per-group metrics.

Formats: ``.npy`` (a 1-D integer, bool or string array, read without pickle) or ``.txt`` (one label per
line, UTF-8; blank lines are not allowed; when every label is an integer they are read as integers,
so ``.txt`` and ``.npy`` files with the same numbers name the same groups).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from prunecp_cli.errors import DataError
from prunecp_cli.io.files import sha256_file

__all__ = ["GROUP_SUFFIXES", "MAX_GROUPS", "read_groups"]

GROUP_SUFFIXES = (".npy", ".txt")
MAX_GROUPS = 10_000
"""At most this many distinct groups (a file with more is almost surely not group labels)."""


def _from_npy(path: Path) -> list[Any]:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise DataError(f"{path.name} cannot be read without pickle ({str(exc).split('.')[0]}); save the group "
                        "labels as an integer or string array (np.save(path, np.asarray(labels, dtype=str)))") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path.name} is not a readable .npy file ({type(exc).__name__}); save the group labels "
                        "with np.save") from None
    if array.ndim != 1 or array.dtype.kind not in "biuU":
        raise DataError(f"{path.name} holds a {array.ndim}-D {array.dtype} array; --groups needs a 1-D integer or "
                        "string array with one label per example")
    return [str(v) for v in array] if array.dtype.kind == "U" else [int(v) for v in array]


def _from_txt(path: Path) -> list[Any]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{path.name} is not UTF-8 text; --groups .txt files hold one label per line") from None
    labels = [line.strip() for line in lines]
    if any(not label for label in labels):
        raise DataError(f"{path.name} line {labels.index('') + 1} is blank; give one non-empty group label per "
                        "example, one per line")
    try:
        return [int(label) for label in labels]
    except ValueError:
        return labels


def read_groups(path: str | Path, *, n: int) -> tuple[list[Any], dict[str, Any]]:
    """The group labels of ``n`` examples, and the ``{file, sha256}`` record of the file.

    Raises:
        DataError: A missing or unreadable file, another suffix, or not exactly ``n`` labels.
    """
    path = Path(path)
    if path.suffix.lower() not in GROUP_SUFFIXES:
        raise DataError(f"--groups {path.name}: use a .npy array or a .txt file with one label per line")
    if not path.is_file():
        raise DataError(f"--groups {path} does not exist or is not a file; pass the group labels of the data")
    labels = _from_npy(path) if path.suffix.lower() == ".npy" else _from_txt(path)
    if len(labels) != n:
        raise DataError(f"--groups {path.name} has {len(labels)} labels but the data have {n} examples; give one "
                        "group label per example, in the data's order")
    if len(set(labels)) > MAX_GROUPS:
        raise DataError(f"--groups {path.name} has {len(set(labels))} distinct groups (at most {MAX_GROUPS}); "
                        "group labels name subpopulations, not examples")
    return labels, {"file": path.name, "sha256": sha256_file(path)}
