"""Labelled image data, streamed in batches.

Accepted inputs (design.md §3):

* ``.npz`` with ``x`` (N×C×H×W, or N×H×W for one channel) and ``y`` (integer labels 0..K−1).
  ``float32`` pixels are used as they are and ``uint8`` pixels are scaled to [0, 1]. Members stored
  uncompressed (``np.savez``) are memory-mapped, so only the current batch is in memory.
* ``.safetensors`` / ``.pt`` / ``.pth`` files holding tensors ``x`` and ``y`` (read without pickle).
* A folder in torchvision ``ImageFolder`` layout (``root/<class>/<image>``), decoded batch by batch
  and resized with ``image_size``; a flat folder of images (no class sub-folders) or a single image
  file is unlabelled data. Images are converted to ``channels`` (1: PIL ``"L"``, 3: ``"RGB"``); without
  it, to the model's input channels when the caller knows them, else to the first image's (1 for
  grayscale, 3 otherwise), so every image of a folder has the same channel count. Finding and
  decoding the images is :mod:`prunecp_cli.io.images`'s part, and the array conversions are in
  :mod:`prunecp_cli.io.pixels`.

Every kind is normalised with ``mean``/``std`` the same way (after scaling to [0, 1]), and converted
to ``channels`` when given (arrays: 1→3 by repeating, 3→1 by ITU-R 601 luma as PIL's ``"L"``).
``y`` may be absent for unlabelled data (``predict``, label-free risks). Every batch is checked for
NaN and infinite values as it is read.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from prunecp_cli.checks import parse_floats  # noqa: F401  (re-exported)
from prunecp_cli.errors import DataError, UsageError
from prunecp_cli.io.files import sha256_path
from prunecp_cli.io.images import IMAGE_SUFFIXES, find_images, image_channels, load_image, load_images
from prunecp_cli.io.pixels import channels_last_hint, convert_channels, to_float
from prunecp_cli.options import CHANNEL_CHOICES, Preprocess  # noqa: F401  (re-exported)


@dataclass
class Batch:
    """One batch: inputs, labels (or None) and the dataset row of each example."""

    x: torch.Tensor
    y: torch.Tensor | None
    index: torch.Tensor


@dataclass
class Dataset:
    """A labelled (or unlabelled) image dataset read lazily from one file or folder.

    Attributes:
        path: the file or folder.
        sha256: hash of the file (or of the folder's files), recorded as "data used".
        rows: the dataset rows this view covers, in order.
        classes: class names for folders (None for array files).
    """

    path: Path
    sha256: str
    rows: np.ndarray
    preprocess: Preprocess = field(default_factory=Preprocess)
    classes: list[str] | None = None
    _x: object = field(default=None, repr=False)
    _y: np.ndarray | None = field(default=None, repr=False)
    _files: list[Path] | None = field(default=None, repr=False)
    _shape: tuple[int, ...] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def files(self) -> list[Path] | None:
        """The image file of every dataset row (indexed by row, not position), or None for array files."""
        return self._files

    def layout_hint(self, model_channels: int | None = None) -> str:
        """A hint to transpose when an array file's ``x`` looks channels-last, else ``""``.

        Args:
            model_channels: the model's input channels, when known.
        """
        if self._files is not None or self._x is None:
            return ""
        return channels_last_hint(tuple(self._x.shape), model_channels)

    @property
    def has_labels(self) -> bool:
        """Whether labels are present."""
        return self._y is not None

    @property
    def labels(self) -> np.ndarray:
        """Labels of the rows of this view (int64).

        Raises:
            DataError: the data have no labels.
        """
        if self._y is None:
            if self._files is not None:
                raise DataError(
                    f"{self.path} has no labels (images outside class sub-folders); this command needs labelled "
                    "data: arrange the images as root/<class>/<image>"
                )
            raise DataError(f"{self.path} has no labels (no 'y'); this command needs labelled data: add y")
        return self._y[self.rows]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one input example (C, H, W)."""
        return tuple(self.first_batch(1).x.shape[1:])

    def subset(self, positions: Sequence[int] | np.ndarray) -> Dataset:
        """A view on some of this view's rows (positions index into :attr:`rows`)."""
        positions = np.asarray(positions, dtype=np.int64)
        return Dataset(
            path=self.path,
            sha256=self.sha256,
            rows=self.rows[positions],
            preprocess=self.preprocess,
            classes=self.classes,
            _x=self._x,
            _y=self._y,
            _files=self._files,
            _shape=self._shape,
        )

    def require_labels(self, num_classes: int | None = None) -> None:
        """Check that labels exist and lie in 0..num_classes−1.

        Raises:
            DataError: no labels, or labels outside the model's classes.
        """
        labels = self.labels
        if len(labels) == 0:
            return
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            top = "K-1" if num_classes is None else str(num_classes - 1)
            raise DataError(
                f"{self.path}: labels range over {low}..{high}, but the model has "
                f"{num_classes} classes (0..{top}); pass data labelled for this model"
            )

    def first_batch(self, size: int = 1) -> Batch:
        """The first ``size`` examples (used as the example input for tracing)."""
        return next(self.batches(size))

    def batches(self, batch_size: int, *, device: torch.device | None = None) -> Iterator[Batch]:
        """Yield batches in row order; every batch is checked for NaN/inf.

        Raises:
            DataError: a batch holds NaN or infinite values, or an image whose size differs from the first
                image's (without ``image_size``).
        """
        if batch_size < 1:
            raise UsageError(f"--batch-size {batch_size} must be at least 1")
        for start in range(0, len(self.rows), batch_size):
            rows = self.rows[start : start + batch_size]
            x = self._load_x(rows)
            if not torch.isfinite(x).all():
                bad = int(rows[int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])])
                raise DataError(
                    f"{self.path}: example {bad} holds NaN or infinite values; clean the data before use"
                )
            y = torch.from_numpy(self._y[rows].astype(np.int64)) if self._y is not None else None
            index = torch.from_numpy(rows.copy())
            if device is not None:
                x = x.to(device, non_blocking=True)
                y = y.to(device) if y is not None else None
            yield Batch(x=x, y=y, index=index)

    def _load_x(self, rows: np.ndarray) -> torch.Tensor:
        if self._files is not None:
            images = load_images([self._files[int(row)] for row in rows], channels=self.preprocess.channels,
                                 image_size=self.preprocess.image_size, shape=self._shape, reference=self._files[0])
            return _normalise(images, self.preprocess, self.path)
        array = self._x
        if isinstance(array, torch.Tensor):
            block = array[torch.from_numpy(rows)]
            x = to_float(block.float().numpy() if block.dtype == torch.bfloat16 else block.numpy(), self.path)
        else:
            x = to_float(np.asarray(array[rows]), self.path)  # a memmap reads only these rows
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return _normalise(convert_channels(x, self.preprocess.channels), self.preprocess, self.path)


def _normalise(x: torch.Tensor, pre: Preprocess, path: Path) -> torch.Tensor:
    """Subtract ``mean`` and divide by ``std``, the same way for every kind of data."""
    if pre.mean is None and pre.std is None:
        return x
    channels = x.shape[1]
    pre.check_channels(channels, path)
    mean = torch.tensor(pre.mean if pre.mean is not None else (0.0,), dtype=x.dtype).expand(channels)
    std = torch.tensor(pre.std if pre.std is not None else (1.0,), dtype=x.dtype).expand(channels)
    return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def open_dataset(
    path: str | Path, *, preprocess: Preprocess | None = None, default_channels: int | None = None
) -> Dataset:
    """Open a data file, image file or folder (see module docstring) as a lazily read :class:`Dataset`.

    The options that need no pixels are checked here, before any batch is read: the number of
    ``mean``/``std`` values, and whether the arrays can be converted to ``preprocess.channels``.

    Args:
        path: the data.
        preprocess: pixel preprocessing (default: none).
        default_channels: channels to convert images to when ``preprocess.channels`` is None (the
            model's input channels; used only when it is 1 or 3). Arrays are never converted by default.

    Raises:
        DataError: the file is missing, unreadable, or its arrays have the wrong rank, dtype, length or
            a channel count ``preprocess.channels`` cannot be converted from.
        UsageError: ``mean``/``std`` do not have one value per channel.
    """
    path = Path(path)
    preprocess = preprocess or Preprocess()
    if not path.exists():
        raise DataError(f"data {path} does not exist; check the path")
    if path.is_dir():
        return _open_images(path, *find_images(path), preprocess, default_channels)
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return _open_images(path, [path], None, None, preprocess, default_channels)
    if suffix == ".npz":
        x, y = _open_npz(path)
    elif suffix in (".safetensors", ".pt", ".pth"):
        x, y = _open_tensor_file(path)
    else:
        raise DataError(
            f"data {path}: unknown type {suffix!r}; use .npz, .safetensors, .pt, an image file or an image folder"
        )
    x, y = _validate_arrays(path, x, y)
    stored = 1 if x.ndim == 3 else int(x.shape[1])
    hint = channels_last_hint(tuple(x.shape))
    if preprocess.channels is not None and stored not in (preprocess.channels, 1, 3):
        raise DataError(
            f"{path}: x has {stored} channels, which --channels {preprocess.channels} cannot convert (it converts "
            f"between 1 and 3 channels){hint}"
        )
    preprocess.check_channels(preprocess.channels or stored, path, hint=hint)
    return Dataset(
        path=path,
        sha256=sha256_path(path),
        rows=np.arange(x.shape[0], dtype=np.int64),
        preprocess=preprocess,
        _x=x,
        _y=y,
    )


def _open_npz(path: Path):
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path} is not a readable .npz file ({exc}); write it with numpy.savez") from None
    with archive:
        names = {Path(n).stem: n for n in archive.namelist()}
        if "x" not in names:
            raise DataError(f"{path} has no array 'x' (found: {', '.join(sorted(names)) or 'none'}); name the inputs x")
        x = _npz_member(path, archive, names["x"])
        y = _npz_member(path, archive, names["y"]) if "y" in names else None
    return x, y


def _npz_member(path: Path, archive: zipfile.ZipFile, name: str):
    """Memory-map an uncompressed npz member; read a compressed one into memory."""
    info = archive.getinfo(name)
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as raw:
                raw.seek(info.header_offset)
                header = raw.read(30)
                name_len = int.from_bytes(header[26:28], "little")
                extra_len = int.from_bytes(header[28:30], "little")
                start = info.header_offset + 30 + name_len + extra_len
                raw.seek(start)
                version = np.lib.format.read_magic(raw)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(raw)
                offset = raw.tell()
            if dtype.hasobject:
                raise DataError(f"{path}: array {name} holds Python objects; store numbers only")
            if int(np.prod(shape)) == 0:
                return np.zeros(shape, dtype=dtype)
            return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        with archive.open(name) as member:
            return np.lib.format.read_array(member, allow_pickle=False)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: cannot read array {name} ({exc}); re-save with numpy.savez") from None


def _open_tensor_file(path: Path):
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise DataError(f"{path} is not a readable .safetensors file ({exc})") from None
    else:
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{path} cannot be read as tensors without pickle ({type(exc).__name__})") from None
    if not isinstance(tensors, dict) or "x" not in tensors:
        raise DataError(f"{path} must hold a tensor named 'x' (and 'y' for labels)")
    x = tensors["x"]
    y = tensors.get("y")
    if not isinstance(x, torch.Tensor) or (y is not None and not isinstance(y, torch.Tensor)):
        raise DataError(f"{path}: 'x' and 'y' must be tensors")
    return (x if x.dtype != torch.uint8 else x.numpy()), (y.numpy() if y is not None else None)


def _validate_arrays(path: Path, x, y):
    if x.ndim not in (3, 4):
        raise DataError(
            f"{path}: x has shape {list(x.shape)}; expected N×C×H×W (or N×H×W for one channel)"
        )
    if y is not None:
        y = np.asarray(y)
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"{path}: y has shape {list(y.shape)}; expected one label per example ({x.shape[0]})")
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
                y = y.astype(np.int64)
            else:
                raise DataError(f"{path}: y has dtype {y.dtype}; labels must be integers 0..K-1")
        y = y.astype(np.int64)
        if len(y) and y.min() < 0:
            raise DataError(f"{path}: labels must be 0..K-1, found {int(y.min())}")
    return x, y


def _open_images(
    path: Path,
    files: list[Path],
    labels: list[int] | None,
    classes: list[str] | None,
    preprocess: Preprocess,
    default_channels: int | None,
) -> Dataset:
    """A dataset of image files; the first image fixes the size every other image must have."""
    channels = preprocess.channels
    if channels is None:
        channels = default_channels if default_channels in CHANNEL_CHOICES else image_channels(files[0])
    preprocess = replace(preprocess, channels=channels)
    preprocess.check_channels(channels, path)
    return Dataset(
        path=path,
        sha256=sha256_path(path),
        rows=np.arange(len(files), dtype=np.int64),
        preprocess=preprocess,
        classes=classes,
        _y=np.asarray(labels, dtype=np.int64) if labels is not None else None,
        _files=files,
        _shape=tuple(load_image(files[0], channels=channels, image_size=preprocess.image_size).shape),
    )


def split_indices(n: int, fractions: Sequence[float], *, seed: int) -> list[np.ndarray]:
    """Split 0..n−1 at random into disjoint parts with the given fractions (the last takes the rest)."""
    order = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for fraction in fractions[:-1]:
        stop = start + int(round(fraction * n))
        parts.append(np.sort(order[start:stop]))
        start = stop
    parts.append(np.sort(order[start:]))
    return parts
