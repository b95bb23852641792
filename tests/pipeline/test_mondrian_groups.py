"""Mondrian calibration by user groups: thresholds per group, the certificate layout, certify --groups, refusals."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from testsupport import FAKE_DATA, FAKE_MODEL, held_out_pool, load_npz

from prunecp_cli.conformal.certificate import validate_certificate
from prunecp_cli.conformal.nonconformity import LAC
from prunecp_cli.conformal.predictor import ConformalClassifier, certificate_threshold
from prunecp_cli.conformal.stats import p_value_marginal
from prunecp_cli.errors import CertificateError, DataError, UsageError
from prunecp_cli.io.checkpoint import open_model, save_model
from prunecp_cli.pipeline.calibration import certificate_from_logits, make_nonconformity
from prunecp_cli.pipeline.certification import verdict_from_logits

MODEL, DATA = FAKE_MODEL, FAKE_DATA
RECORD = {"file": "groups.txt", "sha256": "c" * 64}


@pytest.fixture(scope="module")
def pool(trained_digits, digits_files):
    x, logits, y = held_out_pool(trained_digits["model"], digits_files)
    # a group known at prediction time: whether the input's mean pixel is above the median
    brightness = x.flatten(1).mean(1)
    groups = ["bright" if float(v) > float(brightness.median()) else "dark" for v in brightness]
    return logits, y, groups


def _cert(logits, labels, groups, *, alpha=0.1, delta=None):
    return certificate_from_logits(logits, labels, alpha=alpha, delta=delta, nonconformity=make_nonconformity("lac"),
                                   model=MODEL, data=DATA, groups=(groups, RECORD))


def test_group_thresholds_are_each_groups_conformal_quantile(pool):
    logits, labels, groups = pool
    cert = _cert(logits, labels, groups)
    section = cert["groups"]
    assert section["labels"] == ["bright", "dark"] and cert["quantile"] is None and cert["rank"] is None
    scores = LAC().label_scores(logits, labels).tolist()
    for i, name in enumerate(section["labels"]):
        mine = sorted(s for s, g in zip(scores, groups, strict=True) if g == name)
        k = -((-(len(mine) + 1) * 9) // 10)
        assert section["counts"][i] == len(mine) and section["rank"][i] == k
        assert section["quantile"][i] == mine[k - 1]
    assert len(cert["guarantee"]["per_group"]) == 2 and "Group-conditional" in cert["guarantee"]["statement"]
    assert validate_certificate(json.loads(json.dumps(cert))) == cert


@pytest.mark.parametrize("field, value, match", [
    (("groups", "rank"), [1, 1], r"groups.rank\[0\]"),
    (("groups", "labels"), ["dark", "bright"], "sorted"),
    (("quantile",), 0.5, "must be null"),
    (("groups", "counts"), [1, 2], "sums to"),
    (("class_conditional",), True, "class_conditional"),
])
def test_malformed_group_sections_are_refused(pool, field, value, match):
    logits, labels, groups = pool
    cert = copy.deepcopy(_cert(logits, labels, groups))
    target = cert
    for key in field[:-1]:
        target = target[key]
    target[field[-1]] = value
    with pytest.raises(CertificateError, match=match):
        validate_certificate(cert)


def test_group_coverage_over_random_splits(pool):
    """Per-group coverage of Mondrian sets is >= 1 - alpha in each group, over 200 random splits."""
    logits, labels, groups = pool
    scores = LAC().label_scores(logits, labels)
    g = torch.tensor([name == "bright" for name in groups])
    n = len(labels)
    covered = {True: [], False: []}
    for seed in range(200):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        cal, test = order[: n // 2], order[n // 2:]
        for flag in (True, False):
            mine = scores[cal][g[cal] == flag]
            k = math.ceil((len(mine) + 1) * 0.9)
            q = torch.kthvalue(mine, k).values
            covered[flag].append(float((scores[test][g[test] == flag] <= q).double().mean()))
    for flag, values in covered.items():
        mean, se = np.mean(values), np.std(values) / math.sqrt(len(values))
        assert mean >= 0.9 - 3 * se, (flag, mean)


def test_certify_tests_every_group(pool):
    logits, labels, groups = pool
    n = len(labels)
    cal, test = torch.arange(0, n, 2), torch.arange(1, n, 2)
    cert = _cert(logits[cal], labels[cal], [groups[i] for i in cal.tolist()])
    test_groups = [groups[i] for i in test.tolist()]
    verdict = verdict_from_logits(logits[test], labels[test], certificate=cert, groups=test_groups)
    rows = verdict["per_group"]
    assert [r["group"] for r in rows] == ["bright", "dark"] and verdict["per_class"] is None
    section = cert["groups"]
    ps = [p_value_marginal(r["covered"], r["n"], n=section["counts"][i], k=section["rank"][i])
          for i, r in enumerate(rows)]
    assert verdict["p_value"] == min(1.0, 2 * min(ps)) and "per group, Bonferroni over 2 groups" in verdict["test"]
    assert verdict["passed"] and verdict["groups"]["per_group"][0]["group"] == "bright"
    with pytest.raises(DataError, match="pass the test examples' group labels"):
        verdict_from_logits(logits[test], labels[test], certificate=cert)
    with pytest.raises(DataError, match="one group label per point"):
        verdict_from_logits(logits[test], labels[test], certificate=cert, groups=test_groups[:-1])
    with pytest.raises(DataError, match="no threshold for"):
        verdict_from_logits(logits[test], labels[test], certificate=cert, groups=["new"] * len(test))


def test_consumers_without_groups_refuse(pool, trained_digits):
    logits, labels, groups = pool
    cert = _cert(logits, labels, groups)
    with pytest.raises(CertificateError, match="group-conditional"):
        certificate_threshold(cert)
    with pytest.raises(CertificateError, match="certify it with --groups"):
        ConformalClassifier(trained_digits["model"], cert)
    with pytest.raises(UsageError, match="choose one"):
        certificate_from_logits(logits, labels, alpha=0.1, nonconformity=LAC(), class_conditional=True, model=MODEL,
                                data=DATA, groups=(groups, RECORD))


def test_calibrate_and_certify_groups_on_the_command_line(cli, tmp_path, trained_digits, digits_files):
    loaded = open_model(trained_digits["safetensors"])
    model, cert = tmp_path / "model.safetensors", tmp_path / "cert.json"
    save_model(loaded.model, model, loaded.meta)
    for split in ("calib", "test"):
        _, y = load_npz(digits_files[split])
        np.save(tmp_path / f"{split}_groups.npy", (y.numpy() >= 5).astype(np.int64))
    made = cli("calibrate", model, "--data", digits_files["calib"], "--groups", tmp_path / "calib_groups.npy",
               "-o", cert, "--device", "cpu")
    assert made.code == 0, made.stderr
    assert json.loads(cert.read_text())["groups"]["labels"] == [0, 1]
    ok = cli("certify", model, "--cert", cert, "--data", digits_files["test"], "--groups", tmp_path / "test_groups.npy",
             "--json")
    assert ok.code == 0, ok.stderr
    assert [r["group"] for r in json.loads(ok.stdout)["per_group"]] == [0, 1]
    missing = cli("certify", model, "--cert", cert, "--data", digits_files["test"], "--json")
    assert missing.code == 3 and "--groups" in missing.stderr
    predict = cli("predict", model, "--cert", cert, "--data", digits_files["test"])
    assert predict.code == 3 and "group-conditional" in predict.stderr
    export = cli("export", model, "--cert", cert, "--format", "pt2", "--data", digits_files["test"],
                 "-o", tmp_path / "m.pt2")
    assert export.code == 3 and "group-conditional" in export.stderr and not (tmp_path / "m.pt2").exists()
    both = cli("calibrate", model, "--data", digits_files["calib"], "--groups", tmp_path / "calib_groups.npy",
               "--class-conditional", "-o", tmp_path / "c2.json", "--device", "cpu")
    assert both.code == 2 and "choose one" in both.stderr


def test_raps_with_a_chosen_k_reg_keeps_each_point_with_its_group(tmp_path, trained_digits, digits_files):
    """calibrate(raps, no k_reg, groups): k_reg is chosen on a held-out 20 %, and every group's threshold is the
    conformal quantile of the tuned RAPS scores of *that group's* remaining points (labels follow the split)."""
    from prunecp_cli import api
    from prunecp_cli.conformal.nonconformity import RAPS
    from prunecp_cli.io.data import split_indices
    from prunecp_cli.pipeline.calibration import TUNE_FRACTION

    loaded = open_model(trained_digits["safetensors"])
    model = tmp_path / "model.safetensors"
    save_model(loaded.model, model, loaded.meta)
    x, y = load_npz(digits_files["calib"])
    labels = np.where(y.numpy() % 3 == 0, "third", "other")  # unequal groups, unrelated to the data order
    np.savetxt(tmp_path / "groups.txt", labels, fmt="%s")
    cert = api.calibrate(model, api.DataSource(digits_files["calib"], groups=tmp_path / "groups.txt"), alpha=0.1,
                         nonconformity="raps", run=api.RunOptions(device="cpu", seed=3))
    tuning = cert["nonconformity"]["tuning"]
    _, rest = split_indices(len(y), [TUNE_FRACTION, 1 - TUNE_FRACTION], seed=3)
    rest = np.asarray(rest)
    assert tuning["n"] == len(y) - len(rest) and sum(cert["groups"]["counts"]) == len(rest)
    with torch.no_grad():
        logits = loaded.model.eval()(x)
    scores = RAPS(k_reg=tuning["value"]).label_scores(logits[torch.from_numpy(rest)], y[torch.from_numpy(rest)])
    for i, name in enumerate(cert["groups"]["labels"]):
        mine = sorted(float(s) for s, g in zip(scores, labels[rest], strict=True) if g == name)
        k = math.ceil((len(mine) + 1) * 0.9)
        assert cert["groups"]["counts"][i] == len(mine) and cert["groups"]["rank"][i] == k
        assert cert["groups"]["quantile"][i] == pytest.approx(mine[k - 1], rel=1e-5)
