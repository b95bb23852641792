"""Scoring speed: ``cp-bruteforce`` against a plain per-channel loop, and every method's scoring cost.

The registry's ``cp-bruteforce`` (:mod:`prunecp_cli.importance.cp_bruteforce`) needs, for every
channel of every prunable group, the efficiency of a recalibrated split-conformal predictor with
that channel zeroed. It gets the logits from :class:`~prunecp_cli.surgery.masked.MaskedEvaluator`:
per batch the clean model runs once; per group only the layers *after* the group run, those whose
masked value is the clean value times the mask are not re-run at all, and the first dense
convolution after the group is computed from per-channel terms (one grouped convolution per batch)
instead of once per mask. The obvious alternative is a plain loop: gate one
channel to zero (:class:`~prunecp_cli.surgery.gates.ChannelGates`), re-run the *whole* model on all
the data, recompute the threshold and the efficiency; once per channel. This script runs both on the
same model and data, checks that they agree (max abs difference of the importances) and reports
the speed ratio measured in the same run.

The plain loop here is written independently of the method (gates + full forward passes; the LAC
threshold, mean set size and observed fuzziness computed directly from their definitions); it
splits the data into calibration and evaluation parts exactly as the method documents (a seeded
random ``cal-fraction`` of the rows). It mirrors ``plain_loop_cp_bruteforce`` of
``tests/importance/test_cp_bruteforce.py`` without importing from the tests.

Then every registry method (``prunecp_cli.importance.METHODS``) scores the same model on the same
data; times are wall-clock seconds and multiples of one plain forward pass over the data. The
expensive methods use the reduced settings of ``quality.py`` (:data:`quality.METHOD_SETTINGS`:
the options; here every method sees the same ``--samples`` examples).

Set-up: the ResNet-style model of ``common.py`` (trained on MNIST-5k's train split and cached; it is
trained here if missing), ``--samples`` (default 200) examples of the score split, α = 0.1, batch
128, 2 CPU threads. The machine may be shared: the load average is recorded, and the ratio of the
two cp-bruteforce implementations, measured back to back, is the figure to quote.

Run from the repository root (writes ``examples/benchmarks/results/scoring_speed.{json,md}``)::

    python examples/benchmarks/scoring_speed.py      # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import log  # noqa: E402

MODEL = "resnet_small"
ALPHA = 0.1
CAL_FRACTION = 0.5
BATCH_SIZE = 128
SEED = 0


def plain_efficiency(logits: torch.Tensor, labels: torch.Tensor, is_cal: torch.Tensor, *, alpha: float
                     ) -> dict[str, float]:
    """E of a LAC split-conformal predictor from scratch: set size, observed fuzziness and their mean.

    LAC score ``s(x, y) = 1 - softmax_y(x)`` (float64); threshold the ``ceil((n + 1)(1 - alpha))``-th
    smallest calibration score; set = labels with ``s <= threshold``; OF = mean over evaluation points
    of ``sum_{y != y_x} (#{i : s_i >= s(x, y)} + 1) / (n + 1)``.
    """
    scores = 1.0 - torch.softmax(logits.double(), dim=1)
    cal = scores[is_cal].gather(1, labels[is_cal][:, None]).squeeze(1)
    test, test_labels = scores[~is_cal], labels[~is_cal]
    n, m = len(cal), len(test)
    k = math.ceil((n + 1) * (1 - alpha))
    ordered = torch.sort(cal).values
    qhat = ordered[k - 1]
    size = float((test <= qhat).sum()) / m
    at_least = (cal[None, None, :] >= test[:, :, None]).sum(2)  # [m, K]: #{i : s_i >= s(x, y)}
    false = torch.ones_like(at_least, dtype=torch.bool)
    false[torch.arange(m), test_labels] = False
    fuzziness = float((at_least + 1)[false].sum()) / (m * (n + 1))
    return {"size-of": (size + fuzziness) / 2, "size": size, "of": fuzziness}


def plain_loop(model, groups, data, *, alpha: float, seed: int, cal_fraction: float, batch_size: int
               ) -> dict[str, torch.Tensor]:
    """Per channel: zero it with a gate and re-run the whole model on all of ``data``; E(off) − E(clean)."""
    from prunecp_cli.surgery.gates import ChannelGates

    rows = data.rows
    chosen = np.random.default_rng(seed).permutation(len(rows))[: round(cal_fraction * len(rows))]
    cal_rows = torch.from_numpy(rows[chosen])

    @torch.no_grad()
    def efficiency() -> float:
        logits, labels, index = [], [], []
        for batch in data.batches(batch_size):
            logits.append(model(batch.x))
            labels.append(batch.y)
            index.append(batch.index)
        index = torch.cat(index)
        return plain_efficiency(torch.cat(logits), torch.cat(labels), torch.isin(index, cal_rows),
                                alpha=alpha)["size-of"]

    out = {}
    with ChannelGates(model, groups) as gates:
        clean = efficiency()
        for group in groups:
            values = torch.zeros(group.channels, dtype=torch.float64)
            for channel in range(group.channels):
                mask = torch.ones(group.channels)
                mask[channel] = 0.0
                gates.set(group.name, mask)
                values[channel] = efficiency() - clean
            gates.set(group.name, None)
            out[group.name] = values
    return out


def context(model, graph, data, *, options: dict[str, Any] | None = None, max_samples: int | None = None):
    """An importance context as ``prunecp score`` builds it (CPU, one process)."""
    from prunecp_cli.importance.base import ImportanceContext

    return ImportanceContext(model=model, graph=graph, data=data, batch_size=BATCH_SIZE, seed=SEED,
                             max_samples=max_samples, options=dict(options or {}))


def timed(fn) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def forward_seconds(model, data, repeats: int = 5) -> float:
    """Median seconds of one plain forward pass over ``data`` (batches of :data:`BATCH_SIZE`)."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            for batch in data.batches(BATCH_SIZE):
                model(batch.x)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def markdown(report: dict[str, Any]) -> str:
    """The Markdown tables of a scoring-speed run."""
    s, run, bf = report["settings"], report["run"], report["cp_bruteforce"]
    fmt = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        "# Scoring speed",
        "",
        f"Generated by `{run['command']}` on {run['date']} (torch {run['torch']}, {run['torch_threads']} CPU "
        f"threads, {run['cpu_count']} cores; wall-clock {report['wall_seconds'] / 60:.1f} min; load average "
        f"{report['load_average']['start']} at the start, {report['load_average']['end']} at the end — the "
        "machine was shared, so absolute times are indicative).",
        "",
        f"* Model: `{s['model']}` ({s['channels']} prunable channels in {s['groups']} groups, {s['flops']} FLOPs, "
        f"dense test accuracy {s['dense_accuracy']:.3f}), trained on MNIST-5k's train split.",
        f"* Data: {s['samples']} examples of the score split (seeded subset), batch {s['batch_size']}; "
        f"cp-bruteforce: α = {s['alpha']}, {s['cal_fraction']:.0%} of them calibrate, the rest measure "
        "E = (mean set size + observed fuzziness) / 2.",
        f"* One plain forward pass over the {s['samples']} examples: {report['forward_seconds'] * 1000:.1f} ms "
        "(median of 5).",
        "",
        "## cp-bruteforce: registry vs plain loop",
        "",
        common.markdown_table(
            ["implementation", "seconds", "forward passes", "speed-up"],
            [["registry (prefix reuse, masked values, linear first convolution)", fmt(bf["registry_seconds"]),
              fmt(bf["registry_seconds"] / report["forward_seconds"], 0), fmt(bf["speedup"], 1) + "×"],
             ["plain loop (whole model once per channel)", fmt(bf["plain_seconds"]),
              fmt(bf["plain_seconds"] / report["forward_seconds"], 0), "1.0×"]]),
        "",
        f"Each implementation ran {len(bf['registry_runs'])} times, alternating, and the table compares the faster "
        f"run of each (registry {', '.join(fmt(t) for t in bf['registry_runs'])} s; plain loop "
        f"{', '.join(fmt(t) for t in bf['plain_runs'])} s; the speed-up over every registry/plain pair lies in "
        f"{bf['speedup_range'][0]:.1f}–{bf['speedup_range'][1]:.1f}×). "
        f"The plain loop runs {bf['plain_forward_passes']} full forward passes (clean + one per channel). "
        f"Agreement: max |registry − plain| = {bf['max_abs_diff']:.2e} over {s['channels']} importances "
        f"(scale: max |importance| = {bf['max_abs_importance']:.3f}); ranking agreement "
        f"(Spearman) {bf['spearman']:.6f}.",
        "",
        "## Every method on the same data",
        "",
        common.markdown_table(
            ["method", "options", "seconds", "forward passes"],
            [[m["method"], ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "defaults",
              fmt(m["seconds"]) if "error" not in m else "error: " + m["error"][:60],
              fmt(m["seconds"] / report["forward_seconds"], 0) if "error" not in m else ""]
             for m in report["methods"]]),
        "",
        "Forward passes = seconds / one plain forward pass over the same examples. Data-free methods (l1, l2, "
        "random) only read weights. shapley plays its game on these examples too (its own default is 128).",
        "",
    ]
    return "\n".join(lines)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> np.ndarray:
        values = x.numpy()
        order = values.argsort(kind="stable")
        r = np.empty(len(values))
        r[order] = np.arange(len(values))
        for v in np.unique(values):  # average ranks of ties
            tied = values == v
            r[tied] = r[tied].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main(argv: list[str] | None = None) -> None:
    """Time cp-bruteforce against the plain loop and every method; write scoring_speed.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=common.DEFAULT_RESULTS, help="results folder")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_OUT, help="scratch folder (splits, checkpoints)")
    parser.add_argument("--samples", type=int, default=200, help="score examples every method uses")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed runs of each cp-bruteforce implementation (alternating; the faster of each is compared)")
    args = parser.parse_args(argv)
    common.set_threads()
    from quality import METHOD_SETTINGS

    from prunecp_cli import api
    from prunecp_cli import importance as registry
    from prunecp_cli.io.data import open_dataset
    from prunecp_cli.measure import count_flops
    from prunecp_cli.runtime import seed_everything
    from prunecp_cli.surgery.groups import ModelGraph
    from prunecp_cli.training import accuracy

    start, load_start = time.perf_counter(), os.getloadavg()
    splits = common.make_splits(args.work)
    dense, train_record = common.dense_model(MODEL, splits, args.work)
    model = api.load_model(dense)
    xt, yt = common.load_split(splits["test"])
    example = torch.zeros(1, *common.INPUT_SHAPE)
    graph = ModelGraph(model, example)
    groups = graph.groups
    data = context(model, graph, open_dataset(splits["score"]), max_samples=args.samples).dataset()
    channels = sum(g.channels for g in groups)
    report: dict[str, Any] = {
        "settings": {"model": MODEL, "samples": len(data), "batch_size": BATCH_SIZE, "alpha": ALPHA,
                     "cal_fraction": CAL_FRACTION, "seed": SEED, "groups": len(groups), "channels": channels,
                     "flops": count_flops(model, example), "dense_accuracy": accuracy(model, xt, yt),
                     "train": train_record, "method_settings": {k: v["options"] for k, v in METHOD_SETTINGS.items()}},
        "run": common.run_record(sys.argv),
    }
    report["forward_seconds"] = forward_seconds(model, data)
    log(f"{MODEL}: {channels} channels in {len(groups)} groups; {len(data)} examples; one forward pass "
        f"{report['forward_seconds'] * 1000:.1f} ms")

    # the plain loop is the one-shot, single-split estimator (the registry's default is greedy over re-splits)
    bf_options = {"alpha": ALPHA, "cal-fraction": CAL_FRACTION, "schedule": "one-shot", "resplits": 1,
                  "measure": "size-of"}
    registry_runs, plain_runs, registry_scores, plain_scores = [], [], None, None
    for i in range(args.repeats):  # alternate, so both see the same machine load
        log(f"cp-bruteforce (registry), run {i + 1}/{args.repeats}")
        seed_everything(SEED)
        registry_scores, seconds = timed(lambda: registry.create("cp-bruteforce")(
            context(model, graph, data, options=bf_options)))
        registry_runs.append(seconds)
        log(f"  {seconds:.2f} s")
        log(f"cp-bruteforce (plain loop: {channels + 1} full forward passes), run {i + 1}/{args.repeats}")
        plain_scores, seconds = timed(lambda: plain_loop(model, groups, data, alpha=ALPHA, seed=SEED,
                                                         cal_fraction=CAL_FRACTION, batch_size=BATCH_SIZE))
        plain_runs.append(seconds)
        log(f"  {seconds:.2f} s")
    reg = torch.cat([registry_scores[g.name].double() for g in groups])
    ref = torch.cat([plain_scores[g.name] for g in groups])
    diff = float((reg - ref).abs().max())
    report["cp_bruteforce"] = {
        "registry_runs": registry_runs, "registry_seconds": min(registry_runs), "plain_runs": plain_runs,
        "plain_seconds": min(plain_runs), "plain_forward_passes": channels + 1,
        "speedup": min(plain_runs) / min(registry_runs),
        "speedup_range": [min(plain_runs) / max(registry_runs), max(plain_runs) / min(registry_runs)],
        "max_abs_diff": diff, "max_abs_importance": float(ref.abs().max()), "spearman": spearman(reg, ref),
        "per_group_max_abs_diff": {g.name: float((registry_scores[g.name].double() - plain_scores[g.name]).abs().max())
                                   for g in groups},
    }
    log(f"max abs diff {diff:.2e}; speed-up {report['cp_bruteforce']['speedup']:.1f}×")

    report["methods"] = []
    for method in registry.METHODS:
        options = dict(METHOD_SETTINGS.get(method, {}).get("options", {}))
        log(f"timing {method} {options or ''}")
        filled = {**{k: d for k, (d, _) in registry.info(method).options.items()}, **options}
        seed_everything(SEED)
        record: dict[str, Any] = {"method": method, "options": options}
        try:
            _, record["seconds"] = timed(lambda: registry.create(method)(  # noqa: B023
                context(model, graph, data, options=filled)))  # noqa: B023
            log(f"  {record['seconds']:.2f} s")
        except Exception as exc:
            record["error"] = f"{type(exc).__name__}: {exc}"
            log(f"  FAILED: {record['error']}")
        report["methods"].append(record)
    report["wall_seconds"] = time.perf_counter() - start
    report["load_average"] = {"start": [round(v, 2) for v in load_start],
                              "end": [round(v, 2) for v in os.getloadavg()]}
    common.write_json(args.out / "scoring_speed.json", report)
    (args.out / "scoring_speed.md").write_text(markdown(report), encoding="utf-8")
    print((args.out / "scoring_speed.md").read_text(encoding="utf-8"))
    log(f"wrote {args.out / 'scoring_speed.json'} and scoring_speed.md; total {report['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
