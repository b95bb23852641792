"""How groups share a FLOPs target: equal shares (``--allocation rank``) against measured ones, one-shot.

For each model, method, budget and allocation setting: prune the benchmark's dense model (global scope,
top 10 % of each group protected) on the score split, re-estimate BatchNorm there, and print the mean LAC
set size (α 0.1) over 500 random half/half re-splits of the 1,500 calib ∪ test images, the test accuracy
on them, the FLOPs kept, the seconds the allocation took and the channels removed per group. An
allocation setting is ``rank``, ``measured`` or ``measured`` with ``:full`` (every candidate re-measured
every round, not the lazy search), ``:eN`` (N examples) or ``:sF`` (a share F of a group per round).
``--opt KEY=VALUE`` passes an option to every method given::

    python examples/benchmarks/allocation_probe.py --models resnet_small --methods taylor \\
        --budgets 0.5 0.3 --allocations rank measured measured:full
    python examples/benchmarks/allocation_probe.py --methods shapley --budgets 0.5 --allocations rank --opt depth=0.5

Uses (and, when missing, trains) the models and splits of ``common.py`` under ``examples/benchmarks/out``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parse_allocation(text: str):
    """``measured:full:e128:s0.1`` → an :class:`~prunecp_cli.pipeline.allocation.Allocation`."""
    from prunecp_cli.pipeline.allocation import Allocation

    how, *flags = text.split(":")
    kwargs = {}
    for flag in flags:
        if flag == "full":
            kwargs["lazy"] = False
        elif flag.startswith("e"):
            kwargs["examples"] = int(flag[1:])
        elif flag.startswith("s"):
            kwargs["step"] = float(flag[1:])
        else:
            raise SystemExit(f"unknown allocation flag {flag!r} in {text!r}")
    return Allocation(how, **kwargs)


def parse_options(method: str, pairs: list[str]) -> dict:
    """``["depth=0.5"]`` → ``{"depth": 0.5}``, typed as the method's defaults are."""
    from prunecp_cli import importance as registry

    defaults = {key: default for key, (default, _) in registry.info(method).options.items()}
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in defaults:
            raise SystemExit(f"--opt {key}: {method} has no such option ({', '.join(defaults)})")
        kind = type(defaults[key])
        options[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(common.MODELS))
    parser.add_argument("--methods", nargs="+", default=["taylor"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--allocations", nargs="+", default=["rank", "measured"])
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                        help="a method option, as prune's --opt (e.g. depth=0.5 for shapley)")
    parser.add_argument("--max-samples", type=int, default=None, help="score examples the methods use (default all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="scoring seeds (--seed of prune)")
    parser.add_argument("--work", type=Path, default=common.DEFAULT_OUT)
    args = parser.parse_args(argv)
    common.set_threads()
    import torch

    from prunecp_cli.io.data import open_dataset
    from prunecp_cli.measure import count_flops, flops_by_module
    from prunecp_cli.options import DataSource, ModelSource, RunOptions
    from prunecp_cli.pipeline.allocation import allocate
    from prunecp_cli.pipeline.auto import resplit_set_size
    from prunecp_cli.pipeline.inference import collect_logits
    from prunecp_cli.pipeline.setup import prepare, recalibrate_model
    from prunecp_cli.surgery.groups import ModelGraph
    from prunecp_cli.surgery.plan import apply_removal
    from prunecp_cli.surgery.select import FlopsModel, Policy, select

    splits = common.make_splits(args.work)
    held_out = args.work / "data" / "calib+test.npz"
    if not held_out.is_file():
        parts = [np.load(splits[name]) for name in ("calib", "test")]
        np.savez(held_out, x=np.concatenate([p["x"] for p in parts]), y=np.concatenate([p["y"] for p in parts]))
    cpu = torch.device("cpu")
    for name in args.models:
        dense, _ = common.dense_model(name, splits, args.work)
        for method, seed in ((m, s) for m in args.methods for s in args.seeds):
            scoring = time.perf_counter()
            setup = prepare(ModelSource(dense), method=method, options=parse_options(method, args.opt),
                            data=DataSource(splits["score"], max_samples=args.max_samples),
                            policy=Policy(scope="global", protect=0.1), run=RunOptions(device="cpu", seed=seed))
            print(f"{name} {method} seed {seed}: scored in {time.perf_counter() - scoring:.1f} s", flush=True)
            for budget in args.budgets:
                for text in args.allocations:
                    model = copy.deepcopy(setup.session.model)
                    graph = ModelGraph(model, setup.session.example)
                    flops = FlopsModel(model, graph.groups, flops_by_module(model, setup.session.example))
                    start = time.perf_counter()
                    keys, policy = allocate(graph.groups, setup.scores, policy=setup.policy,
                                            allocation=parse_allocation(text), target_flops=budget, flops_model=flops,
                                            model=model, data=setup.session.data)
                    removal = select(graph.groups, keys, policy=policy, target_flops=budget, flops_model=flops)
                    seconds = time.perf_counter() - start
                    apply_removal(graph, removal)
                    recalibrate_model(model, open_dataset(splits["score"]), device=cpu, batch_size=128)
                    logits, labels = collect_logits(model, open_dataset(held_out), device=cpu, batch_size=256,
                                                    num_classes=10)
                    size = resplit_set_size(logits, labels, alpha=0.1, resplits=500, seed=1)["set_size"]
                    accuracy = float((logits.argmax(1) == labels).double().mean())
                    kept = count_flops(model, setup.session.example) / setup.flops_before
                    print(f"{name} {method} seed {seed} {budget} {text}: set size {size:.3f}, accuracy {accuracy:.3f}, FLOPs kept "
                          f"{kept:.3f}, allocation {seconds:.1f} s, removed per group "
                          f"{[len(v) for v in removal.values()]}", flush=True)


if __name__ == "__main__":
    main()
