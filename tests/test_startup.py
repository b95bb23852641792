"""`prunecp --help` must not import torch (or other heavy libraries)."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "torchvision", "numpy", "fvcore", "safetensors", "torch_pruning", "scipy")

PROBE = """
import sys
from prunecp_cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"], ["prune", "--help"], ["report", "--help"],
                                  ["demo", "--help"], ["calibrate", "--help"], ["certify", "--help"],
                                  ["predict", "--help"], ["--version"]])
def test_help_imports_no_heavy_module(args):
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, out.stdout[-300:]
    assert "Usage" in out.stdout or "prunecp" in out.stdout


def test_console_script_help_runs():
    out = subprocess.run(["prunecp", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("score", "prune", "calibrate", "certify", "predict", "report", "demo"):
        assert command in out.stdout
