"""torchrun with 2 gloo processes on CPU gives the results of a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from testsupport import load_npz

from prunecp_cli import api, load_model
from prunecp_cli.io.checkpoint import open_model
from prunecp_cli.training import accuracy


def _torchrun(*args, timeout=300):
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "prunecp_cli",
         *map(str, args), "--device", "cpu", "--quiet"],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_distributed_score_equals_single_process(tmp_path, trained_digits, digits_files):
    out = tmp_path / "dist.json"
    _torchrun("score", trained_digits["safetensors"], "--method", "taylor", "--data", digits_files["score"],
              "--batch-size", "32", "-o", out)
    single = api.score(trained_digits["safetensors"], digits_files["score"], method="taylor",
                       run=api.RunOptions(device="cpu", batch_size=32))
    both = json.loads(out.read_text())
    assert [g["name"] for g in both["groups"]] == [g.name for g in single.groups]
    for theirs, ours in zip(both["groups"], single.groups, strict=True):
        assert theirs["importance"] == pytest.approx(ours.importance, rel=1e-5, abs=1e-9)


def test_distributed_prune_equals_single_process(tmp_path, trained_digits, digits_files):
    out = tmp_path / "dist.safetensors"
    args = dict(method="taylor", data=digits_files["score"], pruning=api.PruneOptions(target_flops=0.5))
    _torchrun("prune", trained_digits["safetensors"], "--method", "taylor", "--data", digits_files["score"],
              "--target-flops", "0.5", "--batch-size", "32", "-o", out)
    single_path = tmp_path / "single.safetensors"
    api.prune(trained_digits["safetensors"], single_path, run=api.RunOptions(device="cpu", batch_size=32), **args)
    dist_model, single_model = open_model(out), open_model(single_path)
    assert dist_model.meta.plan["groups"] == single_model.meta.plan["groups"]
    a, b = dist_model.model.state_dict(), single_model.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # BatchNorm statistics are sums over ranks: equal up to summation order
        assert torch.allclose(a[key].double(), b[key].double(), rtol=1e-5, atol=1e-6), key


def test_distributed_fine_tuning_runs_with_ddp(tmp_path, trained_digits, digits_files):
    out = tmp_path / "ddp.safetensors"
    _torchrun("prune", trained_digits["safetensors"], "--method", "l1", "--target-flops", "0.5", "--data",
              digits_files["score"], "--finetune-data", digits_files["train"], "--epochs", "3",
              "--finetune-batch-size", "64", "-o", out)
    x, y = load_npz(digits_files["test"])
    extra = open_model(out).meta.extra
    assert extra["finetune"]["epochs"] == 3 and len(extra["schedule"]) == 1
    assert accuracy(load_model(out), x, y) > 0.8
