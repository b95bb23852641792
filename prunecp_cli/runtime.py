"""Run-time set-up shared by every command: device choice and seeding.

The reporter (result lines, warnings, progress) lives in :mod:`prunecp_cli.reporting`, which does
not import torch; :class:`Reporter`, :data:`SILENT` and :func:`is_main_process` are re-exported here.
"""

from __future__ import annotations

import os
import random

import torch

from prunecp_cli.errors import UsageError
from prunecp_cli.reporting import SILENT, Reporter, is_main_process  # noqa: F401  (re-exported)


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a :class:`torch.device`.

    Args:
        spec: ``auto`` picks CUDA when available (the local rank's GPU under torchrun), else CPU.

    Raises:
        UsageError: the spec is malformed or names a CUDA device that is not there.
    """
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        try:
            device = torch.device(spec)
        except RuntimeError as exc:
            raise UsageError(f"--device {spec}: not a device ({exc}); use auto, cpu, cuda or cuda:N") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0..."
                f"{torch.cuda.device_count() - 1}"
            )
        return device
    raise UsageError(f"--device {spec!r} is not understood; use auto, cpu, cuda or cuda:N")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch, and return a CPU generator seeded the same way."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
