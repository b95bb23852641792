"""Torch-Pruning's own pruner as the benchmark's baseline: its importance, its pruner, the same FLOPs.

:func:`tp_prune` prunes a copy of a dense model with ``torch_pruning.pruner.BasePruner`` (local: every
group loses the same share, as Torch-Pruning does by default) scored by Torch-Pruning's
``MagnitudeImportance(p=1)`` ("tp-l1": group L1, mean over the group's members) or
``TaylorImportance`` ("tp-taylor": |w·∂L/∂w| summed per channel, the cross-entropy gradient taken on
the score split), with the final classifier kept. Its one knob, the pruning ratio, is bisected until
the model keeps the target fraction of the dense FLOPs (fvcore, as prunecp counts them), and then
BatchNorm is re-estimated on the score split exactly as ``prunecp prune`` does
(:func:`prunecp_cli.surgery.batchnorm.recalibrate_batchnorm`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn.functional as F

TP_METHODS = ("tp-l1", "tp-taylor")
BISECTIONS = 12


def _importance(name: str):
    import torch_pruning as tp

    if name == "tp-l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "tp-taylor":
        return tp.importance.TaylorImportance()
    raise ValueError(f"unknown Torch-Pruning baseline {name}")


def _gradients(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """The mean cross-entropy gradient of every parameter on ``(x, y)`` (BatchNorm in eval mode)."""
    model.eval().zero_grad()
    with torch.enable_grad():
        for i in range(0, len(x), batch):
            loss = F.cross_entropy(model(x[i:i + batch]), y[i:i + batch], reduction="sum") / len(x)
            loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return grads


def tp_prune(dense: torch.nn.Module, method: str, target_flops: float, score: tuple[torch.Tensor, torch.Tensor],
             example: torch.Tensor) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``dense`` pruned by Torch-Pruning to ``target_flops`` of its FLOPs, BatchNorm re-estimated on ``score``.

    Returns:
        The pruned model (eval mode) and a record: the bisected ratio and the FLOPs fraction kept.
    """
    import torch_pruning as tp

    from prunecp_cli.measure import count_flops
    from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
    from prunecp_cli.surgery.groups import find_head

    warnings.filterwarnings("ignore", module="torch_pruning")
    dense = dense.eval()
    dense_flops = count_flops(dense, example)
    grads = _gradients(dense, *score) if method == "tp-taylor" else {}
    head = find_head(dense, example)

    def attempt(ratio: float) -> tuple[torch.nn.Module, float]:
        model = copy.deepcopy(dense)
        for name, param in model.named_parameters():
            if name in grads:
                param.grad = grads[name].clone()
        modules = dict(model.named_modules())
        pruner = tp.pruner.BasePruner(model, example, importance=_importance(method), pruning_ratio=ratio,
                                      ignored_layers=[modules[head]] if head else [], global_pruning=False)
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model, count_flops(model, example) / dense_flops

    lo, hi = 0.0, 0.95
    best: tuple[float, torch.nn.Module, float] | None = None
    for _ in range(BISECTIONS):
        ratio = (lo + hi) / 2
        model, kept = attempt(ratio)
        if best is None or abs(kept - target_flops) < abs(best[2] - target_flops):
            best = (ratio, model, kept)
        if kept > target_flops:
            lo = ratio
        else:
            hi = ratio
    ratio, model, kept = best
    x = score[0]
    recalibrate_batchnorm(model, (x[i:i + 128] for i in range(0, len(x), 128)))
    return model.eval(), {"tp_ratio": ratio, "flops_kept": kept}
