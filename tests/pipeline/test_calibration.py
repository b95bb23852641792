"""``calibrate``: the guarantees by simulation on a trained CNN's outputs, and the workflow's refusals.

The pool is the logits of the trained DigitsCNN (``trained_digits``) on the score, calibration and
test digits it was not trained on (~900 points). Every split is calibrated through the workflow's
own maths path, :func:`certificate_from_logits` (scores → quantile → guarantee → certificate), and
audited with :func:`verdict_from_logits`.

* **Marginal** (random splits of the pool). A uniformly random split makes calibration and test
  points exchangeable, so the mean test coverage over splits estimates ``E[coverage]``, which lies in
  ``[k/(n+1), k/(n+1) + 1/(n+1)] ⊂ [1-alpha, 1-alpha+1/(n+1)]`` for continuous scores.
* **PAC, ``delta = 0.1``**. The guarantee is about the coverage *given* an i.i.d. calibration set.
  It is checked with calibration sets drawn with replacement from the pool (i.i.d. from the pool's
  empirical distribution), whose conditional coverage is then known exactly: the share of the pool
  whose true-label score is at most q̂. Measuring coverage on a finite test split instead adds
  test-sampling noise the PAC bound does not cover: the covered count of ``m`` held-out points is
  Beta-Binomial(m, k*, n+1-k*), whose chance of falling below ``1-alpha`` is about 0.17 here, not
  ``<= delta``. :func:`test_pac_finite_test_sets_follow_their_exact_law` checks that this rate is what
  the exact law predicts, so the literal "finite test coverage below 1-alpha at most delta of the time"
  reading is shown to be the wrong criterion rather than silently relaxed.

Tolerances are 3 Monte-Carlo standard errors; all randomness is seeded.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from testsupport import FAKE_DATA, FAKE_MODEL, held_out_pool, load_npz

from prunecp_cli.conformal.nonconformity import choose_k_reg
from prunecp_cli.conformal.quantile import conformal_quantile, pac_rank
from prunecp_cli.conformal.stats import p_value_marginal
from prunecp_cli.errors import CalibrationError, DataError, UsageError
from prunecp_cli.io.checkpoint import open_model, save_model
from prunecp_cli.io.files import sha256_file
from prunecp_cli.options import RunOptions
from prunecp_cli.pipeline.calibration import (
    calibrate,
    certificate_from_logits,
    collect_logits,
    make_nonconformity,
)
from prunecp_cli.pipeline.certification import verdict_from_logits

CPU = RunOptions(device="cpu")

ALPHA, DELTA, SPLITS = 0.1, 0.1, 500
MODEL, DATA = FAKE_MODEL, FAKE_DATA
SCORES = {"lac": {}, "aps": {}, "raps": {"k_reg": 1, "lambda_reg": 0.01}}


@pytest.fixture(scope="module")
def pool(trained_digits, digits_files):
    """Logits and labels of the ~900 score/calib/test digits the CNN was not trained on."""
    x, logits, y = held_out_pool(trained_digits["model"], digits_files)
    accuracy = float((logits.argmax(1) == y).double().mean())
    assert 0.9 < accuracy < 0.999  # a real, imperfect classifier
    return logits, y


def _cert(logits, labels, name, *, delta=None, class_conditional=False):
    return certificate_from_logits(logits, labels, alpha=ALPHA, delta=delta,
                                   nonconformity=make_nonconformity(name, **SCORES[name]),
                                   class_conditional=class_conditional, model=MODEL, data=DATA)


def _splits(n_pool: int, count: int, seed: int) -> torch.Tensor:
    return torch.argsort(torch.rand(count, n_pool, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("name", list(SCORES))
def test_marginal_coverage_over_random_splits(pool, name):
    logits, labels = pool
    splits = _splits(len(labels), SPLITS, seed=1)
    n_cal = len(labels) // 2
    coverages = []
    for row in splits:
        cal, test = row[:n_cal], row[n_cal:]
        cert = _cert(logits[cal], labels[cal], name)
        coverages.append(verdict_from_logits(logits[test], labels[test], certificate=cert)["coverage"])
    cov = torch.tensor(coverages, dtype=torch.float64)
    se = cov.std().item() / math.sqrt(len(cov))
    low, high = 1 - ALPHA, 1 - ALPHA + 1 / (n_cal + 1)
    assert low - 3 * se <= cov.mean().item() <= high + 3 * se, (name, cov.mean().item(), se)


def _conditional_coverage(pool_label_scores: torch.Tensor, qhat: float) -> float:
    return float((pool_label_scores <= qhat).double().mean())


@pytest.mark.parametrize("name", list(SCORES))
def test_pac_coverage_over_iid_calibration_draws(pool, name):
    logits, labels = pool
    score = make_nonconformity(name, **SCORES[name])
    pool_scores = score.all_scores(logits).gather(1, labels[:, None]).squeeze(1)
    n_cal = len(labels) // 2
    draws = torch.randint(0, len(labels), (SPLITS, n_cal), generator=torch.Generator().manual_seed(2))
    low_pac, low_marginal = 0, 0
    for draw in draws:
        pac = _cert(logits[draw], labels[draw], name, delta=DELTA)
        assert pac["rank"] == pac_rank(n_cal, ALPHA, DELTA)
        low_pac += _conditional_coverage(pool_scores, pac["quantile"]) < 1 - ALPHA
        marginal = conformal_quantile(pool_scores[draw], ALPHA).qhat
        low_marginal += _conditional_coverage(pool_scores, marginal) < 1 - ALPHA
    se = math.sqrt(DELTA * (1 - DELTA) / SPLITS)
    assert low_pac / SPLITS <= DELTA + 3 * se, (name, low_pac / SPLITS)
    # The check has teeth: the marginal rank falls below 1 - alpha far more often than delta.
    assert low_marginal / SPLITS > 0.25, (name, low_marginal / SPLITS)


def test_pac_finite_test_sets_follow_their_exact_law(pool):
    """On finite held-out splits, P(test coverage < 1-alpha) is the Beta-Binomial tail, not delta."""
    logits, labels = pool
    n_cal = len(labels) // 2
    m = len(labels) - n_cal
    below = 0
    for row in _splits(len(labels), SPLITS, seed=3):
        cert = _cert(logits[row[:n_cal]], labels[row[:n_cal]], "lac", delta=DELTA)
        below += verdict_from_logits(logits[row[n_cal:]], labels[row[n_cal:]], certificate=cert)["covered"] < (1 - ALPHA) * m
    k = pac_rank(n_cal, ALPHA, DELTA)
    exact = p_value_marginal(math.ceil((1 - ALPHA) * m) - 1, m, n=n_cal, k=k)  # P(X < (1-alpha) m)
    assert exact > DELTA  # why the finite-test reading of the PAC claim would be wrong
    se = math.sqrt(exact * (1 - exact) / SPLITS)
    assert below / SPLITS <= exact + 3 * se, (below / SPLITS, exact)


def test_randomized_aps_marginal_coverage_is_exact(pool):
    """Continuous (randomised) scores: mean coverage within 3 SE of the interval, from both sides."""
    logits, labels = pool
    n_cal = len(labels) // 2
    coverages = []
    for i, row in enumerate(_splits(len(labels), 300, seed=4)):
        score = make_nonconformity("aps", randomized=True, seed=i)
        cert = certificate_from_logits(logits[row[:n_cal]], labels[row[:n_cal]], alpha=ALPHA, nonconformity=score,
                                       model=MODEL, data=DATA)
        assert cert["guarantee"]["coverage_at_most"] is not None  # no ties among continuous scores
        coverages.append(verdict_from_logits(logits[row[n_cal:]], labels[row[n_cal:]], certificate=cert)["coverage"])
    cov = torch.tensor(coverages, dtype=torch.float64)
    se = cov.std().item() / math.sqrt(len(cov))
    k = math.ceil((n_cal + 1) * (1 - ALPHA))
    assert k / (n_cal + 1) - 3 * se <= cov.mean().item() <= (k + 1) / (n_cal + 1) + 3 * se


# --- the workflow ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_that_used_calib(tmp_path_factory, trained_digits, digits_files):
    """The trained CNN saved with metadata saying its calibration split was used for fine-tuning."""
    loaded = open_model(trained_digits["safetensors"])
    meta = loaded.meta
    meta.extra = {**meta.extra, "data_sha256": [
        {"sha256": sha256_file(digits_files["calib"]), "role": "fine-tune", "file": "calib.npz"}]}
    path = tmp_path_factory.mktemp("used") / "tuned.safetensors"
    save_model(loaded.model, path, meta)
    return path


def test_refuses_data_the_model_used(tmp_path, model_that_used_calib, digits_files):
    out = tmp_path / "cert.json"
    with pytest.raises(CalibrationError, match="already used as fine-tune data.*disjoint split"):
        calibrate(model_that_used_calib, data=digits_files["calib"], output=out, run=CPU)
    assert not out.exists()
    cert = calibrate(model_that_used_calib, data=digits_files["test"], run=CPU)  # a fresh split is fine
    assert cert["data"]["sha256"] == sha256_file(digits_files["test"])


def test_calibrate_binds_model_and_data(tmp_path, trained_digits, digits_files):
    out = tmp_path / "cert.json"
    cert = calibrate(trained_digits["safetensors"], data=digits_files["calib"], alpha=0.1, output=out, run=CPU)
    assert out.exists()
    assert cert["model"]["sha256"] == sha256_file(trained_digits["safetensors"])
    assert cert["data"]["sha256"] == sha256_file(digits_files["calib"])
    assert cert["model"]["params"] == sum(p.numel() for p in trained_digits["model"].parameters())
    assert cert["model"]["flops"] > 0 and cert["model"]["num_classes"] == 10
    x, y = load_npz(digits_files["calib"])
    with torch.no_grad():
        expected = _cert(trained_digits["model"](x), y, "lac")
    assert cert["quantile"] == pytest.approx(expected["quantile"], rel=1e-6)
    assert cert["rank"] == expected["rank"] and cert["data"]["n"] == len(y)


def test_raps_k_reg_is_chosen_on_held_out_points(trained_digits, digits_files):
    cert = calibrate(trained_digits["safetensors"], data=digits_files["calib"], alpha=0.1, nonconformity="raps",
                     run=RunOptions(device="cpu", seed=7))
    tuning = cert["nonconformity"]["tuning"]
    x, y = load_npz(digits_files["calib"])
    n = len(y)
    assert tuning["n"] == round(0.2 * n) and cert["data"]["n"] == n - tuning["n"]
    from prunecp_cli.io.data import split_indices

    tune, rest = split_indices(n, [0.2, 0.8], seed=7)
    with torch.no_grad():
        logits = trained_digits["model"](x)
    assert tuning["value"] == cert["nonconformity"]["parameters"]["k_reg"] == choose_k_reg(
        logits[tune], y[tune], 0.1)
    score = make_nonconformity("raps", k_reg=tuning["value"])
    rest_scores = score.label_scores(logits[rest], y[rest])
    assert cert["quantile"] == pytest.approx(conformal_quantile(rest_scores, 0.1).qhat, rel=1e-9)
    fixed = calibrate(trained_digits["safetensors"], data=digits_files["calib"], nonconformity="raps", k_reg=2,
                      run=CPU)
    assert fixed["nonconformity"]["tuning"] is None and fixed["data"]["n"] == n


def test_too_few_points_and_bad_options(trained_digits, digits_files):
    st, calib = trained_digits["safetensors"], digits_files["calib"]
    with pytest.raises(CalibrationError, match="at least 999 calibration points"):
        calibrate(st, data=calib, alpha=0.001, run=CPU)
    with pytest.raises(CalibrationError, match=r"use at least \d+ calibration points, pass --k-reg"):
        calibrate(st, data=calib, alpha=0.004, nonconformity="raps", run=CPU)
    with pytest.raises(CalibrationError, match="class 0 has"):
        calibrate(st, data=calib, alpha=0.02, class_conditional=True, run=CPU)
    for kwargs in ({"alpha": 0.0}, {"alpha": 1.5}, {"delta": 1.0}, {"nonconformity": "lac", "randomized": True},
                   {"nonconformity": "aps", "k_reg": 2}, {"nonconformity": "thr"}):
        with pytest.raises(UsageError):
            calibrate(st, data=calib, run=CPU, **kwargs)


def test_collect_logits_keeps_dataset_order(trained_digits, digits_files):
    from prunecp_cli.io.data import open_dataset

    data = open_dataset(digits_files["test"])
    view = data.subset(np.arange(len(data))[::-1].copy())  # rows in reverse order
    logits, labels = collect_logits(trained_digits["model"], view, device=torch.device("cpu"), batch_size=7,
                                    num_classes=10)
    x, y = load_npz(digits_files["test"])
    with torch.no_grad():
        expected = trained_digits["model"](x)
    assert torch.equal(labels, y) and torch.allclose(logits, expected, atol=1e-5)
    with pytest.raises(DataError, match="outside|span"):
        certificate_from_logits(logits, labels + 1, alpha=0.1, nonconformity=make_nonconformity("lac"),
                                model=MODEL, data=DATA)


def test_torchrun_two_processes_give_the_same_certificate(tmp_path, trained_digits, digits_files):
    """Under torchrun (gloo, 2 CPU processes) each rank scores its shard; the gathered result is identical."""
    import json
    import subprocess
    import sys

    out = tmp_path / "dist.json"
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "prunecp_cli",
         "calibrate", str(trained_digits["safetensors"]), "--data", str(digits_files["calib"]), "-o", str(out),
         "--device", "cpu", "--batch-size", "16", "-s", "aps", "--randomized", "--quiet"],
        capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    single = calibrate(trained_digits["safetensors"], data=digits_files["calib"], nonconformity="aps",
                       randomized=True, run=CPU)
    both = json.loads(out.read_text())
    for key in ("rank", "data", "model", "nonconformity"):
        assert both[key] == single[key], key
    # Same examples, same U per example; logits may differ in the last float32 bits with the batch layout.
    assert both["quantile"] == pytest.approx(single["quantile"], rel=1e-6)
    assert both["calibration"]["coverage"] == pytest.approx(single["calibration"]["coverage"], abs=2 / 270)
