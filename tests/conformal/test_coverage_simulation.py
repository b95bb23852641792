"""The statistical guarantees, checked by simulation on a real model's logits.

A small MLP is trained on scikit-learn's digits (no downloads) and its logits on ~1,200 held-out
images form a fixed pool. Two resampling schemes are used, each matching what the theorem assumes:

* **Random splits of the pool** (marginal guarantee and the Beta-Binomial certify test). A uniformly
  random split makes calibration and test points exchangeable, so ``E[coverage] >= k/(n+1)`` exactly,
  and the covered count is exactly Beta-Binomial with continuous scores.
* **I.i.d. draws from the pool** (PAC guarantee and the binomial certify test). The PAC statement is
  about the coverage *given* an i.i.d. calibration set. Drawing calibration points with replacement
  makes them i.i.d. from the pool's empirical distribution, whose coverage ``P(s <= qhat)`` is then
  known exactly (the fraction of the pool at or below ``qhat``). Checking empirical coverage on a
  finite split instead would add test-sampling noise that the PAC bound does not cover.

Monte-Carlo tolerances are 3 standard errors; all randomness is seeded.
"""

from __future__ import annotations

import math

import pytest
import torch

from prunecp_cli.conformal.nonconformity import (
    APS,
    LAC,
    RAPS,
    SAPS,
    Margin,
    Nonconformity,
    TopK,
    prediction_sets,
)
from prunecp_cli.conformal.quantile import conformal_quantile, conformal_rank
from prunecp_cli.conformal.stats import covered_count, p_value_marginal, p_value_pac

ALPHA = 0.1
N_CAL = 500
SCORES = {
    "lac": LAC(),
    "aps": APS(),
    "raps": RAPS(),
    "aps-randomized": APS(randomized=True, seed=1),
    "topk-randomized": TopK(randomized=True, seed=2),
    "saps": SAPS(weight=0.2),
    "saps-randomized": SAPS(weight=0.1, randomized=True, seed=3),
    "margin": Margin(),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: one thread is several times faster than two when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pool(one_thread) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of ~1,200 digits a 64-32-10 MLP was not trained on."""
    from sklearn.datasets import load_digits

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.tensor(x_all / 16.0, dtype=torch.float32)
    y_all = torch.tensor(y_all, dtype=torch.int64)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(0))
    train, rest = order[:600], order[600:]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        for _ in range(300):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x_all[train]), y_all[train]).backward()
            optimizer.step()
    with torch.no_grad():
        logits = model(x_all[rest])
    accuracy = (logits.argmax(1) == y_all[rest]).float().mean().item()
    assert 0.85 < accuracy < 0.995  # a real, imperfect classifier: sets are not trivially singletons
    return logits, y_all[rest]


def pool_scores(score: Nonconformity, logits: torch.Tensor, labels: torch.Tensor):
    """All-label and true-label scores of the pool, one U per pool point for randomised scores."""
    all_scores = score.all_scores(logits, generator=score.make_generator(stream=0))
    return all_scores, all_scores.gather(1, labels[:, None]).squeeze(1)


def random_splits(n_pool: int, n_splits: int, seed: int) -> torch.Tensor:
    return torch.argsort(torch.rand(n_splits, n_pool, generator=torch.Generator().manual_seed(seed)), dim=1)


def calibrate(label_scores: torch.Tensor, cal: torch.Tensor, *, delta: float | None = None):
    """``conformal_quantile`` on each row of calibration indices [S, n]: thresholds [S] and the rank."""
    results = [conformal_quantile(label_scores[row], ALPHA, delta=delta) for row in cal]
    return torch.tensor([r.qhat for r in results], dtype=torch.float64), results[0].k


def covered_counts(label_scores: torch.Tensor, test: torch.Tensor, qhat: torch.Tensor) -> torch.Tensor:
    """Covered test points per row of test indices [S, m]: ``y in C(x)`` iff ``s(x, y) <= qhat``."""
    return (label_scores[test] <= qhat[:, None]).sum(dim=1)


@pytest.mark.parametrize("name", list(SCORES))
def test_marginal_coverage_over_random_splits(pool, name: str):
    logits, labels = pool
    all_scores, label_scores = pool_scores(SCORES[name], logits, labels)
    splits = random_splits(len(labels), 500, seed=10)
    cal, test = splits[:, :N_CAL], splits[:, N_CAL:]
    qhat, _ = calibrate(label_scores, cal)
    covered = covered_counts(label_scores, test, qhat)
    for i in range(10):  # the vectorised count is what prediction_sets gives
        sets = prediction_sets(all_scores[test[i]], qhat[i].item())
        assert covered_count(sets, labels[test[i]]) == covered[i]
    cov = covered.double() / test.shape[1]
    se = cov.std().item() / math.sqrt(len(cov))
    lower, upper = 1 - ALPHA, 1 - ALPHA + 1 / (N_CAL + 1)
    assert lower - 3 * se <= cov.mean().item() <= upper + 3 * se, (cov.mean().item(), se)


@pytest.mark.parametrize("name", list(SCORES))
def test_pac_coverage_over_iid_calibration_draws(pool, name: str):
    _, label_scores = pool_scores(SCORES[name], *pool)
    n_draws, delta = 500, 0.1
    draws = torch.randint(0, len(label_scores), (n_draws, N_CAL), generator=torch.Generator().manual_seed(20))
    # Exact conditional coverage: the fraction of the pool (the sampling distribution) at or below qhat.
    pac_cov = (
        (label_scores[None, :] <= calibrate(label_scores, draws, delta=delta)[0][:, None]).double().mean(1)
    )
    marginal_cov = (label_scores[None, :] <= calibrate(label_scores, draws)[0][:, None]).double().mean(1)
    se = math.sqrt(delta * (1 - delta) / n_draws)
    pac_low = (pac_cov < 1 - ALPHA).double().mean().item()
    assert pac_low <= delta + 3 * se, pac_low
    # The check has teeth: the marginal rank misses 1 - alpha about half the time (algorithms.md §0.5).
    marginal_low = (marginal_cov < 1 - ALPHA).double().mean().item()
    assert marginal_low > 0.3, marginal_low


@pytest.mark.parametrize("name", list(SCORES))
def test_certify_marginal_p_value(pool, name: str):
    _, label_scores = pool_scores(SCORES[name], *pool)
    splits = random_splits(len(label_scores), 1000, seed=30)
    cal, test = splits[:, :N_CAL], splits[:, N_CAL:]
    m = test.shape[1]
    qhat, k = calibrate(label_scores, cal)
    honest = [p_value_marginal(int(c), m, n=N_CAL, k=k) for c in covered_counts(label_scores, test, qhat)]
    assert sum(p < 0.01 for p in honest) / len(honest) <= 0.02
    # A dishonest threshold at about the 70% level, certified as if it were the honest rank k.
    q_low = torch.kthvalue(label_scores[cal], math.ceil(0.7 * (N_CAL + 1)), dim=1).values
    lowered = [p_value_marginal(int(c), m, n=N_CAL, k=k) for c in covered_counts(label_scores, test, q_low)]
    assert all(p < 0.01 for p in lowered)


def test_certify_pac_p_value(pool):
    _, label_scores = pool_scores(SCORES["lac"], *pool)
    n_draws, delta, m = 500, 0.1, 700
    gen = torch.Generator().manual_seed(40)
    cal = torch.randint(0, len(label_scores), (n_draws, N_CAL), generator=gen)
    test = torch.randint(0, len(label_scores), (n_draws, m), generator=gen)
    qhat, k = calibrate(label_scores, cal, delta=delta)
    assert k > conformal_rank(N_CAL, ALPHA)
    fails = sum(p_value_pac(int(c), m, alpha=ALPHA) < 0.01 for c in covered_counts(label_scores, test, qhat))
    bound = delta + 0.01
    assert fails / n_draws <= bound + 3 * math.sqrt(bound * (1 - bound) / n_draws), fails


def test_plain_topk_covers_at_least_1_minus_alpha(pool):
    """Not randomised, Top-K scores are integer ranks (ties): coverage >= 1 - alpha, no upper bound."""
    logits, labels = pool
    _, label_scores = pool_scores(TopK(), logits, labels)
    splits = random_splits(len(labels), 500, seed=11)
    cal, test = splits[:, :N_CAL], splits[:, N_CAL:]
    qhat, _ = calibrate(label_scores, cal)
    cov = covered_counts(label_scores, test, qhat).double() / test.shape[1]
    se = cov.std().item() / math.sqrt(len(cov))
    assert cov.mean().item() >= 1 - ALPHA - 3 * se, cov.mean().item()

