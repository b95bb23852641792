"""Pixel arrays as model inputs: scaling to float, converting channels, spotting a channels-last layout.

:func:`to_float` turns a block of stored pixels into float32 (``uint8`` scaled to [0, 1], floats
as they are); :func:`convert_channels` converts a float batch between 1 and 3 channels (1→3 by
repeating, 3→1 by ITU-R 601 luma as PIL's ``"L"``); :func:`channels_last_hint` explains an array
that looks N×H×W×C. :class:`~prunecp_cli.io.data.Dataset` applies them to array files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from prunecp_cli.errors import DataError

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, the weights of PIL's convert("L")


def channels_last_hint(shape: tuple[int, ...], model_channels: int | None = None) -> str:
    """A hint to transpose an array of ``shape`` that looks N×H×W×C, else ``""``.

    It looks channels-last when its last size is a plausible channel count (1..4) and its second is
    not (more than 4, and not the model's channel count).

    Args:
        shape: shape of the whole ``x`` array.
        model_channels: the model's input channels, when known.
    """
    if len(shape) != 4 or not 1 <= shape[3] <= 4 or shape[1] <= 4 or shape[1] == model_channels:
        return ""
    return (
        f"; x has shape {list(shape)}, which looks channels-last (N×H×W×C): store it as N×C×H×W, "
        "e.g. x.transpose(0, 3, 1, 2)"
    )


def convert_channels(x: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Convert a float batch [N, C, H, W] to ``channels`` (checked at open: C is 1, 3 or ``channels``)."""
    if channels is None or x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    luma = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * luma).sum(1, keepdim=True)


def to_float(block: np.ndarray, path: Path) -> torch.Tensor:
    """``block`` as float32: ``uint8`` scaled to [0, 1], floats as they are (DataError for other dtypes)."""
    if block.dtype == np.uint8:
        return torch.from_numpy(block.astype(np.float32) / 255.0)
    if np.issubdtype(block.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    raise DataError(f"{path}: x has dtype {block.dtype}; store pixels as float32 or uint8")
