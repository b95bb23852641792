"""Data files: formats, memory-mapping, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prunecp_cli.errors import DataError, UsageError
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


def _write_pngs(root, pixels, labels=None, *, name=lambda i: f"{i:04d}.png"):
    """Write uint8 [N,H,W] (gray) or [N,H,W,3] (RGB) images, under root/<label>/ when labels are given."""
    from PIL import Image

    files = []
    for i, image in enumerate(pixels):
        folder = root / str(labels[i]) if labels is not None else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / name(i))
        files.append(folder / name(i))
    return files


def _gray(digits_arrays, n):
    x, y = digits_arrays
    return np.round(x[:n, 0] * 255).astype(np.uint8), y[:n]


def test_folder_is_normalised_exactly_as_the_same_pixels_in_an_npz(tmp_path, digits_arrays):
    pixels, y = _gray(digits_arrays, 30)
    order = np.lexsort((np.arange(30), y))  # the folder's order: by class, then by file name
    _write_pngs(tmp_path / "imgs", pixels, y)
    np.savez(tmp_path / "d.npz", x=pixels[order], y=y[order])
    pre = Preprocess(mean=(0.3,), std=(0.2,))
    folder, _, _ = _collect(open_dataset(tmp_path / "imgs", preprocess=pre))
    arrays, _, _ = _collect(open_dataset(tmp_path / "d.npz", preprocess=pre))
    plain, _, _ = _collect(open_dataset(tmp_path / "imgs"))
    assert torch.equal(folder, arrays)
    assert torch.allclose(folder, (plain - 0.3) / 0.2)


@pytest.mark.parametrize("kind", ["npz", "pt", "folder", "flat"])
def test_wrong_number_of_mean_std_values_is_refused_at_open(tmp_path, digits_arrays, kind):
    pixels, y = _gray(digits_arrays, 6)
    if kind == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, x=pixels, y=y)
    elif kind == "pt":
        path = tmp_path / "d.pt"
        torch.save({"x": torch.from_numpy(pixels[:, None]), "y": torch.from_numpy(y)}, path)
    else:
        path = tmp_path / "imgs"
        _write_pngs(path, pixels, y if kind == "folder" else None)
    for pre in (Preprocess(mean=(0.1, 0.2, 0.3)), Preprocess(std=(0.2, 0.2)), Preprocess(mean=())):
        with pytest.raises(UsageError, match="has 1 channel;"):
            open_dataset(path, preprocess=pre)  # before any batch is read
    with pytest.raises(UsageError, match="has 3 channels"):
        open_dataset(path, preprocess=Preprocess(mean=(0.1, 0.2), channels=3))


def test_images_of_different_sizes_are_refused_as_they_are_read(tmp_path, digits_arrays):
    from PIL import Image

    pixels, y = _gray(digits_arrays, 9)
    files = _write_pngs(tmp_path / "imgs", pixels)  # flat, sorted by name: 0000 ... 0008
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(files[4])  # the odd one in the middle
    dataset = open_dataset(tmp_path / "imgs")
    with pytest.raises(DataError, match=r"0004\.png: image is 12×10 pixels.*--image-size"):
        _collect(dataset, batch_size=3)
    assert _collect_x(open_dataset(tmp_path / "imgs", preprocess=Preprocess(image_size=8))).shape == (9, 1, 8, 8)


def _collect_x(dataset):
    return torch.cat([b.x for b in dataset.batches(4)])


def test_channels_convert_images_and_arrays(tmp_path, digits_arrays):
    from PIL import Image

    pixels, y = _gray(digits_arrays, 8)
    _write_pngs(tmp_path / "gray", pixels, y)
    gray = _collect_x(open_dataset(tmp_path / "gray"))
    rgb = _collect_x(open_dataset(tmp_path / "gray", preprocess=Preprocess(channels=3)))
    assert gray.shape == (8, 1, 8, 8) and rgb.shape == (8, 3, 8, 8)
    assert torch.equal(rgb, gray.expand(-1, 3, -1, -1))
    assert open_dataset(tmp_path / "gray", default_channels=3).sample_shape == (3, 8, 8)  # the model's channels
    assert open_dataset(tmp_path / "gray", preprocess=Preprocess(channels=1), default_channels=3).sample_shape \
        == (1, 8, 8)  # --channels wins

    colour = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    _write_pngs(tmp_path / "rgb", colour)
    from_pil = _collect_x(open_dataset(tmp_path / "rgb", preprocess=Preprocess(channels=1)))
    np.savez(tmp_path / "rgb.npz", x=colour.transpose(0, 3, 1, 2))
    from_array = _collect_x(open_dataset(tmp_path / "rgb.npz", preprocess=Preprocess(channels=1)))
    assert from_pil.shape == from_array.shape == (8, 1, 8, 8)
    assert float((from_pil - from_array).abs().max()) <= 0.5 / 255 + 1e-6  # PIL rounds luma to uint8
    np.savez(tmp_path / "g.npz", x=pixels)
    assert torch.equal(_collect_x(open_dataset(tmp_path / "g.npz", preprocess=Preprocess(channels=3))), rgb)

    np.savez(tmp_path / "two.npz", x=np.zeros((2, 2, 8, 8), np.float32))
    with pytest.raises(DataError, match="x has 2 channels.*--channels 3 cannot convert"):
        open_dataset(tmp_path / "two.npz", preprocess=Preprocess(channels=3))
    with pytest.raises(UsageError, match="channels 2"):
        Preprocess(channels=2)

    mixed = tmp_path / "mixed"
    _write_pngs(mixed, pixels[:3])
    Image.fromarray(colour[0]).save(mixed / "0001.png")  # an RGB image among gray ones
    assert _collect_x(open_dataset(mixed)).shape == (3, 1, 8, 8)  # one channel count for the whole folder


def test_flat_folder_and_single_image_are_unlabelled(tmp_path, digits_arrays):
    pixels, _ = _gray(digits_arrays, 5)
    files = _write_pngs(tmp_path / "flat", pixels)
    flat = open_dataset(tmp_path / "flat")
    assert len(flat) == 5 and not flat.has_labels and flat.files == files
    with pytest.raises(DataError, match="has no labels.*root/<class>/<image>"):
        flat.require_labels(10)
    one = open_dataset(files[2])
    assert len(one) == 1 and one.files == [files[2]] and not one.has_labels
    assert torch.equal(_collect_x(one), _collect_x(flat)[2:3])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        open_dataset(tmp_path / "empty")


def test_channels_last_hint():
    from prunecp_cli.io.data import channels_last_hint

    assert "x.transpose(0, 3, 1, 2)" in channels_last_hint((10, 8, 8, 1), 1)
    assert "x.transpose(0, 3, 1, 2)" in channels_last_hint((10, 32, 32, 3))
    assert channels_last_hint((10, 3, 32, 32), 3) == ""
    assert channels_last_hint((10, 8, 8, 8), 1) == ""
    assert channels_last_hint((10, 8, 8), 1) == ""


def test_tensor_file_with_a_namespace_loads(tmp_path, digits_arrays):
    import argparse

    x, y = digits_arrays
    torch.save({"x": torch.from_numpy(x[:5]), "y": torch.from_numpy(y[:5]), "args": argparse.Namespace(n=5)},
               tmp_path / "d.pt")
    assert len(open_dataset(tmp_path / "d.pt")) == 5
