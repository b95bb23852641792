"""prunecp: prune trained CNNs structurally and certify them with conformal prediction.

The package is imported by the command-line entry point, so this module stays free of
heavy imports (torch, numpy, ...). The public Python API is loaded lazily on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "prunecp_cli.io.checkpoint",
    "save_model": "prunecp_cli.io.checkpoint",
    "load_certificate": "prunecp_cli.conformal.certificate",
    "ConformalClassifier": "prunecp_cli.conformal.predictor",
    "score": "prunecp_cli.api",
    "prune": "prunecp_cli.api",
    "calibrate": "prunecp_cli.api",
    "certify": "prunecp_cli.api",
    "report": "prunecp_cli.api",
    "predict": "prunecp_cli.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunecp_cli' has no attribute {name!r}")
