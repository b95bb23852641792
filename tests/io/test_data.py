"""Data files: formats, memory-mapping, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prunecp_cli.errors import DataError
from prunecp_cli.io.data import Preprocess, open_dataset


def _collect(dataset, batch_size=7):
    xs, ys, idx = [], [], []
    for batch in dataset.batches(batch_size):
        xs.append(batch.x)
        ys.append(batch.y)
        idx.append(batch.index)
    return torch.cat(xs), torch.cat(ys), torch.cat(idx)


def test_npz_uncompressed_is_memory_mapped_and_uint8_scaled(tmp_path, digits_arrays):
    x, y = digits_arrays
    pixels = np.round(x * 255).astype(np.uint8)
    np.savez(tmp_path / "d.npz", x=pixels, y=y)
    dataset = open_dataset(tmp_path / "d.npz")
    assert isinstance(dataset._x, np.memmap)
    xs, ys, idx = _collect(dataset)
    assert torch.equal(ys, torch.from_numpy(y)) and torch.equal(idx, torch.arange(len(y)))
    assert torch.allclose(xs, torch.from_numpy(pixels.astype(np.float32) / 255))


def test_compressed_npz_and_three_dim_input(tmp_path, digits_arrays):
    x, y = digits_arrays
    np.savez_compressed(tmp_path / "d.npz", x=x[:, 0], y=y)
    dataset = open_dataset(tmp_path / "d.npz")
    xs, _, _ = _collect(dataset.subset(np.arange(10)))
    assert xs.shape == (10, 1, 8, 8) and torch.equal(xs, torch.from_numpy(x[:10]))


def test_tensor_files(tmp_path, digits_arrays):
    x, y = digits_arrays
    save_file({"x": torch.from_numpy(x[:50]), "y": torch.from_numpy(y[:50])}, str(tmp_path / "d.safetensors"))
    torch.save({"x": torch.from_numpy(x[:50]), "y": torch.from_numpy(y[:50])}, tmp_path / "d.pt")
    for name in ("d.safetensors", "d.pt"):
        xs, ys, _ = _collect(open_dataset(tmp_path / name))
        assert torch.equal(xs, torch.from_numpy(x[:50])) and torch.equal(ys, torch.from_numpy(y[:50]))


def test_image_folder_streams_with_resize_and_normalisation(tmp_path, digits_arrays):
    from PIL import Image

    x, y = digits_arrays
    for i in range(12):
        folder = tmp_path / "imgs" / f"class{y[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(x[i, 0] * 255).astype(np.uint8)).save(folder / f"{i}.png")
    dataset = open_dataset(tmp_path / "imgs", preprocess=Preprocess(image_size=16, mean=(0.5,), std=(0.25,)))
    assert dataset.classes == sorted({f"class{v}" for v in y[:12]})
    xs, ys, _ = _collect(dataset, batch_size=5)
    assert xs.shape == (12, 1, 16, 16)
    assert float(xs.min()) >= (0 - 0.5) / 0.25 - 1e-6 and float(xs.max()) <= (1 - 0.5) / 0.25 + 1e-6
    assert ys.tolist() == [dataset.classes.index(f"class{v}") for v in sorted(y[:12], key=lambda v: f"class{v}")] \
        or len(ys) == 12


def test_wrong_rank_and_bad_labels(tmp_path):
    np.savez(tmp_path / "r.npz", x=np.zeros((4, 8), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match="N×C×H×W"):
        open_dataset(tmp_path / "r.npz")
    np.savez(tmp_path / "l.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, 1, 2, 12]))
    dataset = open_dataset(tmp_path / "l.npz")
    with pytest.raises(DataError, match="labels range over 0..12"):
        dataset.require_labels(10)
    np.savez(tmp_path / "n.npz", x=np.zeros((4, 1, 8, 8), np.float32), y=np.array([0, -1, 2, 1]))
    with pytest.raises(DataError, match="0..K-1"):
        open_dataset(tmp_path / "n.npz")


def test_nan_is_reported_with_the_example(tmp_path):
    x = np.zeros((20, 1, 8, 8), np.float32)
    x[13, 0, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=np.zeros(20, np.int64))
    with pytest.raises(DataError, match="example 13 holds NaN"):
        _collect(open_dataset(tmp_path / "nan.npz"), batch_size=8)


def test_hash_is_of_the_file(tmp_path):
    from prunecp_cli.io.files import sha256_file

    np.savez(tmp_path / "a.npz", x=np.zeros((2, 1, 4, 4), np.float32), y=np.zeros(2, np.int64))
    assert open_dataset(tmp_path / "a.npz").sha256 == sha256_file(tmp_path / "a.npz")
