"""How much does the ``cluster`` method's cosine feature matter? (algorithms.md §4(d))

MCICP describes each channel by the mean, the variance and the cosine distance to the unit direction.
Computed on one filter's weights, the cosine is a function of the other two
(``cos(w, 1) = mu / sqrt(mu**2 + sigma2)``), so prunecp computes it from the channel's mean
activation map instead (``--opt cosine-source=activation``, the default). This script measures the
difference between the two variants on the digits CNN (scikit-learn's digits, the tests' setting):

* per group, the Spearman correlation of the two variants' importances and the share of channels
  both variants remove at the target;
* for each variant, the accuracy and the conformal mean set size at alpha 0.1 of the pruned model
  (calibrated on the calibration split, measured on the test split).

Both variants use the same seed, the same DE budget and the same FLOPs target. Run (CPU, about a
minute; needs ``pip install 'prunecp[demo]'``)::

    python examples/cluster_cosine_digits.py [--keep 0.5] [--population 8] [--generations 6]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from prunecp_cli import api
from prunecp_cli.datasets import digits, write_splits
from prunecp_cli.io.checkpoint import ModelMeta, open_model, save_model
from prunecp_cli.models import digits_cnn
from prunecp_cli.training import train_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5, help="fraction of dense FLOPs kept")
    parser.add_argument("--population", type=int, default=8, help="DE population")
    parser.add_argument("--generations", type=int, default=6, help="DE generations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    start = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="prunecp-cosine-"))
    x, y = digits()
    files = write_splits(x, y, folder, {"train": 0.5, "score": 0.2, "calib": 0.15, "test": 0.15}, seed=0)
    with np.load(files["train"]) as train:
        torch.manual_seed(0)
        model = train_classifier(digits_cnn(), torch.from_numpy(train["x"]), torch.from_numpy(train["y"]),
                                 epochs=25, seed=0)
    dense = folder / "dense.safetensors"
    save_model(model, dense, ModelMeta(arch="prunecp_cli.models:digits_cnn", arch_kwargs={}, input_shape=[1, 8, 8]))

    tables, rows = {}, []
    for source in ("activation", "weight"):
        options = {"cosine-source": source, "keep": args.keep, "population": args.population,
                   "generations": args.generations}
        table = api.score(dense, files["score"], method="cluster", options=options,
                          run=api.RunOptions(device="cpu", seed=args.seed))
        tables[source] = {g.name: np.asarray(g.importance) for g in table.groups}
        scores = folder / f"importance-{source}.json"
        scores.write_text(json.dumps(table.to_json()), encoding="utf-8")
        pruned = folder / f"pruned-{source}.safetensors"
        on_cpu = api.RunOptions(device="cpu")
        result = api.prune(dense, pruned, scores=scores, data=files["score"],
                           pruning=api.PruneOptions(target_flops=args.keep), run=on_cpu)
        cert_path = folder / f"certificate-{source}.json"
        api.calibrate(pruned, files["calib"], alpha=0.1, output=cert_path, run=on_cpu)
        verdict = api.certify(pruned, files["test"], cert=cert_path, run=on_cpu)
        cut = {name: set(group["removed"]) for name, group in open_model(pruned).meta.plan["groups"].items()}
        rows.append((source, result.flops_ratio, verdict, cut))

    print(f"digits CNN, cluster at {args.keep:.2f} of dense FLOPs, DE population {args.population}, "
          f"{args.generations} generations, seed {args.seed}")
    removed = {source: sets for source, _, _, sets in rows}
    print(f"{'group':<14} {'channels':>8} {'spearman':>9} {'removed by both / either':>25}")
    for name, act in tables["activation"].items():
        rho = spearmanr(act, tables["weight"][name])[0]
        both = removed["activation"].get(name, set()) & removed["weight"].get(name, set())
        either = removed["activation"].get(name, set()) | removed["weight"].get(name, set())
        print(f"{name:<14} {act.size:>8} {rho:>9.3f} {len(both):>12} / {len(either):<10}")
    print(f"{'cosine source':<14} {'FLOPs kept':>10} {'accuracy':>9} {'coverage':>9} {'set size':>9}")
    for source, flops, verdict, _ in rows:
        print(f"{source:<14} {flops:>10.3f} {verdict['top1_accuracy']:>9.3f} {verdict['coverage']:>9.3f} "
              f"{verdict['mean_set_size']:>9.3f}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
