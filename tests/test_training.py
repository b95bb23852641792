"""The one training loop (train_epochs) and prediction on tensors through the inference loop."""

from __future__ import annotations

import torch
from testsupport import load_npz
from torch import nn

from prunecp_cli.training import predict_logits, train_epochs


def test_train_epochs_skips_small_batches_and_anneals_the_rate_to_zero():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(9, 3), torch.tensor([0, 1] * 4 + [0])
    seen = []

    def epoch_batches(epoch):
        seen.append(epoch)
        return [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]  # the last one is below `smallest`

    def loss(xb, yb):
        value = nn.functional.cross_entropy(model(xb), yb)
        return value, {"ce": float(value.detach()), "n": float(len(xb))}

    log = train_epochs(epoch_batches, loss, optimizer=optimizer, epochs=3, steps_per_epoch=2, smallest=2)
    assert seen == [0, 1, 2]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert all(r["n"] == 4.0 for r in log)  # the mean over the two steps taken: the batch of one was skipped
    assert optimizer.param_groups[0]["lr"] < 1e-12  # cosine over 3 × 2 steps, down to zero


def test_predict_logits_matches_collect_logits(digits_files):
    from prunecp_cli.io.data import open_dataset
    from prunecp_cli.models import digits_cnn
    from prunecp_cli.pipeline.inference import collect_logits

    torch.manual_seed(0)
    model = digits_cnn()
    x, _ = load_npz(digits_files["test"])
    logits, _ = collect_logits(model, open_dataset(digits_files["test"]), device=torch.device("cpu"),
                               batch_size=100, num_classes=10)
    assert torch.equal(predict_logits(model, x, batch_size=100), logits)
    assert not model.training
