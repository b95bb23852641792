"""``prune --method auto``: prune with every candidate ranking and keep the smallest conformal sets.

The candidates' scores come from :class:`prunecp_cli.importance.auto.AutoImportance` (run now, or
read back from an ``importance.json`` written by ``score --method auto``). For each candidate, a
copy of the dense model is pruned one-shot to the same target with the same selection policy, its
BatchNorm statistics are re-estimated on the *fit* part of the score data (when prune recalibrates
at all), and its logits on the *holdout* part are computed once. The holdout logits are then split
``resplits`` times at random into two halves: LAC at ``alpha`` is calibrated on one half and its
mean set size measured on the other; the candidate's figure is the mean over the re-splits (one
random split of a few hundred points is too noisy to rank models whose sets differ by a few
hundredths). The candidate with the smallest mean set size wins (ties: the earlier candidate).

The model is then pruned with the winner's ranking exactly as ``prune --method <winner>`` would be
(BatchNorm re-estimated on the whole score split; with ``--allocation measured``, with the groups'
shares measured for the winner on the fit part, so the model is the one that was judged), and every
candidate's figures are recorded in the model's metadata (``auto``) and returned for printing.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from prunecp_cli.conformal.nonconformity import LAC
from prunecp_cli.conformal.quantile import conformal_rank
from prunecp_cli.errors import ScoresError, UsageError
from prunecp_cli.importance import auto as auto_method
from prunecp_cli.measure import count_flops, flops_by_module
from prunecp_cli.pipeline.allocation import Allocation, allocate
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.pipeline.setup import PruneSetup, recalibrate_model
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.groups import ModelGraph
from prunecp_cli.surgery.plan import apply_removal
from prunecp_cli.surgery.select import FlopsModel, select

DEFAULTS = {"alpha": 0.1, "resplits": 100}


def candidate_scores(setup: PruneSetup) -> dict[str, dict[str, torch.Tensor]]:
    """Each candidate's scores per group, from the setup's ``auto:<method>`` extras.

    Raises:
        ScoresError: a candidate's scores are missing, mis-sized or not finite (a damaged file).
    """
    names = auto_method.candidates(setup.method_params.get("candidates", ""))
    out: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    for group in setup.graph.groups:
        extras = setup.extras.get(group.name, {})
        for name in names:
            values = extras.get(auto_method.PREFIX + name)
            if not isinstance(values, list) or len(values) != group.channels:
                raise ScoresError(f"the auto scores lack {name}'s scores for group {group.name}; re-run prunecp score "
                                  "--method auto")
            tensor = torch.tensor([float(v) if isinstance(v, (int, float)) else float("nan") for v in values],
                                  dtype=torch.float64)
            if not torch.isfinite(tensor).all():
                raise ScoresError(f"the auto scores of {name} for group {group.name} are not finite numbers; re-run "
                                  "prunecp score --method auto")
            out[name][group.name] = tensor
    return out


def resplit_set_size(logits: torch.Tensor, labels: torch.Tensor, *, alpha: float, resplits: int,
                     seed: int) -> dict[str, float]:
    """Mean LAC set size and coverage over ``resplits`` random half/half calibration/evaluation splits."""
    scores = LAC().all_scores(logits).double().numpy()  # [N, K]
    y = labels.numpy()
    n = len(y)
    n_cal = n // 2
    k = conformal_rank(n_cal, alpha)
    true = scores[np.arange(n), y]
    orders = np.random.default_rng(seed).permuted(np.tile(np.arange(n), (resplits, 1)), axis=1)
    qhat = np.partition(true[orders[:, :n_cal]], min(k, n_cal) - 1, axis=1)[:, min(k, n_cal) - 1]
    if k > n_cal:
        qhat = np.full(resplits, np.inf)
    tested = orders[:, n_cal:]
    covered = (true[tested] <= qhat[:, None]).mean(1)
    sizes = (scores[tested] <= qhat[:, None, None]).sum(2).mean(1)
    return {"set_size": float(sizes.mean()), "set_size_sd": float(sizes.std(ddof=1)) if resplits > 1 else 0.0,
            "coverage": float(covered.mean())}


def choose(
    setup: PruneSetup,
    *,
    ratio: float | None,
    target_flops: float | None,
    ignore: tuple[str, ...],
    bn_recalibrate: bool,
    batch_size: int,
    seed: int,
    reporter: Reporter = SILENT,
) -> dict[str, Any]:
    """Evaluate every candidate on the holdout part and put the winner's scores into ``setup``.

    Returns:
        The ``auto`` record: the winner, the split sizes and every candidate's figures.

    Raises:
        UsageError: the score data have no labels, or the holdout part is too small.
    """
    session = setup.session
    data = session.data
    if data is None:
        raise UsageError("{method} auto compares the candidates on the score data: pass {data}",
                         arguments={"method": "method", "data": "data"})
    data.require_labels(session.num_classes)
    if not any(u.role == "score" and u.sha256 == data.sha256 for u in setup.used):
        raise ScoresError("the auto scores were computed on other score data; pass the same --data to prune as to "
                          "score")
    params = setup.method_params
    split_seed = int(params.get("seed", seed))
    fit, holdout = auto_method.split(len(data), float(params.get("holdout", 0.4)), split_seed)
    fit_data, hold_data = data.subset(fit), data.subset(holdout)
    alpha = float(params.get("alpha", DEFAULTS["alpha"]))
    resplits = int(params.get("resplits", DEFAULTS["resplits"]))
    if not 0.0 < alpha < 1.0 or resplits < 1:
        raise UsageError(f"--opt alpha={alpha} must be in (0, 1) and --opt resplits={resplits} at least 1")
    dense_flops = count_flops(session.model, session.example)
    figures, allocated = [], {}
    all_scores = candidate_scores(setup)
    for name, scores in all_scores.items():
        with reporter.status(f"auto: pruning with {name}"):
            model = copy.deepcopy(session.model)
            graph = ModelGraph(model, session.example, ignore=ignore)
            flops_model = FlopsModel(model, graph.groups, flops_by_module(model, session.example))
            flops_model = flops_model if target_flops is not None else None
            keys, policy = allocate(graph.groups, scores, policy=setup.policy, allocation=setup.allocation,
                                    target_flops=target_flops, flops_model=flops_model, model=model, data=fit_data,
                                    batch_size=batch_size)
            allocated[name] = keys, policy
            removal = select(graph.groups, keys, policy=policy, ratio=ratio, target_flops=target_flops,
                             flops_model=flops_model)
            apply_removal(graph, removal)
            if bn_recalibrate:
                recalibrate_model(model, fit_data, device=session.device, batch_size=batch_size)
            logits, labels = collect_logits(model, hold_data, device=session.device, batch_size=batch_size,
                                            num_classes=session.num_classes)
        measured = resplit_set_size(logits, labels, alpha=alpha, resplits=resplits, seed=split_seed)
        figures.append({"method": name, "holdout_set_size": measured["set_size"],
                        "holdout_set_size_sd": measured["set_size_sd"], "holdout_coverage": measured["coverage"],
                        "holdout_accuracy": float((logits.argmax(1) == labels).double().mean()),
                        "flops_kept": count_flops(model, session.example) / dense_flops})
    best = min(range(len(figures)), key=lambda i: (figures[i]["holdout_set_size"], i))
    chosen = figures[best]["method"]
    setup.scores = all_scores[chosen]
    if setup.allocation.how != "rank":  # prune with the shares the winner was judged with (measured on the fit part)
        setup.scores, setup.policy = allocated[chosen]
        setup.allocation = Allocation()
    return {"chosen": chosen, "alpha": alpha, "resplits": resplits, "fit_examples": len(fit),
            "holdout_examples": len(holdout), "split_seed": split_seed, "candidates": figures}

