"""``pipeline/session.py``: a model and its data opened together, the example input, and their fit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prunecp_cli.errors import DataError, UsageError
from prunecp_cli.options import DataSource, ModelSource
from prunecp_cli.pipeline.session import open_source

ARCH = "prunecp_cli.models:digits_cnn"


def _open(model: ModelSource, data=None, **options):
    """The session for ``model`` and ``data`` (a path) on the CPU."""
    return open_source(model, DataSource.of(data), device="cpu", **options)


def _npz(folder, name, x, y=None):
    path = folder / name
    np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    return path


def test_prunecp_file_without_data_traces_a_zero_example_of_its_recorded_shape(trained_digits):
    session = _open(ModelSource(trained_digits["safetensors"]))
    assert session.data is None and session.num_classes == 10 and session.device == torch.device("cpu")
    assert torch.equal(session.example, torch.zeros(1, 1, 8, 8)) and session.input_shape == [1, 8, 8]
    assert not session.model.training


def test_dense_checkpoint_with_data_takes_its_first_example(trained_digits, digits_files):
    session = _open(ModelSource(trained_digits["pt"], arch=ARCH), digits_files["score"])
    x = np.load(digits_files["score"])["x"]
    assert torch.equal(session.example, torch.from_numpy(x[:1])) and len(session.data) == len(x)
    assert session.num_classes == 10
    assert session.loaded.meta.input_shape == [1, 8, 8]  # learnt from the data, recorded on save
    assert session.used_data() == []


def test_dense_checkpoint_needs_data_or_an_input_shape(trained_digits):
    # the API names its arguments; the command line shows them as --data and --input-shape
    with pytest.raises(UsageError, match="cannot tell the model's input shape: pass data, or input_shape C,H,W"):
        _open(ModelSource(trained_digits["pt"], arch=ARCH))
    session = _open(ModelSource(trained_digits["pt"], arch=ARCH, input_shape=[1, 8, 8]))
    assert session.example.shape == (1, 1, 8, 8) and session.num_classes == 10


def test_a_dense_model_with_other_outputs_counts_its_classes(trained_digits, tmp_path):
    from prunecp_cli.models import digits_cnn

    path = tmp_path / "four.pt"
    torch.save(digits_cnn(num_classes=4).state_dict(), path)
    session = _open(ModelSource(path, arch=ARCH, arch_kwargs={"num_classes": 4}, input_shape=[1, 8, 8]))
    assert session.num_classes == 4


def test_data_of_another_shape_than_the_file_records(trained_digits, tmp_path):
    path = _npz(tmp_path, "big.npz", np.zeros((4, 1, 16, 16), np.float32), np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"examples have shape \[1, 16, 16\], but the model was built for \[1, 8, 8\]"):
        _open(ModelSource(trained_digits["safetensors"]), path)


def test_data_the_dense_model_cannot_run_on(trained_digits, tmp_path):
    path = _npz(tmp_path, "rgb.npz", np.zeros((4, 3, 8, 8), np.float32), np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"rgb\.npz: the model cannot run on inputs of shape \[3, 8, 8\] .*channel"):
        _open(ModelSource(trained_digits["pt"], arch=ARCH), path)


def test_empty_data(trained_digits, tmp_path):
    path = _npz(tmp_path, "empty.npz", np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64))
    with pytest.raises(DataError, match=r"empty\.npz holds no examples"):
        _open(ModelSource(trained_digits["safetensors"]), path)


def test_labels_are_checked_against_the_model_classes(trained_digits, tmp_path):
    path = _npz(tmp_path, "labels.npz", np.zeros((4, 1, 8, 8), np.float32), np.array([0, 3, 10, 12]))
    with pytest.raises(DataError, match=r"labels range over 0\.\.12, but the model has 10 classes \(0\.\.9\)"):
        _open(ModelSource(trained_digits["safetensors"]), path)


def test_labels_needed(trained_digits, tmp_path):
    unlabelled = _npz(tmp_path, "x.npz", np.zeros((4, 1, 8, 8), np.float32))
    assert _open(ModelSource(trained_digits["safetensors"]), unlabelled).data.has_labels is False
    with pytest.raises(DataError, match=r"x\.npz has no labels"):
        _open(ModelSource(trained_digits["safetensors"]), unlabelled, need_labels=True)
    with pytest.raises(UsageError, match="needs labelled data: pass data"):
        _open(ModelSource(trained_digits["safetensors"]), need_labels=True)
