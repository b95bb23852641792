"""What cp-bruteforce's greedy schedule costs, against taylor and the one-shot estimator.

Times ``api.score`` on one of the benchmark models (cached under ``--work``, trained on first use) on
``--samples`` examples of MNIST-5k's score split: ``taylor``, ``cp-bruteforce`` one-shot on one split
(the former default), one-shot averaged over the default re-splits, and the greedy schedule (the default) in
local and global scope. Wall-clock seconds on a possibly shared machine; the load average is printed.

Run from the repository root::

    nice python examples/benchmarks/cp_greedy_cost.py --work /tmp/prunecp-cost --samples 200 1000
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = (
    ("taylor", {}),
    ("cp-bruteforce", {"schedule": "one-shot", "resplits": 1, "measure": "size-of"}),
    ("cp-bruteforce", {"schedule": "one-shot"}),
    ("cp-bruteforce", {"scope": "local"}),
    ("cp-bruteforce", {"scope": "global"}),
)


def main(argv: list[str] | None = None) -> None:
    """Time every variant and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=common.DEFAULT_OUT)
    parser.add_argument("--model", default="resnet_small", choices=common.MODELS)
    parser.add_argument("--samples", nargs="+", type=int, default=[200, 1000])
    args = parser.parse_args(argv)
    common.set_threads()
    from prunecp_cli import api

    splits = common.make_splits(args.work)
    dense, _ = common.dense_model(args.model, splits, args.work)
    rows = []
    for samples in args.samples:
        for method, options in VARIANTS:
            start = time.perf_counter()
            api.score(dense, api.DataSource(splits["score"], max_samples=samples), method=method, options=options)
            seconds = time.perf_counter() - start
            rows.append([args.model, samples, method, " ".join(f"{k}={v}" for k, v in options.items()) or "defaults",
                         round(seconds, 1)])
            common.log(f"{rows[-1]} (load {os.getloadavg()[0]:.1f})")
    print(common.markdown_table(["model", "samples", "method", "options", "seconds"], rows))


if __name__ == "__main__":
    main()
