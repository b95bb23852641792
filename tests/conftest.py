"""Shared fixtures: real data (scikit-learn digits), a trained CNN, and CLI helpers.

Everything is built on the fly from data shipped inside scikit-learn; nothing is downloaded.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no busy-waiting on shared cores

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

FIXTURES = Path(__file__).parent / "fixtures"
if str(FIXTURES) not in sys.path:
    sys.path.insert(0, str(FIXTURES))

from testsupport import CliResult, assert_one_line_error, load_npz  # noqa: E402,F401  (re-exported)

DIGITS_ARCH = "prunecp_cli.models:digits_cnn"


@pytest.fixture(scope="session")
def digits_arrays():
    """Digits as float32 [N,1,8,8] and int64 labels."""
    from prunecp_cli.datasets import digits

    return digits()


@pytest.fixture(scope="session")
def digits_files(tmp_path_factory, digits_arrays):
    """Disjoint train/score/calib/test .npz files of the digits (paths by name)."""
    from prunecp_cli.datasets import write_splits

    x, y = digits_arrays
    folder = tmp_path_factory.mktemp("digits")
    return write_splits(x, y, folder, {"train": 0.5, "score": 0.2, "calib": 0.15, "test": 0.15}, seed=0)


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory, digits_files):
    """A DigitsCNN trained on the train split, saved as a plain .pt state dict and a prunecp file.

    Returns a dict with ``pt``, ``safetensors``, ``model`` and ``accuracy`` (on the test split).
    """
    from prunecp_cli.io.checkpoint import ModelMeta, save_model
    from prunecp_cli.models import digits_cnn
    from prunecp_cli.training import accuracy, train_classifier

    torch.manual_seed(0)
    x, y = load_npz(digits_files["train"])
    model = train_classifier(digits_cnn(), x, y, epochs=25, seed=0)
    folder = tmp_path_factory.mktemp("model")
    pt = folder / "dense.pt"
    torch.save(model.state_dict(), pt)
    st = folder / "dense.safetensors"
    save_model(model, st, ModelMeta(arch=DIGITS_ARCH, arch_kwargs={}, input_shape=[1, 8, 8]))
    xt, yt = load_npz(digits_files["test"])
    return {"pt": pt, "safetensors": st, "model": model, "accuracy": accuracy(model, xt, yt)}


@pytest.fixture
def cli(monkeypatch):
    """Run ``prunecp ARGS`` in-process; returns a :class:`CliResult`."""
    from typer.testing import CliRunner

    from prunecp_cli.app import app

    runner = CliRunner()

    def run(*args, cwd: Path | None = None) -> CliResult:
        if cwd is not None:
            monkeypatch.chdir(cwd)
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


