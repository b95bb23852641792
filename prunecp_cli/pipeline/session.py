"""Open a model and its data together, and check that they fit each other.

Every command starts here: the model is loaded (a prunecp file rebuilds itself; a dense checkpoint
needs ``--arch``; an ``.onnx``/``.pt2`` export runs in ONNX Runtime or as the loaded program), then
the data are opened lazily (images converted to the model's input channels unless ``--channels``
says otherwise), the example input for tracing is the first data
example (or the recorded/declared input shape), and one forward pass checks that model and data fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunecp_cli import dist
from prunecp_cli.errors import DataError, UsageError, brief
from prunecp_cli.io.checkpoint import LoadedModel, open_model
from prunecp_cli.io.data import Dataset, Preprocess, open_dataset
from prunecp_cli.options import DataSource, ModelSource
from prunecp_cli.runtime import resolve_device
from prunecp_cli.types import UsedData


@dataclass
class Session:
    """A model, its data, and the facts derived from both.

    Attributes:
        loaded: the model and its metadata.
        data: the data (None when not given).
        example: one example input (batch of 1, CPU) for tracing and FLOP counting.
        num_classes: size of the model's output.
        device: where to compute.
    """

    loaded: LoadedModel
    data: Dataset | None
    example: torch.Tensor
    num_classes: int
    device: torch.device

    @property
    def model(self) -> torch.nn.Module:
        """The model (eval mode)."""
        return self.loaded.model

    @property
    def input_shape(self) -> list[int]:
        """Shape of one example."""
        return list(self.example.shape[1:])

    def used_data(self) -> list[UsedData]:
        """Data the model has already seen, per its metadata."""
        return [UsedData(**d) for d in self.loaded.meta.extra.get("data_sha256", [])]


def open_source(
    model: ModelSource,
    data: DataSource | Dataset | None = None,
    *,
    device: str = "auto",
    need_labels: bool = False,
) -> Session:
    """:func:`open_session` for the API's parameter objects (see :mod:`prunecp_cli.options`)."""
    if isinstance(data, DataSource):
        data, preprocess = data.path, data.preprocess
    else:
        preprocess = None
    return open_session(model.checkpoint, data=data, arch=model.arch, arch_kwargs=model.arch_kwargs,
                        input_shape=model.input_shape, preprocess=preprocess, device=device,
                        need_labels=need_labels, trust_arch=model.trust_arch)


def open_session(
    checkpoint: str | Path,
    *,
    data: str | Path | Dataset | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    preprocess: Preprocess | None = None,
    device: str = "auto",
    need_labels: bool = False,
    trust_arch: bool = False,
) -> Session:
    """Load the model and data and check that they fit.

    ``trust_arch`` lets a prunecp file's architecture come from any module (see
    :func:`prunecp_cli.io.checkpoint.open_model`); without it only trusted sources or a matching
    ``arch`` are built.

    Raises:
        UsageError: no way to know the input shape, or a bad device.
        CheckpointError: the checkpoint is unreadable or does not fit the architecture.
        DataError: the data are unreadable, do not fit the model, or lack labels when needed.
    """
    target = resolve_device(device)
    dist.setup(target)
    if Path(checkpoint).suffix.lower() in (".onnx", ".pt2"):  # an export carries its input shape and record
        from prunecp_cli.io.exported import open_exported

        loaded = open_exported(checkpoint)
    else:
        loaded = open_model(checkpoint, arch=arch, arch_kwargs=arch_kwargs,
                            input_shape=input_shape if data is None else None, trust_arch=trust_arch)
    channels = _input_channels(loaded)
    dataset = (data if isinstance(data, Dataset) or data is None
               else open_dataset(data, preprocess=preprocess, default_channels=channels))
    if dataset is not None and len(dataset) == 0:
        raise DataError(f"{dataset.path} holds no examples")
    if dataset is not None:
        example = dataset.first_batch(1).x
    recorded = loaded.meta.input_shape
    if dataset is None:
        shape = recorded or input_shape
        if not shape:
            raise UsageError("cannot tell the model's input shape: pass {data}, or {input_shape} C,H,W", arguments={"data": "data", "input_shape": "input_shape"})
        example = torch.zeros((1, *shape))
    elif recorded and list(example.shape[1:]) != list(recorded):
        raise DataError(
            f"{dataset.path}: examples have shape {list(example.shape[1:])}, but the model was built for "
            f"{recorded}; pass data of the model's input shape (channels, height, width)"
            f"{dataset.layout_hint(channels)}"
        )
    try:
        with torch.no_grad():
            out = loaded.model(example)
    except RuntimeError as exc:
        where = dataset.path if dataset is not None else "--input-shape"
        hint = dataset.layout_hint(channels) if dataset is not None else ""
        raise DataError(
            f"{where}: the model cannot run on inputs of shape {list(example.shape[1:])} "
            f"({brief(exc)}); check the channel count and image size{hint}"
        ) from None
    if out.dim() != 2:
        raise DataError(f"the model's output has shape {list(out.shape)}; prunecp needs classifier logits [N, K]")
    num_classes = int(out.shape[1])
    if need_labels:
        if dataset is None:
            raise UsageError("this command needs labelled data: pass {data}", arguments={"data": "data"})
        dataset.require_labels(num_classes)
    elif dataset is not None and dataset.has_labels:
        dataset.require_labels(num_classes)
    if not loaded.meta.input_shape:
        loaded.meta.input_shape = list(example.shape[1:])
    return Session(loaded, dataset, example, num_classes, target)


def _input_channels(loaded: LoadedModel) -> int | None:
    """The model's input channels: from its recorded input shape, else its first convolution (None: unknown)."""
    shape = loaded.meta.input_shape
    if isinstance(shape, list) and len(shape) == 3 and isinstance(shape[0], int) and shape[0] > 0:
        return shape[0]
    conv = next((m for m in loaded.model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)
