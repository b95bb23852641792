"""Image files as model inputs: finding them in a folder, and decoding them into tensors.

:func:`find_images` reads a folder in torchvision ``ImageFolder`` layout (``root/<class>/<image>``,
labelled) or a flat folder of images (unlabelled). :func:`load_image` decodes one file with PIL,
converted to 1 (``"L"``) or 3 (``"RGB"``) channels and optionally resized and centre-cropped;
:func:`load_images` stacks several and refuses an image whose size differs from the first's.
:func:`image_channels` is the channel count an image converts to when nothing else decides.
:class:`~prunecp_cli.io.data.Dataset` uses these for folders and single image files; PIL and
torchvision are imported only when an image is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from prunecp_cli.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def is_image(file: Path) -> bool:
    """Whether ``file`` is a file with an image suffix (:data:`IMAGE_SUFFIXES`)."""
    return file.is_file() and file.suffix.lower() in IMAGE_SUFFIXES


def find_images(path: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """The images of a folder: ``ImageFolder`` layout (labelled), else a flat folder (unlabelled).

    Args:
        path: the folder.

    Returns:
        ``(files, labels, classes)``: the image files in order, their class indices into the sorted
        class sub-folder names ``classes`` (both None for a flat folder).

    Raises:
        DataError: the folder holds no images, neither in class sub-folders nor itself.
    """
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for file in sorted((path / name).rglob("*")):
            if is_image(file):
                files.append(file)
                labels.append(label)
    if files:
        return files, labels, classes
    files = sorted(file for file in path.iterdir() if is_image(file))
    if not files:
        raise DataError(
            f"{path}: no images found, neither in class sub-folders (root/<class>/<image>) nor in the folder "
            f"itself ({', '.join(IMAGE_SUFFIXES)})"
        )
    return files, None, None


def image_channels(path: Path) -> int:
    """Channels an image is converted to when nothing else decides: 1 for grayscale modes, else 3."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return 1 if image.mode in _GRAY_MODES else 3
    except OSError as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); remove or replace the file") from None


def load_image(path: Path, *, channels: int, image_size: int | None) -> torch.Tensor:
    """Decode one image as a float tensor [C, H, W] in [0, 1].

    Args:
        path: the image file.
        channels: 1 (PIL ``"L"``) or 3 (``"RGB"``).
        image_size: resize the short side and centre-crop to this size (None: as stored).

    Raises:
        DataError: the file cannot be decoded.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
    except OSError as exc:
        raise DataError(f"{path}: cannot decode image ({exc}); remove or replace the file") from None
    if image_size is not None:
        image = TF.center_crop(TF.resize(image, image_size), image_size)
    return TF.to_tensor(image)


def load_images(files: Sequence[Path], *, channels: int, image_size: int | None,
                shape: tuple[int, ...] | None, reference: Path) -> torch.Tensor:
    """Decode and stack images as a float batch [N, C, H, W] in [0, 1].

    Args:
        files: the image files, in batch order.
        channels: 1 or 3, see :func:`load_image`.
        image_size: see :func:`load_image`.
        shape: the ``(C, H, W)`` every image must have (None: not checked).
        reference: the image that fixed ``shape``, named in the message.

    Raises:
        DataError: an image cannot be decoded or differs in size from ``shape``.
    """
    images = []
    for file in files:
        image = load_image(file, channels=channels, image_size=image_size)
        if shape is not None and tuple(image.shape) != shape:
            raise DataError(
                f"{file}: image is {image.shape[2]}×{image.shape[1]} pixels, but {reference} is "
                f"{shape[2]}×{shape[1]}; images differ in size: pass --image-size N to resize "
                "and centre-crop them all to N×N"
            )
        images.append(image)
    return torch.stack(images)
