"""Deployment latency for ``report --ort``: PyTorch beside ONNX Runtime, dense and pruned, batch 1 and ``--batch-size``.

Each model is exported in memory with the dynamo ONNX exporter (dynamic batch, as ``prunecp export
--dynamic-batch`` writes it) and run by an ONNX Runtime CPU session with as many intra-op threads as
torch uses, so both runtimes get the same cores. Times are medians of repeated forward passes after
warm-up (:func:`prunecp_cli.measure.measure_latency`; the ONNX Runtime time includes the tensor to
NumPy conversion, a copy-free view on the CPU). onnx and onnxruntime are imported only here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prunecp_cli.measure import measure_latency

RUNTIMES = ("PyTorch", "ONNX Runtime")


def ort_module(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``model`` exported to ONNX (dynamic batch) and opened in ONNX Runtime, as a module."""
    from prunecp_cli.io.exported import OrtModule
    from prunecp_cli.pipeline.export import onnx_proto

    return OrtModule(onnx_proto(model.cpu().eval(), example[:1].cpu(), opset=None, dynamic=True).SerializeToString())


def deployment_latency(models: dict[str, nn.Module | None], example: torch.Tensor, *, batch_sizes: list[int],
                       repeats: int, measured: dict[int, dict[str, float | None]] | None = None,
                       ) -> list[dict[str, Any]]:
    """One row per (runtime, batch size): ``{runtime, batch_size, dense_ms, pruned_ms, repeats, threads, device}``.

    Args:
        models: ``{"dense": module or None, "pruned": module}``.
        example: one input (its shape is timed; values are random).
        batch_sizes: the batch sizes to time (duplicates dropped).
        repeats: timed forward passes per measurement.
        measured: PyTorch CPU medians already taken with ``repeats``, ``{batch size: {"dense": ms, "pruned": ms}}``
            (``report``'s own latency row): used as they are, so the two tables show one measurement.
    """
    shape = tuple(example.shape[1:])
    runners = {(name, runtime): (model if runtime == "PyTorch" else ort_module(model, example))
               for name, model in models.items() if model is not None for runtime in RUNTIMES}
    rows = []
    for runtime in RUNTIMES:
        for batch in dict.fromkeys(batch_sizes):
            known = (measured or {}).get(batch, {}) if runtime == "PyTorch" else {}
            times = {name: known[name] if known.get(name) is not None else
                     measure_latency(runners[(name, runtime)], shape, batch_size=batch, repeats=repeats).median_ms
                     for name in models if (name, runtime) in runners}
            rows.append({"runtime": runtime, "batch_size": batch, "dense_ms": times.get("dense"),
                         "pruned_ms": times["pruned"], "repeats": repeats, "threads": torch.get_num_threads(),
                         "device": "cpu"})
    return rows
