"""--method auto: every candidate pruned and compared on held-out score data; the smallest sets win."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from testsupport import assert_one_line_error

from prunecp_cli import api
from prunecp_cli.conformal.quantile import conformal_rank
from prunecp_cli.errors import UsageError
from prunecp_cli.importance.auto import candidates, split
from prunecp_cli.io.checkpoint import open_model
from prunecp_cli.pipeline.auto import resplit_set_size


def test_resplit_set_size_matches_a_plain_loop():
    torch.manual_seed(0)
    logits, labels = torch.randn(60, 4) * 2, torch.randint(0, 4, (60,))
    got = resplit_set_size(logits, labels, alpha=0.2, resplits=7, seed=3)
    scores = 1 - torch.softmax(logits.double(), 1).numpy()
    y = labels.numpy()
    orders = np.random.default_rng(3).permuted(np.tile(np.arange(60), (7, 1)), axis=1)
    sizes, covered = [], []
    for order in orders:
        cal, test = order[:30], order[30:]
        q = np.sort(scores[cal, y[cal]])[conformal_rank(30, 0.2) - 1]
        sizes.append((scores[test] <= q).sum(1).mean())
        covered.append((scores[test, y[test]] <= q).mean())
    assert got["set_size"] == pytest.approx(np.mean(sizes)) and got["coverage"] == pytest.approx(np.mean(covered))


def test_split_and_candidates_are_checked():
    fit, hold = split(100, 0.4, seed=1)
    assert len(hold) == 40 and len(fit) == 60 and not set(fit) & set(hold)
    assert np.array_equal(split(100, 0.4, seed=1)[1], hold) and not np.array_equal(split(100, 0.4, seed=2)[1], hold)
    for bad in (0.0, 1.0):
        with pytest.raises(UsageError):
            split(100, bad, seed=0)
    with pytest.raises(UsageError, match="holds out"):
        split(50, 0.4, seed=0)
    assert candidates("l1, taylor") == ["l1", "taylor"]
    for bad in ("", "l1,l1", "auto", "nope"):
        with pytest.raises(UsageError):
            candidates(bad)


def test_auto_keeps_the_candidate_with_the_smallest_holdout_sets(tmp_path, trained_digits, digits_files):
    """prune --method auto and score --method auto + prune --scores make the same choice and the same model."""
    dense = trained_digits["safetensors"]
    pruning = api.PruneOptions(target_flops=0.5)
    direct = api.prune(dense, tmp_path / "direct.safetensors", method="auto", data=digits_files["score"],
                       pruning=pruning)
    record = direct.extra["auto"]
    sizes = {c["method"]: c["holdout_set_size"] for c in record["candidates"]}
    assert list(sizes) == ["l1", "taylor", "cp-taylor"]
    assert record["chosen"] == min(sizes, key=sizes.get)
    assert len(set(sizes.values())) > 1  # the rankings differ, so the choice means something
    assert all(abs(c["flops_kept"] - 0.5) < 0.05 and 0.8 <= c["holdout_coverage"] <= 1.0
               for c in record["candidates"])
    assert record["fit_examples"] + record["holdout_examples"] == 359
    scores = tmp_path / "importance.json"
    table = api.score(dense, digits_files["score"], method="auto", output=scores)
    assert table.method == "auto"
    saved = json.loads(scores.read_text())
    assert all(len(g["auto:taylor"]) == g["channels"] for g in saved["groups"])
    via_file = api.prune(dense, tmp_path / "via-file.safetensors", scores=scores, data=digits_files["score"],
                         pruning=pruning)
    assert via_file.extra["auto"] == record and via_file.channels == direct.channels
    meta = open_model(tmp_path / "via-file.safetensors").meta.extra
    assert meta["method"] == "auto" and meta["auto"]["chosen"] == record["chosen"]
    score_sha = open_model(dense).sha256 and saved["data_sha256"]
    assert {(d["sha256"], d["role"]) for d in meta["data_sha256"]} == {(score_sha, "score"),
                                                                       (score_sha, "bn-recalibration")}
    # The choice is re-run on the same score data only.
    with pytest.raises(Exception, match="other score data"):
        api.prune(dense, tmp_path / "x.safetensors", scores=scores, data=digits_files["train"], pruning=pruning)


def test_auto_on_the_command_line(tmp_path, cli, trained_digits, digits_files):
    out = tmp_path / "auto.safetensors"
    result = cli("prune", trained_digits["safetensors"], "--method", "auto", "--opt", "candidates=l1,l2",
                 "--data", digits_files["score"], "--target-flops", "0.6", "-o", out)
    assert result.code == 0, result
    assert "--method auto" in result.stderr + result.stdout and "<- chosen" in result.stderr + result.stdout
    assert [c["method"] for c in open_model(out).meta.extra["auto"]["candidates"]] == ["l1", "l2"]
    result = cli("prune", trained_digits["safetensors"], "--method", "auto", "--data", digits_files["score"],
                 "--target-flops", "0.6", "--steps", "2", "-o", tmp_path / "y.safetensors")
    assert_one_line_error(result, 2, contains="--steps")
    result = cli("prune", trained_digits["safetensors"], "--method", "auto", "--opt", "candidates=l1,nope",
                 "--data", digits_files["score"], "--target-flops", "0.6", "-o", tmp_path / "z.safetensors")
    assert_one_line_error(result, 2, contains="nope")


def test_auto_is_refused_with_learn_then_test(tmp_path, trained_digits, digits_files):
    with pytest.raises(UsageError, match="grid of levels"):
        api.prune(trained_digits["safetensors"], tmp_path / "x.safetensors", method="auto", data=digits_files["score"],
                  risk=api.RiskOptions(digits_files["calib"], max_risk=0.1))
