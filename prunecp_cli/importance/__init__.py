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


_MAGNITUDE_OPTIONS = {
    "members": ("all", "all: every member's weights; filters: the producers' filters only, summed (the old l1)"),
    "normalise": ("none", "none: average the raw norms (Torch-Pruning's group mean); mean: divide each member's "
                          "norms by their mean first"),
}

METHODS: dict[str, MethodInfo] = {
    "l1": MethodInfo(
        "prunecp_cli.importance.magnitude:L1Importance",
        "L1 norm of every weight a channel's removal deletes (producers' filters, consumers' input slices, "
        "norm scales), averaged over the group's members (Torch-Pruning's group L1)",
        needs_data=False,
        options=_MAGNITUDE_OPTIONS,
    ),
    "l2": MethodInfo(
        "prunecp_cli.importance.magnitude:L2Importance",
        "as l1 with the L2 norm of each member's weights per channel",
        needs_data=False,
        options=_MAGNITUDE_OPTIONS,
    ),
    "taylor": MethodInfo(
        "prunecp_cli.importance.taylor:TaylorImportance",
        "first-order Taylor |sum_hw a*dL/da| of the cross-entropy, averaged over examples (Molchanov et al. 2017)",
    ),
    "auto": MethodInfo(
        "prunecp_cli.importance.auto:AutoImportance",
        "the recommended method: score with each candidate, then prune keeps the one whose pruned, "
        "BatchNorm-recalibrated model has the smallest mean LAC set size on a held-out part of the score data",
        options={
            "candidates": ("l1,taylor,cp-taylor", "comma-separated methods to choose among (registry defaults)"),
            "holdout": (0.4, "share of the score data held out to compare the candidates (never scored on)"),
            "alpha": (0.1, "miscoverage of the LAC sets compared"),
            "resplits": (100, "random calibration/evaluation halvings of the holdout averaged per candidate"),
        },
    ),
    "random": MethodInfo(
        "prunecp_cli.importance.random:RandomImportance",
        "uniform random scores from --seed (a baseline)",
        needs_data=False,
    ),
    "cp-bruteforce": MethodInfo(
        "prunecp_cli.importance.cp_bruteforce:CPBruteForceImportance",
        "exact change of recalibrated split-conformal efficiency when channels are zeroed, averaged over "
        "re-splits of the score data, removed greedily a chunk at a time (Zhao et al. 2025)",
        options={
            "alpha": (0.1, "miscoverage of the LAC predictor whose efficiency is measured"),
            "measure": ("soft-size", "efficiency: size (mean set size), size-of (mean of set size and observed "
                        "fuzziness), of, or soft-size (sigmoid set size at the recalibrated threshold)"),
            "temperature": (0.1, "measure=soft-size: sigmoid temperature, in log-probability units"),
            "cal-fraction": (0.5, "share of the score data that calibrates in each re-split; the rest measures efficiency"),
            "resplits": (400, "random calibration/evaluation re-splits the efficiency is averaged over (1: the seeded split)"),
            "schedule": ("greedy", "greedy: remove the cheapest chunk, re-score the rest with it silenced, repeat; "
                         "one-shot: every channel alone"),
            "scope": ("local", "greedy within each group (local; prune then shares the budget by rank) or across all "
                      "groups (global; measured worse on the benchmark); auto: prune's --scope"),
            "per": ("channel", "global greedy: rank by efficiency cost per channel (channel) or per FLOP saved (flop; measured worse on the benchmark)"),
            "remove": (0.5, "share of channels the greedy schedule removes (local: of each group; global: of all)"),
            "chunk": (2, "channels removed per greedy round (local: per group; global: in all)"),
            "max-rounds": (16, "most greedy rounds (masked passes over the data); the chunk grows to fit"),
            "refresh": (8, "greedy: re-measure every channel every this many rounds (and in the last); in between only the "
                        "cheapest `candidates` chunks by their last costs (1: every channel every round, 2-3x slower)"),
            "candidates": (3, "refresh > 1: chunks of cheapest channels re-measured in the rounds between refreshes"),
            "bn": ("running", "BatchNorm while scoring: running (the dense model's statistics) or batch (every mask "
                              "normalised with its own batch statistics, like prune's re-estimation; measured worse)"),
            "max-rows": (128, "most rows (masks x examples) per forward pass (memory vs speed; 128 was fastest on 2 CPU cores)"),
            "max-memory-gb": (2.0, "stop early, naming a --max-samples that fits, above this much kept logits"),
        },
    ),
    "cp-taylor": MethodInfo(
        "prunecp_cli.importance.cp_taylor:CPTaylorImportance",
        "first-order Taylor |sum_hw a*dOmega/da| of the smooth ConfTr set size, averaged over examples and "
        "normalised per group (Zhao et al. 2025)",
        options={
            "alpha": (0.1, "miscoverage of the smooth threshold"),
            "temperature": (1.0, "sigmoid temperature T of the soft sets, in -log p units"),
            "dispersion": (0.1, "smooth-quantile kernel width, in standard errors of the quantile"),
            "aggregate": ("example", "example: mean of per-example |terms|; batch: |mean of terms|"),
        },
    ),
    "shapley": MethodInfo(
        "prunecp_cli.importance.shapley:ShapleyImportance",
        "Shapley value of each channel in its layer's game v(S) = -loss with the other channels zeroed, by "
        "antithetic permutation sampling on --max-samples (default 128) examples (Ancona et al. 2020)",
        options={
            "samples": (5, "permutations per group (rounded up to even: antithetic pairs)"),
            "value": ("loss", "game value: loss (-cross-entropy) or cp-size (-smooth conformal set size; new)"),
            "aggregate": ("mean+2std", "over examples: mean+2std (favours channels vital to a few examples), or mean"),
            "truncation": (0.0, "stop a permutation once the mean value is this close to all-off (0: never)"),
            "depth": (0.5, "fraction of each permutation played, from the full layer (0.5: the mean marginal over "
                           "coalitions of at least half the channels; 1: the Shapley value)"),
            "schedule": ("one-shot", "one-shot: one game per layer; greedy: remove the lowest chunk of each layer, "
                         "re-play the game on the channels left, repeat"),
            "remove": (0.5, "schedule=greedy: share of each layer's channels removed greedily"),
            "chunk": (2, "schedule=greedy: channels removed per layer and round"),
            "max-rounds": (8, "schedule=greedy: most rounds (games per layer); the chunk grows to fit"),
            "antithetic": (True, "pair every permutation with its reverse"),
            "alpha": (0.1, "value=cp-size: miscoverage of the smooth threshold"),
            "temperature": (1.0, "value=cp-size: soft-set temperature, in -log p units"),
            "dispersion": (0.1, "value=cp-size: smooth-quantile width, in standard errors of the quantile"),
            "max-rows": (256, "most rows (coalitions x examples) per forward pass (memory vs speed; 256 was fastest on 2 CPU cores)"),
        },
    ),
    "cluster": MethodInfo(
        "prunecp_cli.importance.cluster:ClusterImportance",
        "MCICP: k-means++ on per-channel (mean, variance, cosine) features, cluster counts by self-adaptive "
        "DE, crowding-distance rank within clusters (Sun et al. 2024)",
        options={
            "population": (20, "DE population size (at least 4)"),
            "generations": (30, "DE generations after the initial population"),
            "keep": (0.5, "fraction of the model's FLOPs the DE's candidate prunings keep (match --target-flops)"),
            "penalty": (10.0, "DE objective lost per unit of FLOPs fraction above keep"),
            "holdout": (0.5, "share of the score data (at most 2000) held out for the DE's accuracy"),
            "cosine-source": ("activation", "cosine feature from the mean activation map (activation) or the "
                              "filter weights (weight: a function of mean and variance)"),
            "restarts": (10, "k-means++ seedings per clustering"),
            "bn-recalibrate": (True, "re-estimate BatchNorm per DE candidate, as prune does (one more pass each)"),
            "tiebreak": ("l1", "order channels with equal crowding scores by group L1 magnitude (l1) or by index"),
        },
    ),
}


def bind_scope(name: str, params: dict[str, Any], scope: str) -> dict[str, Any]:
    """``params`` with a ``scope`` option of ``auto`` set to the selection scope (prune's ``--scope``)."""
    return {**params, "scope": scope} if params.get("scope") == "auto" else params


def comparable_across_groups(name: str, params: dict[str, Any]) -> bool:
    """True when method ``name``'s scores rank all groups' channels on one scale already.

    cp-bruteforce's global greedy schedule gives every channel its removal round, so global selection
    must take the scores as they are (no per-group normalisation).
    """
    return name == "cp-bruteforce" and params.get("schedule") == "greedy" and params.get("scope") == "global"


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
