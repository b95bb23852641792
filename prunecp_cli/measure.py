"""Cost of a model: parameters, FLOPs and measured latency.

FLOPs are counted by fvcore's ``FlopCountAnalysis`` on one example (batch 1), which counts **one
fused multiply-add as one FLOP** (so its "FLOPs" are MACs; twice that is the count of single
floating-point operations). Every table prunecp prints states this unit. fvcore's import-time
deprecation warnings and its "unsupported operator" log lines (element-wise adds, activations, which
it does not count) are silenced.
"""

from __future__ import annotations

import logging
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

FLOPS_UNIT = "FLOPs counted by fvcore: 1 multiply-add = 1 FLOP, batch 1"


def _flop_analysis(model: nn.Module, example: torch.Tensor):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    analysis = FlopCountAnalysis(model.eval(), (example[:1],))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis


def count_flops(model: nn.Module, example: torch.Tensor) -> int:
    """Total FLOPs of one example (see module docstring for the unit)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(_flop_analysis(model, example).total())


def flops_by_module(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """FLOPs per module name ('' is the whole model; parents include their children)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {k: int(v) for k, v in _flop_analysis(model, example).by_module().items()}


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            total += param.numel()
    return total


@dataclass(frozen=True)
class Latency:
    """Measured forward latency of one batch.

    Attributes:
        median_ms: median over the timed repeats, in milliseconds.
        iqr_ms: interquartile range of the repeats.
        batch_size: examples per forward pass.
        repeats: timed repeats (after warm-up).
        device: where it ran.
    """

    median_ms: float
    iqr_ms: float
    batch_size: int
    repeats: int
    device: str


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    batch_size: int = 32,
    device: torch.device | None = None,
    warmup: int = 5,
    repeats: int = 30,
    min_seconds: float = 0.0,
) -> Latency:
    """Median wall-clock time of ``model`` on a random batch, after warm-up (CUDA synchronised).

    Args:
        model: the model; it is not modified.
        input_shape: one example's shape.
        batch_size: examples per timed forward pass.
        device: where to run (default CPU).
        warmup: untimed passes first.
        repeats: timed passes (at least 3).
        min_seconds: keep timing beyond ``repeats`` until this much time has been measured.
    """
    device = device or torch.device("cpu")
    model = model.to(device).eval()
    x = torch.randn((batch_size, *input_shape), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[float] = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        sync()
        spent = 0.0
        while len(times) < max(3, repeats) or spent < min_seconds:
            start = time.perf_counter()
            model(x)
            sync()
            elapsed = time.perf_counter() - start
            times.append(elapsed * 1000.0)
            spent += elapsed
    quartiles = statistics.quantiles(times, n=4)
    return Latency(
        median_ms=statistics.median(times),
        iqr_ms=quartiles[2] - quartiles[0],
        batch_size=batch_size,
        repeats=len(times),
        device=str(device),
    )
