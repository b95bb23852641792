"""Fine-tuning after pruning: cross-entropy, conformal training (ConfTr) or distillation (KD).

SGD with Nesterov momentum and a cosine learning-rate schedule over all steps, weight decay, and
per-epoch seeded shuffling, in prunecp's one training loop (:func:`prunecp_cli.training.train_epochs`).
Four objectives:

* ``ce``: cross-entropy.
* ``conftr``: the ConfTr objective of Stutz et al. (ICLR 2022), algorithms.md §1.1: each mini-batch
  is split at random into a calibration half (a differentiable conformal threshold at the training
  level ``conftr_alpha``) and a prediction half (sigmoid soft prediction sets), and the model
  minimises ``log(L_cls + λ·Ω + 1e-8) + w_CE · CE``, where Ω = mean max(0, soft set size − 1) and
  L_cls penalises soft sets that miss the label or include wrong ones
  (:func:`prunecp_cli.conformal.smooth.conftr_loss`, whose threshold is the upper-tail conformal
  quantile). Defaults: training α 0.01 (ConfTr's), temperature 0.5 (ConfTr's MNIST setting),
  λ = 0.5 and κ = 1 (ConfTr's range when L_cls is on), w_CE = 1 to hold accuracy while fine-tuning.
  α = 0.01 needs at least 99 calibration points per batch, so ConfTr batches hold at least 198.
* ``kd``: knowledge distillation (Hinton et al. 2015) from the dense model, the teacher, to the
  pruned student: T² · KL(softmax(teacher/T) ‖ softmax(student/T)), mean over the batch, at
  temperature T = ``kd_temperature`` (default 4; the T² keeps the gradient's scale independent of
  T). It needs no labels, so unlabelled data (e.g. the score split without labels) can be used.
  The teacher runs in eval mode on every batch, without gradients.
* ``kd+ce``: the ``kd`` loss plus ``ce_weight`` × cross-entropy (labels needed).

After the last epoch the BatchNorm running statistics are re-estimated exactly on the fine-tuning
data (:func:`prunecp_cli.surgery.batchnorm.recalibrate_batchnorm`): the momentum-averaged statistics
lag behind weights that moved in a few hundred steps, and the lag is large for ConfTr, whose
gradients sharpen the logits quickly. Measured on the digits CNN at 60 % of its FLOPs, 5 epochs of
ConfTr: test accuracy 0.711 with the momentum statistics, 0.904 after re-estimation (cross-entropy:
0.967 and 0.974).

Under torchrun the model is wrapped in DistributedDataParallel and every rank trains on its share
of each epoch's (identical) permutation.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunecp_cli import dist
from prunecp_cli.conformal.quantile import min_calibration_size
from prunecp_cli.conformal.smooth import conftr_loss
from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import Dataset
from prunecp_cli.options import LOSSES, FinetuneConfig  # noqa: E402,F401  (re-exported)
from prunecp_cli.runtime import SILENT, Reporter
from prunecp_cli.surgery.batchnorm import recalibrate_batchnorm
from prunecp_cli.training import train_epochs


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch (Hinton et al. 2015)."""
    log_student = F.log_softmax(student / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.detach() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, config: FinetuneConfig,
               generator: torch.Generator | None = None, teacher: nn.Module | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one batch and its parts (for logging); ``teacher`` for the KD losses."""
    logits = model(x)
    if config.distils:
        with torch.no_grad():
            target = teacher(x)
        kd = distillation_loss(logits, target, config.kd_temperature)
        if config.loss == "kd":
            return kd, {"kd": float(kd.detach())}
        ce = F.cross_entropy(logits, y)
        return kd + config.ce_weight * ce, {"kd": float(kd.detach()), "ce": float(ce.detach())}
    ce = F.cross_entropy(logits, y)
    if config.loss == "ce":
        return ce, {"ce": float(ce.detach())}
    parts = conftr_loss(logits, y, alpha=config.conftr_alpha, temperature=config.conftr_temperature,
                        size_weight=config.conftr_size_weight, target_size=1.0, use_classification=True,
                        generator=generator)
    total = parts.total + config.ce_weight * ce
    return total, {"ce": float(ce.detach()), "soft_size": float(parts.size.detach()),
                   "conftr": float(parts.total.detach())}


def finetune(
    model: nn.Module,
    data: Dataset,
    config: FinetuneConfig,
    *,
    device: torch.device | None = None,
    reporter: Reporter = SILENT,
    teacher: nn.Module | None = None,
) -> list[dict[str, float]]:
    """Fine-tune ``model`` in place on ``data`` (labelled unless the loss is ``kd``); one log record per epoch.

    The model is returned in eval mode on the CPU.

    Args:
        model: the pruned model (modified in place).
        data: the fine-tuning data.
        config: the settings.
        device: where to train.
        reporter: progress.
        teacher: the dense model the KD losses distil (left in eval mode on the CPU).

    Raises:
        DataError: the data have no labels and the loss needs them.
        UsageError: a KD loss without a teacher.
    """
    device = device or torch.device("cpu")
    if config.needs_labels:
        data.require_labels()
    if config.distils and teacher is None:
        raise UsageError("{loss} " + config.loss + " distils the dense model: pass the teacher",
                         arguments={"loss": "loss"})
    if config.epochs == 0 or len(data) == 0:
        return []
    if teacher is not None:
        teacher.to(device).eval()
    model.to(device).train()
    trained = model
    if dist.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    world, rank = (dist.world_size(), dist.rank()) if dist.is_distributed() else (1, 0)
    per_rank = len(data) // world  # equal shards: DDP needs the same number of steps on every rank
    steps_per_epoch = max(1, math.ceil(per_rank / config.batch_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)

    def epoch_batches(_epoch: int):
        order = rng.permutation(len(data))[: per_rank * world][rank::world]
        for batch in data.subset(order).batches(config.batch_size, device=device):
            yield batch.x, batch.y

    # A tail batch too small (to split, for ConfTr) is skipped, the same on every rank.
    log = train_epochs(epoch_batches, lambda x, y: batch_loss(trained, x, y, config, generator, teacher),
                       optimizer=optimizer, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
                       smallest=2 * min_calibration_size(config.conftr_alpha) if config.loss == "conftr" else 2,
                       reporter=reporter, label=f"fine-tune {config.loss}")
    shard = dist.shard_batches(data, config.batch_size)
    recalibrate_batchnorm(model, (b.x for b in shard.batches(config.batch_size, device=device)),
                          reduce=dist.all_reduce_sum)
    model.eval().cpu()
    if teacher is not None:
        teacher.cpu()
    return log
