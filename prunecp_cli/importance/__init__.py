"""Registry of importance methods, by name.

Entries are strings (``"module:Class"``) plus a description and typed options, so that the CLI can
list methods and validate options without importing torch. Third-party packages add methods through
the ``prunecp.importance`` entry-point group::

    [project.entry-points."prunecp.importance"]
    my-method = "my_package.importance:MyImportance"

An entry-point class may declare ``description`` and ``options`` ({name: (default, help)}) class
attributes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from prunecp_cli.errors import UsageError


@dataclass(frozen=True)
class MethodInfo:
    """A registered importance method.

    Attributes:
        target: ``"module:Class"`` of the implementation.
        description: one line for ``--help``.
        needs_data: whether ``--data`` is required.
        options: ``{name: (default, help)}``; the default's type is the option's type.
    """

    target: str
    description: str
    needs_data: bool = True
    options: dict[str, tuple[Any, str]] = field(default_factory=dict)


METHODS: dict[str, MethodInfo] = {
    "l1": MethodInfo(
        "prunecp_cli.importance.magnitude:L1Importance",
        "sum over the group's filters of the L1 norm of each filter's weights (Li et al. 2017)",
        needs_data=False,
    ),
    "l2": MethodInfo(
        "prunecp_cli.importance.magnitude:L2Importance",
        "sum over the group's filters of the L2 norm of each filter's weights",
        needs_data=False,
    ),
    "taylor": MethodInfo(
        "prunecp_cli.importance.taylor:TaylorImportance",
        "first-order Taylor |sum_hw a*dL/da| of the cross-entropy, averaged over examples (Molchanov et al. 2017)",
    ),
    "random": MethodInfo(
        "prunecp_cli.importance.random:RandomImportance",
        "uniform random scores from --seed (a baseline)",
        needs_data=False,
    ),
}


def _entry_points() -> dict[str, str]:
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group="prunecp.importance")}


def available() -> list[str]:
    """Names of every method: built in, then from entry points."""
    return list(METHODS) + [n for n in _entry_points() if n not in METHODS]


def info(name: str) -> MethodInfo:
    """The registry entry of ``name``.

    Raises:
        UsageError: no such method.
    """
    if name in METHODS:
        return METHODS[name]
    plugins = _entry_points()
    if name in plugins:
        cls = _load(plugins[name])
        return MethodInfo(
            plugins[name],
            getattr(cls, "description", ""),
            needs_data=bool(getattr(cls, "needs", 1)),
            options=dict(getattr(cls, "options", {})),
        )
    raise UsageError(f"--method {name!r} is not an importance method; choose one of: {', '.join(available())}")


def _load(target: str):
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def parse_options(name: str, pairs: list[str] | None) -> dict[str, Any]:
    """Typed method options from ``KEY=VALUE`` strings, with the registry defaults filled in.

    Raises:
        UsageError: unknown option, missing ``=``, or a value of the wrong type.
    """
    spec = info(name).options
    values = {key: default for key, (default, _) in spec.items()}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip().replace("_", "-")
        if not sep:
            raise UsageError(f"--opt {pair!r}: write KEY=VALUE")
        if key not in spec:
            valid = ", ".join(spec) or "none"
            raise UsageError(f"--opt {key}: method {name} has no such option (its options: {valid})")
        values[key] = _convert(raw.strip(), spec[key][0], key)
    return values


def _convert(raw: str, default: Any, key: str) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if default is None:
            return raw
        return kind(raw)
    except ValueError:
        raise UsageError(f"--opt {key}={raw}: expected a {kind.__name__}") from None


def create(name: str):
    """An instance of the method ``name``."""
    return _load(info(name).target)()
