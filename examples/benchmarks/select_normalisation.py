"""Which per-group normalisation should global selection use? A reduced quality run per candidate.

Global selection ranks the channels of all groups together after putting each group's scores on a
shared scale (:func:`prunecp_cli.surgery.select.normalised`). This script scores each model once per
method (``quality.score_method``), then prunes to each FLOPs budget in global scope once per candidate
normalisation (``quality.prune_row``: BatchNorm re-estimated on the score split, LAC at α = 0.1
calibrated and measured over ``--draws`` calib/test re-splits) and prints the mean set size and
accuracy of every (model, budget, method, normalisation), and each normalisation's mean over them.

Run from the repository root (a reduced run: about 5 minutes on 2 shared cores)::

    nice python examples/benchmarks/select_normalisation.py --work /tmp/prunecp-norm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import quality  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=common.DEFAULT_OUT, help="scratch folder (models are cached)")
    parser.add_argument("--models", nargs="+", default=["vgg_small", "resnet_small"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--methods", nargs="+", default=["l1", "taylor", "cp-taylor"])
    parser.add_argument("--candidates", nargs="+", default=["mean-abs", "standard", "rank"])
    parser.add_argument("--draws", type=int, default=100, help="calib/test re-splits per row")
    parser.add_argument("--opt", nargs="*", default=[], metavar="METHOD:KEY=VALUE",
                        help="method options over quality.METHOD_SETTINGS, e.g. cp-bruteforce:schedule=one-shot")
    args = parser.parse_args(argv)
    common.set_threads()
    from prunecp_cli.surgery import select

    original = select.normalised
    splits = common.make_splits(args.work)
    rows, totals = [], {c: [] for c in args.candidates}
    for name in args.models:
        dense, _ = common.dense_model(name, splits, args.work)
        folder = args.work / "normalisation" / name
        folder.mkdir(parents=True, exist_ok=True)
        dense_flops = quality.evaluate(dense, splits, folder / "dense.cert.json", draws=args.draws)["flops"]
        for method in args.methods:
            settings = dict(quality.METHOD_SETTINGS.get(method, {}))
            extra = dict(o.split(":", 1)[1].split("=", 1) for o in args.opt if o.split(":", 1)[0] == method)
            settings["options"] = {**settings.get("options", {}), **extra}
            scoring = quality.score_method(dense, method, splits, folder, settings)
            for budget in args.budgets:
                for how in args.candidates:
                    (folder / how).mkdir(exist_ok=True)
                    select.normalised = lambda scores, asked=None, how=how: original(scores, "none" if asked == "none" else how)
                    row = quality.prune_row(dense, scoring["path"], splits, folder / how, model=name, method=method,
                                            budget=budget, scope="global", scoring=scoring,
                                            dense_flops=dense_flops, draws=args.draws)
                    size = row.get("resplit", {}).get("set_size_mean")
                    rows.append([name, budget, method, how, size, row.get("accuracy"), row.get("flops_kept")])
                    if size is not None:
                        totals[how].append(size)
                    common.log(f"{name} {budget} {method} {how}: size {size} acc {row.get('accuracy')}")
    select.normalised = original
    print(common.markdown_table(["model", "FLOPs", "method", "normalisation", "set size", "accuracy", "FLOPs kept"],
                                rows))
    print(common.markdown_table(["normalisation", "mean set size", "rows"],
                                [[h, sum(v) / len(v) if v else None, len(v)] for h, v in totals.items()]))


if __name__ == "__main__":
    main()
