"""`prunecp --help` must not import torch (or other heavy libraries)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from prunecp_cli import __version__

HEAVY = ("torch", "torchvision", "numpy", "fvcore", "safetensors", "torch_pruning", "scipy", "onnx", "onnxruntime",
         "onnxscript", "matplotlib")

PROBE = """
import sys
from prunecp_cli.app import app
try:
    app(sys.argv[1:], prog_name="prunecp")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"], ["prune", "--help"], ["report", "--help"],
                                  ["demo", "--help"], ["calibrate", "--help"], ["certify", "--help"],
                                  ["predict", "--help"], ["export", "--help"], ["compress", "--help"],
                                  ["--version"]])
def test_help_imports_no_heavy_module(args):
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout, out.stdout[-300:]
    printed = out.stdout[: out.stdout.index("HEAVY=")]
    if args == ["--version"]:
        assert printed == f"prunecp {__version__}\n", printed
    else:  # the help of the command asked for, not some other text that mentions prunecp
        usage = " ".join(["Usage: prunecp", *args[:-1], r"\[OPTIONS\]"])
        assert re.search(rf"^\s*{usage}", printed, re.MULTILINE), printed[:300]


def test_console_script_help_runs():
    out = subprocess.run(["prunecp", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("score", "prune", "calibrate", "certify", "predict", "report", "demo"):
        assert command in out.stdout
