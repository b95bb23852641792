"""Confident pruning: Learn-then-Test over pruning levels of a real trained CNN, and its pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from prunecp_cli.errors import UsageError
from prunecp_cli.io.data import open_dataset
from prunecp_cli.options import DataSource, ModelSource, PruneOptions
from prunecp_cli.pipeline.confident import LevelPruner
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.pipeline.pruning import make_policy, prepare
from prunecp_cli.pipeline.risktest import (
    SetSizeSplit,
    certify_losses,
    level_losses,
    parse_grid,
    risk_test,
)
from prunecp_cli.surgery.unstructured import MagnitudeRanking, magnitude_prune

GRID = parse_grid("0.01:0.4:0.01")


@pytest.fixture(scope="module")
def level_losses_table(tmp_path_factory, trained_digits, digits_files):
    """Per-level, per-example disagreement losses of the pruned CNN on a pool of held-out digits.

    Every level is pruned once (global l1 ranking, BatchNorm recalibrated on the score split) exactly
    as ``prune_confident`` does; only the split of the pool into risk and test points varies later.
    """
    folder = tmp_path_factory.mktemp("pool")
    parts = [np.load(digits_files[name]) for name in ("calib", "test")]
    np.savez(folder / "pool.npz", x=np.concatenate([p["x"] for p in parts]), y=np.concatenate([p["y"] for p in parts]))
    setup = prepare(ModelSource(trained_digits["safetensors"]), method="l1", data=DataSource(digits_files["score"]),
                    policy=make_policy(PruneOptions(scope="global")))
    pool = open_dataset(folder / "pool.npz")
    device = setup.session.device
    dense = collect_logits(setup.session.model, pool, device=device, batch_size=256, num_classes=10)[0].argmax(1)
    pruner = LevelPruner(setup, bn_data=setup.session.data)
    rows = []
    for level in GRID:
        logits = collect_logits(pruner.build(level).model, pool, device=device, batch_size=256, num_classes=10)[0]
        rows.append(level_losses(risk_test("disagreement", num_classes=10, max_risk=0.1), logits,
                                 dense_top1=dense, labels=None)[0])
    return np.stack(rows)


def test_certified_risk_holds_on_held_out_data_in_most_splits(level_losses_table):
    """P(realised risk <= eps) >= 1 - delta over 100 random risk/test splits; a naive choice fails it."""
    losses = level_losses_table
    eps, delta, n_risk, splits = 0.05, 0.1, 180, 100
    test = risk_test("disagreement", num_classes=10, max_risk=eps, delta=delta)
    assert losses.mean(1)[0] < eps < losses.mean(1)[-1]  # the grid crosses the bound: the test has teeth
    rng = np.random.default_rng(0)
    violations = naive_violations = certified = 0
    chosen = []
    for _ in range(splits):
        order = rng.permutation(losses.shape[1])
        risk, held_out = order[:n_risk], order[n_risk:]
        result = certify_losses([row[risk] for row in losses], test)
        if result.last_certified is not None:  # nothing certified = nothing pruned: no risk at all
            certified += 1
            chosen.append(GRID[result.last_certified])
            violations += losses[result.last_certified, held_out].mean() > eps
        # Without the multiple-testing correction: the largest level whose empirical risk is <= eps.
        fine = [j for j in range(len(GRID)) if losses[j, risk].mean() <= eps]
        naive_violations += bool(fine) and losses[max(fine), held_out].mean() > eps
    assert violations <= delta * splits, violations
    assert certified >= 0.9 * splits and np.mean(chosen) >= 0.02, (certified, np.mean(chosen))
    assert naive_violations > delta * splits, naive_violations  # the check would catch an invalid procedure


def test_certify_losses_stops_at_first_failure():
    test = risk_test("error", num_classes=10, max_risk=0.1, delta=0.05)
    good, bad = np.zeros(200), np.ones(200)
    result = certify_losses([good, good, bad, good], test)
    assert result.last_certified == 1 and result.tested == 3
    assert certify_losses([bad, good], test).last_certified is None


def test_risk_test_levels_and_pvalue_defaults():
    assert risk_test("disagreement", num_classes=10, max_risk=0.02).pvalue == "binomial"
    excess = risk_test("excess-error", num_classes=10, max_risk=0.02)
    assert excess.pvalue == "wsr" and excess.loss_alpha == pytest.approx(0.51)
    assert excess.in_user_units(0.5) == pytest.approx(0.0)
    size = risk_test("set-size", num_classes=10, max_set_size=2.0)
    assert size.loss_alpha == pytest.approx(1 / 9) and size.in_user_units(1 / 9) == pytest.approx(2.0)
    for bad in (dict(risk="error"), dict(risk="error", max_risk=1.0), dict(risk="error", max_risk=0.1, delta=0.0),
                dict(risk="set-size", max_risk=0.1), dict(risk="excess-error", max_risk=0.1, pvalue_method="binomial"),
                dict(risk="nope", max_risk=0.1)):
        with pytest.raises(UsageError):
            risk_test(num_classes=10, **bad)


def test_parse_grid():
    assert parse_grid(None)[0] == 0.05 and parse_grid(None)[-1] == 0.95 and len(parse_grid(None)) == 19
    grid = parse_grid("0.01:0.99:0.01")
    assert len(grid) == 99 and grid[0] == 0.01 and grid[-1] == 0.99
    assert parse_grid("0.1, 0.2,0.5") == [0.1, 0.2, 0.5]
    for bad in ("0.2,0.1", "0,0.5", "0.5,1", "a,b", "0.1:0.5", "0.1:0.5:-0.1", ""):
        with pytest.raises(UsageError):
            parse_grid(bad)


def test_set_size_threshold_comes_from_the_calibration_half_only():
    from prunecp_cli.conformal.nonconformity import LAC

    n, k = 400, 10
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(n, k, generator=gen) * 2
    labels = torch.randint(0, k, (n,), generator=gen)
    from prunecp_cli.io.data import split_indices

    cal, held = split_indices(n, [0.5, 0.5], seed=3)
    assert not set(cal) & set(held) and len(cal) + len(held) == n
    split = SetSizeSplit(LAC(), 0.1, None, False, cal, held)
    test = risk_test("set-size", num_classes=k, max_set_size=3.0)
    dense = logits.argmax(1)
    losses, facts = level_losses(test, logits, dense_top1=dense, labels=labels, set_size=split)
    assert losses.shape == (len(held),)
    changed_test = logits.clone()
    changed_test[torch.from_numpy(held)] *= 5
    _, same = level_losses(test, changed_test, dense_top1=dense, labels=labels, set_size=split)
    assert same["qhat"] == facts["qhat"]  # q-hat never sees the test half
    changed_cal = logits.clone()
    changed_cal[torch.from_numpy(cal)] *= 5
    _, other = level_losses(test, changed_cal, dense_top1=dense, labels=labels, set_size=split)
    assert other["qhat"] != facts["qhat"]
    probs = torch.softmax(logits[torch.from_numpy(held)].double(), 1)
    sizes = (1 - probs <= facts["qhat"]).sum(1).clamp(min=1).numpy()
    np.testing.assert_allclose(losses, (sizes - 1) / (k - 1))


def test_magnitude_pruning_matches_numpy_quantile():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.ReLU(), nn.Linear(30, 5))
    model[1].running_mean.fill_(0.3)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    flat = np.concatenate([p.detach().abs().flatten().numpy() for p in model.parameters()]).astype(np.float64)
    q = np.quantile(flat, 0.37)
    sparsity = magnitude_prune(model, 0.37)
    assert sparsity.total == flat.size and sparsity.threshold == pytest.approx(q, rel=1e-12)
    assert sparsity.zeroed == int((flat < q).sum()) and abs(sparsity.zeroed / flat.size - 0.37) < 2 / flat.size
    for name, value in model.state_dict().items():
        assert value.shape == dense[name].shape
        if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(value, dense[name])  # buffers are not trainable weights
        else:
            expected = torch.where(dense[name].abs().double() < q, torch.zeros_like(dense[name]), dense[name])
            assert torch.equal(value, expected), name
    kept = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    before = kept[1].weight.clone()
    ranking = MagnitudeRanking(kept, ignore=("1",))
    assert ranking.total == 20
    ranking.apply(kept, 0.5)
    assert torch.equal(kept[1].weight, before) and int((kept[0].weight == 0).sum()) > 0
