"""Tests for prunecp_cli.conformal.smooth: value-level checks against exact conformal references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from prunecp_cli.conformal.smooth import (
    classification_loss,
    conformal_level,
    conftr_loss,
    coverage_loss,
    nonconformity_matrix,
    size_loss,
    smooth_quantile,
    smooth_set_size_loss,
    smooth_threshold,
    soft_set_membership,
)
from prunecp_cli.errors import CalibrationError, DataError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is as fast, and immune to OpenMP spin-waits on a shared 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_threshold(nonconf: torch.Tensor, alpha: float) -> float:
    """Independent reference: the ceil((n+1)(1-alpha))-th smallest value, via numpy."""
    n = nonconf.numel()
    k = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    return float(np.sort(nonconf.detach().cpu().numpy())[k - 1])


# --------------------------------------------------------------------------- levels


@pytest.mark.parametrize(
    ("n", "alpha", "k"),
    [(1000, 0.1, 901), (9, 0.1, 9), (99, 0.01, 99), (250, 0.01, 249), (19, 0.05, 19), (149, 0.18, 123)],
)
def test_conformal_level(n, alpha, k):
    assert conformal_level(n, alpha) == k / n
    # ConfTr's convention: the floor((n+1) alpha)-th smallest *conformity* score is the same point.
    assert n + 1 - k == math.floor((n + 1) * alpha + 1e-9)


@pytest.mark.parametrize(("n", "alpha"), [(8, 0.1), (98, 0.01), (0, 0.1)])
def test_conformal_level_refuses_infinite_threshold(n, alpha):
    with pytest.raises(CalibrationError, match="calibration points"):
        conformal_level(n, alpha)


# --------------------------------------------------------------------------- smooth quantile


FINITE_CASES = [
    (n, alpha)
    for n in (1, 3, 10, 37, 250, 500)
    for alpha in (0.01, 0.05, 0.1, 0.2, 0.5)
    if math.ceil((n + 1) * (1 - alpha) - 1e-9) <= n
]


@pytest.mark.parametrize(("n", "alpha"), FINITE_CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_smooth_quantile_is_exact_in_the_limit(n, alpha, ties):
    g = torch.Generator().manual_seed(n)
    values = torch.randint(0, 6, (n,), generator=g).double() if ties else torch.randn(n, generator=g).double()
    level = conformal_level(n, alpha)
    ref = exact_threshold(values, alpha)
    assert ref == float(np.quantile(values.numpy(), level, method="inverted_cdf"))
    assert smooth_quantile(values, level, dispersion=0.0).item() == ref
    for dispersion in (1e-3, 1e-4):
        assert smooth_quantile(values, level, dispersion=dispersion).item() == pytest.approx(ref, abs=1e-9)
    assert smooth_quantile(values.float(), level, dispersion=1e-3).item() == pytest.approx(ref, abs=1e-5)
    if ties:  # small integers are exact in bfloat16, whose own integers stop being exact above 256
        assert smooth_quantile(values.bfloat16(), level, dispersion=1e-3).item() == ref


def test_smooth_quantile_really_smooths_at_larger_dispersion():
    values = torch.randn(200, generator=torch.Generator().manual_seed(0)).double().requires_grad_()
    q = smooth_quantile(values, 0.5, dispersion=1.0)
    assert abs(q.item() - exact_threshold(values, 0.5)) > 1e-6
    (grad,) = torch.autograd.grad(q, values)
    assert (grad >= 0).all() and grad.sum().item() == pytest.approx(1.0)
    assert (grad > 1e-3).sum() >= 5  # gradient is spread over neighbouring ranks, not one-hot


def test_tail_on_uniform_values():
    """anchors.md section 3: TorchCP's soft quantile returned the 10% quantile (0.086) here."""
    u = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q = smooth_quantile(u, conformal_level(1000, 0.1)).item()
    assert q == pytest.approx(0.9, abs=0.03)
    assert q == pytest.approx(exact_threshold(u, 0.1), abs=0.005)


def test_smooth_quantile_gradcheck():
    values = torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    values.requires_grad_()
    assert torch.autograd.gradcheck(lambda v: smooth_quantile(v, 0.75, dispersion=0.7), (values,))
    (grad,) = torch.autograd.grad(smooth_quantile(values, 0.75, dispersion=0.7), values)
    assert torch.isfinite(grad).all() and (grad != 0).sum() > 1


def test_smooth_quantile_rejects_bad_arguments():
    with pytest.raises(ValueError):
        smooth_quantile(torch.zeros(0), 0.5)
    with pytest.raises(ValueError):
        smooth_quantile(torch.zeros(3, 2), 0.5)
    with pytest.raises(ValueError):
        smooth_quantile(torch.zeros(3), 0.0)
    with pytest.raises(ValueError):
        smooth_quantile(torch.zeros(3), 0.5, dispersion=-1.0)


# --------------------------------------------------------------------------- real model outputs


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _train_ce(model: torch.nn.Module, x, y, steps: int) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def digits():
    """load_digits split 797 train / 500 calibration / 500 test, seeded."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return {"train": (x[:797], y[:797]), "cal": (x[797:1297], y[797:1297]), "test": (x[1297:], y[1297:])}


@pytest.fixture(scope="module")
def trained_logits(digits):
    model = _train_ce(_mlp(0), *digits["train"], steps=300)
    with torch.no_grad():
        return model(digits["cal"][0]), digits["cal"][1], model(digits["test"][0]), digits["test"][1]


def _hard_sets(logits, threshold, nonconformity="lac"):
    return nonconformity_matrix(logits, nonconformity=nonconformity) <= threshold


def _coverage_and_size(sets, labels):
    return sets[torch.arange(len(labels)), labels].float().mean().item(), sets.sum(1).float().mean().item()


@pytest.mark.parametrize("nonconformity", ["lac", "logp"])
def test_training_threshold_matches_exact_split_conformal(trained_logits, nonconformity):
    cal_logits, cal_labels, test_logits, test_labels = trained_logits
    true_nonconf = nonconformity_matrix(cal_logits, nonconformity=nonconformity)[
        torch.arange(500), cal_labels
    ]
    exact = exact_threshold(true_nonconf, 0.1)
    smooth = smooth_threshold(cal_logits, cal_labels, alpha=0.1, nonconformity=nonconformity).item()
    # 0.02 is about a fifth of the threshold here (exact LAC q is about 0.1 for this model), and well
    # inside the calibration noise (the 0.85 and 0.95 quantiles are about 0.03 and 0.5).
    assert smooth == pytest.approx(exact, abs=0.02)
    wrong_tail = float(np.quantile(true_nonconf.numpy(), 0.1))  # what TorchCP's soft quantile targets
    assert abs(smooth - exact) < abs(smooth - wrong_tail)
    cov_exact, _ = _coverage_and_size(_hard_sets(test_logits, exact, nonconformity), test_labels)
    cov_smooth, _ = _coverage_and_size(_hard_sets(test_logits, smooth, nonconformity), test_labels)
    assert cov_exact >= 0.85
    assert cov_smooth == pytest.approx(cov_exact, abs=0.02)


def test_soft_membership_tends_to_hard_sets(trained_logits):
    cal_logits, cal_labels, test_logits, _ = trained_logits
    q = smooth_threshold(cal_logits, cal_labels, alpha=0.1, dispersion=0.0)
    hard = _hard_sets(test_logits, q.item())
    soft = soft_set_membership(test_logits, q, temperature=1e-5)
    assert ((soft > 0.5) == hard).float().mean().item() >= 0.99
    mild = soft_set_membership(test_logits.double(), q.double(), temperature=0.5)
    assert ((mild > 0) & (mild < 1)).all()
    with pytest.raises(ValueError):
        soft_set_membership(test_logits, q, temperature=0.0)


# --------------------------------------------------------------------------- losses on hand-made sets

MEMBERSHIP = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.6, 0.5]], dtype=torch.float64)
LABELS = torch.tensor([0, 2])


@pytest.mark.parametrize(("kappa", "expected"), [(0.0, 1.3), (1.0, 0.3), (1.3, 0.05)])
def test_size_loss_hand_computed(kappa, expected):
    # set sizes 1.2 and 1.4
    assert size_loss(MEMBERSHIP, target_size=kappa).item() == pytest.approx(expected)


def test_classification_loss_hand_computed():
    # row 0 (y=0): (1-0.9) + 0.2 + 0.1 = 0.4; row 1 (y=2): 0.3 + 0.6 + (1-0.5) = 1.4
    assert classification_loss(MEMBERSHIP, LABELS).item() == pytest.approx(0.9)
    weights = torch.ones(3, 3, dtype=torch.float64)
    weights[0, 1] = 0.0  # including class 1 when y=0 is free: row 0 becomes 0.2
    assert classification_loss(MEMBERSHIP, LABELS, loss_matrix=weights).item() == pytest.approx(0.8)


def test_classification_loss_with_the_reference_identity_matrix():
    # ConfTr's reference default L = I: only a missing true class costs, mean (1 - C_y) = (0.1 + 0.5) / 2
    identity = torch.eye(3, dtype=torch.float64)
    assert classification_loss(MEMBERSHIP, LABELS, loss_matrix=identity).item() == pytest.approx(0.3)


def test_coverage_loss_hand_computed():
    # C_y = 0.9 and 0.5 against 1 - alpha = 0.9: gaps 0 and -0.4
    assert coverage_loss(MEMBERSHIP, LABELS, alpha=0.1).item() == pytest.approx(0.08)
    assert coverage_loss(MEMBERSHIP, LABELS, alpha=0.1, transform="abs").item() == pytest.approx(0.2)


def test_loss_label_validation():
    with pytest.raises(DataError, match="labels"):
        classification_loss(MEMBERSHIP, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="labels"):
        classification_loss(MEMBERSHIP, torch.tensor([0.0, 1.0]))


# --------------------------------------------------------------------------- ConfTr loss


def test_conftr_loss_value_matches_its_parts():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(300, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (300,), generator=g)
    out = conftr_loss(logits, labels, alpha=0.05, size_weight=0.5, generator=torch.Generator().manual_seed(7))
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(7))
    cal, pred = perm[:150], perm[150:]
    q = smooth_threshold(logits[cal], labels[cal], alpha=0.05, nonconformity="logp")
    member = soft_set_membership(logits[pred], q, temperature=1.0, nonconformity="logp")
    assert out.threshold.item() == pytest.approx(q.item())
    assert out.size.item() == pytest.approx(size_loss(member, target_size=1).item())
    assert out.classification.item() == pytest.approx(classification_loss(member, labels[pred]).item())
    assert out.total.item() == pytest.approx(
        math.log(out.classification.item() + 0.5 * out.size.item() + 1e-8)
    )
    size_only = conftr_loss(logits, labels, alpha=0.05, use_classification=False, target_size=0)
    assert size_only.classification.item() == 0.0
    assert size_only.total.item() == pytest.approx(math.log(0.01 * size_only.size.item() + 1e-8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conftr_loss_dtypes_and_gradients(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 10, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 10, (500,), generator=g)
    out = conftr_loss(logits, labels, generator=g)  # ConfTr defaults: alpha=0.01 on 250 calibration points
    assert out.total.dtype == dtype and torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_conftr_loss_rejects_empty_or_too_small_parts():
    logits, labels = torch.randn(1, 4), torch.tensor([0])
    with pytest.raises(ValueError, match="non-empty"):
        conftr_loss(logits, labels, alpha=0.5)
    with pytest.raises(ValueError, match="non-empty"):
        smooth_set_size_loss(torch.randn(10, 4), torch.zeros(10, dtype=torch.long), fraction=0.05)
    with pytest.raises(CalibrationError, match="batch of at least 198"):
        conftr_loss(torch.randn(100, 4), torch.zeros(100, dtype=torch.long), alpha=0.01)


def test_smooth_set_size_loss_gradcheck():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 4, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 4, (20,), generator=g)

    def omega(z):
        return smooth_set_size_loss(
            z, labels, alpha=0.2, dispersion=0.5, generator=torch.Generator().manual_seed(0)
        )

    assert torch.autograd.gradcheck(omega, (logits,))
    omega(logits).backward()
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    grad_cal, grad_pred = logits.grad[perm[:10]], logits.grad[perm[10:]]
    assert torch.isfinite(logits.grad).all()
    assert grad_pred.abs().sum() > 0
    assert grad_cal.abs().sum() > 0  # the threshold passes gradient to the calibration half


def _split_conformal(model, digits, alpha=0.1):
    with torch.no_grad():
        q = exact_threshold(
            nonconformity_matrix(model(digits["cal"][0]))[torch.arange(500), digits["cal"][1]], alpha
        )
        return _coverage_and_size(_hard_sets(model(digits["test"][0]), q), digits["test"][1])


def _heldout_objective(model, digits):
    with torch.no_grad():
        logits = torch.cat([model(digits["cal"][0]), model(digits["test"][0])])
        labels = torch.cat([digits["cal"][1], digits["test"][1]])
        return conftr_loss(
            logits, labels, alpha=0.1, generator=torch.Generator().manual_seed(123)
        ).total.item()


def test_conftr_finetuning_shrinks_sets_on_digits(digits):
    """30 steps from an under-trained MLP (10 CE steps); hard split-CP at alpha=0.1 on held-out data."""
    x, y = digits["train"]
    start = _train_ce(_mlp(0), x, y, steps=10)
    cov0, size0 = _split_conformal(start, digits)
    obj0 = _heldout_objective(start, digits)
    results = {}
    for with_ce in (True, False):
        model = copy.deepcopy(start)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(30):
            idx = torch.randperm(len(y), generator=gen)[:500]
            logits = model(x[idx])
            loss = conftr_loss(logits, y[idx], alpha=0.1, generator=gen).total
            if with_ce:
                loss = loss + torch.nn.functional.cross_entropy(logits, y[idx])
            assert torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[with_ce] = (*_split_conformal(model, digits), _heldout_objective(model, digits))
    cov_ce, size_ce, _ = results[True]
    cov_only, size_only, obj_only = results[False]
    assert size0 > 1.2  # the starting point leaves room to shrink
    assert size_ce < 0.85 * size0
    assert 0.85 <= cov_ce <= 0.96 and 0.85 <= cov0 <= 0.96
    # ConfTr alone: its own held-out objective falls, sets do not grow and coverage holds.
    assert obj_only < obj0 - 0.1
    assert size_only <= size0 + 0.02
    assert 0.85 <= cov_only <= 0.96


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conftr_loss_on_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(400, 10, generator=g, dtype=dtype)
    labels = torch.randint(0, 10, (400,), generator=g)
    cpu = conftr_loss(logits, labels, alpha=0.05, generator=torch.Generator().manual_seed(1))
    cuda_logits = logits.cuda().requires_grad_()
    gpu = conftr_loss(cuda_logits, labels.cuda(), alpha=0.05, generator=torch.Generator().manual_seed(1))
    assert gpu.total.device.type == "cuda"
    assert gpu.total.item() == pytest.approx(cpu.total.item(), rel=1e-4)
    gpu.total.backward()
    assert torch.isfinite(cuda_logits.grad).all()
