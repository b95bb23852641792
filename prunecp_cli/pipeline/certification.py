"""``certify``: audit a certificate on held-out test data, for a CI gate (exit 0 passed, 4 failed).

Checks, in order (each is an entry of the verdict's ``checks``):

1. ``model-sha256``: the model file is the one the certificate binds (else the certificate says
   nothing about it: failed, and the coverage test is skipped).
2. ``test-data``: the test file is neither the calibration file nor data the model used (score,
   BN recalibration, fine-tune, risk). This is bad input rather than a failed audit, so it raises
   (exit 3) instead of failing the check.
3. ``coverage``: is the observed coverage improbably low if the certificate holds? The test uses the
   exact distribution of the number of covered test points ``X`` among ``m``:

   * marginal: ``X ~ BetaBinomial(m, k, n+1-k)`` with the certificate's ``n`` and rank ``k``, exact for
     exchangeable data and continuous scores (ties only raise coverage, so the p-value stays valid);
   * training-conditional (``pac_test="beta-binomial"``, the default): ``X ~ BetaBinomial(m, k*, n+1-k*)``
     with the PAC rank ``k*``: given the calibration draw the coverage is ``Beta(k*, n+1-k*)`` whatever
     ``delta`` is, so the test is exact at level ``significance`` (ties only raise coverage);
   * training-conditional with ``pac_test="binomial"`` (the test before schema 2): ``X`` stochastically
     larger than ``Bin(m, 1-alpha)`` whenever the stated bound holds (it does with probability
     ``>= 1-delta``), so it fails an honest audit with probability at most ``delta + significance``
     but, in practice, far less often than ``significance`` (it is conservative and has less power);
   * class-conditional: the same per class (with the class's ``n_c``, ``k_c`` and test points), and
     a Bonferroni correction over the ``J`` classes with test points, ``p = min(1, J * min_c p_c)``, so
     a valid certificate fails with probability at most the significance (plus ``J*delta`` for a PAC
     certificate under the binomial test).

   It fails when ``p < significance``. A correct certificate therefore fails at most a ``significance``
   share of honest audits (``delta + significance`` for the binomial PAC test).

The verdict also states the test's power, ``min_detectable_drop`` (the smallest coverage drop failed
with probability 0.8 at this ``n``, ``m`` and significance, from the same law:
:mod:`prunecp_cli.conformal.power`), and the conditional metrics of
:mod:`prunecp_cli.conformal.conditional` (class coverage gap, worst class, SSCV, singleton and empty
rates; per group with ``groups``). Verdict ``schema_version`` 2 added these fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prunecp_cli.conformal.certificate import load_certificate, validate_certificate
from prunecp_cli.conformal.conditional import conditional_metrics, group_metrics
from prunecp_cli.conformal.mondrian import group_index
from prunecp_cli.conformal.nonconformity import from_parameters, prediction_sets
from prunecp_cli.conformal.power import DETECTION_POWER, CoverageLaw, min_detectable_drop
from prunecp_cli.conformal.predictor import CERTIFY_STREAM, certificate_threshold
from prunecp_cli.conformal.quantile import decimal_fraction
from prunecp_cli.conformal.stats import covered_count, p_value_marginal, p_value_pac
from prunecp_cli.errors import CalibrationError, DataError, UsageError
from prunecp_cli.options import DataSource, ModelSource, RunOptions
from prunecp_cli.pipeline.calibration import check_labels, check_unused, set_metrics
from prunecp_cli.pipeline.export_check import export_binding
from prunecp_cli.pipeline.groups import read_groups
from prunecp_cli.pipeline.inference import collect_logits
from prunecp_cli.pipeline.session import open_source

__all__ = ["PAC_TESTS", "VERDICT_SCHEMA_VERSION", "certify", "failure_message", "verdict_from_logits"]

VERDICT_SCHEMA_VERSION = 2
"""Version of the verdict's layout (2 added power, conditional metrics, groups and ``pac_test``)."""
PAC_TESTS = ("beta-binomial", "binomial")
"""How a training-conditional certificate is tested (module docstring); the first is the default."""


def _check_pac_test(pac_test: str) -> None:
    if pac_test not in PAC_TESTS:
        raise UsageError(f"{{pac_test}} {pac_test!r} is unknown; use one of {', '.join(PAC_TESTS)}",
                         arguments={"pac_test": "pac_test"})


def _law(m: int, *, certificate: dict[str, Any], nk: tuple[int, int] | None, pac_test: str) -> CoverageLaw:
    """The null law of the covered count among ``m`` test points (of a stratum calibrated on ``nk = (n, k)``)."""
    if certificate["delta"] is not None and pac_test == "binomial":
        return CoverageLaw(m, coverage=1 - certificate["alpha"])
    n, k = (certificate["data"]["n"], certificate["rank"]) if nk is None else nk
    return CoverageLaw(m, n=n, k=k)


def _p_value(covered: int, m: int, *, certificate: dict[str, Any], nk: tuple[int, int] | None = None,
             pac_test: str = PAC_TESTS[0]) -> tuple[float, str]:
    law = _law(m, certificate=certificate, nk=nk, pac_test=pac_test)
    if law.coverage is not None:
        return p_value_pac(covered, m, alpha=certificate["alpha"]), f"Binomial({m}, {1 - certificate['alpha']:g})"
    at = " at the PAC rank" if certificate["delta"] is not None else ""
    return (p_value_marginal(covered, m, n=law.n, k=law.k),
            f"Beta-Binomial({m}, {law.k}, {law.n + 1 - law.k}){at}")


CLASS_WARNING_LEVEL = 0.01
"""Family-wise level of the per-class low-coverage warning (Bonferroni over the classes)."""
CLASS_WARNING_GAP = 0.05
"""A class is flagged only when its coverage is at least this far below 1 - alpha."""


def low_coverage_classes(sets: torch.Tensor, labels: torch.Tensor, *, alpha: float) -> list[dict[str, Any]]:
    """Classes whose test coverage is far below ``1 - alpha`` (a warning for marginal certificates).

    A marginal certificate promises coverage on average over classes, not within each; a class
    whose coverage is both ``CLASS_WARNING_GAP`` below ``1 - alpha`` and improbably low under
    ``Bin(m_c, 1 - alpha)`` at level ``CLASS_WARNING_LEVEL / J`` (``J`` classes with test points) is
    reported, so users learn that ``--class-conditional`` would help. This is a screen, not a test
    of the certificate: it never changes the verdict.
    """
    labels = labels.to(sets.device)
    present = [c for c in range(sets.shape[1]) if int((labels == c).sum()) > 0]
    flagged = []
    for c in present:
        mask = labels == c
        m_c = int(mask.sum())
        hits = covered_count(sets[mask], labels[mask])
        p_c = p_value_pac(hits, m_c, alpha=alpha)
        if hits / m_c <= 1 - alpha - CLASS_WARNING_GAP and p_c < CLASS_WARNING_LEVEL / len(present):
            flagged.append({"class": c, "n": m_c, "covered": hits, "coverage": hits / m_c, "p_value": p_c})
    return flagged


def class_warning(flagged: list[dict[str, Any]], *, alpha: float) -> str:
    """The warning line for :func:`low_coverage_classes`."""
    shown = ", ".join(f"class {r['class']} {r['coverage']:.2f} ({r['covered']}/{r['n']})" for r in flagged[:5])
    more = f" and {len(flagged) - 5} more" if len(flagged) > 5 else ""
    return (f"test coverage is far below {1 - alpha:g} in {len(flagged)} class(es): {shown}{more}; the "
            "certificate's guarantee is marginal (on average over classes), not per class: calibrate with "
            "--class-conditional for coverage within every class")


def verdict_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    certificate: dict[str, Any],
    significance: float = 0.01,
    generator: torch.Generator | None = None,
    pac_test: str = PAC_TESTS[0],
    groups: list[Any] | None = None,
) -> dict[str, Any]:
    """The coverage audit of a certificate on test logits (a pure function; see the module docstring).

    Args:
        logits: Test logits ``[m, K]``.
        labels: Test labels ``[m]``.
        certificate: A validated certificate.
        significance: Fail when the p-value is below this.
        generator: Source of ``U`` for randomised scores (default: the certificate seed's
            :data:`CERTIFY_STREAM`, never the calibration stream).
        pac_test: ``beta-binomial`` (exact) or ``binomial`` (conservative), for PAC certificates.
        groups: One group label per test point, for the per-group metrics, or None; required for a
            group-conditional certificate, whose groups are then tested like classes (Bonferroni).

    Returns:
        ``{schema_version, passed, coverage, covered, n, mean_set_size, top1_accuracy, set_size_histogram,
        per_class_coverage, per_class, per_group, p_value, test, pac_test, significance, min_detectable_drop,
        detection_power, alpha, delta, guarantee, class_conditional, class_coverage_gap, worst_class, sscv,
        size_strata, singleton_rate, empty_rate, groups, low_coverage_classes, warnings, checks}``;
        ``checks`` holds the one ``coverage`` check; ``warnings`` holds the :func:`class_warning` line
        when classes are flagged; ``groups`` is None without group labels.

    Raises:
        UsageError: An unknown ``pac_test``.
        DataError: Labels outside the model's classes, the logits do not have the certificate's K, or a
            group-conditional certificate without (or with unknown) group labels.
    """
    decimal_fraction(significance, name="significance")
    _check_pac_test(pac_test)
    if logits.dim() != 2 or logits.shape[1] != certificate["model"]["num_classes"]:
        raise DataError(f"logits of shape {list(logits.shape)} do not fit a certificate for "
                        f"{certificate['model']['num_classes']} classes; use the certified model")
    labels = check_labels(labels, logits)
    if groups is not None and len(groups) != logits.shape[0]:
        raise DataError(f"{len(groups)} group labels for {logits.shape[0]} test points; give one group label per point")
    score = from_parameters(certificate["nonconformity"]["name"], certificate["nonconformity"]["parameters"])
    if generator is None and score.randomized:
        generator = score.make_generator(stream=CERTIFY_STREAM)
    all_scores = score.all_scores(logits, generator=generator)
    section = certificate.get("groups")
    if section:
        if groups is None:
            raise DataError("the certificate is group-conditional (calibrate --groups): pass the test examples' "
                            "group labels with --groups (groups=) so that each point gets its group's threshold")
        index = group_index(groups, section["labels"], where="the test group labels").to(all_scores.device)
        qhat = torch.tensor(section["quantile"], dtype=torch.float64, device=all_scores.device)[index].unsqueeze(1)
        strata = [("group", g, index == i, (section["counts"][i], section["rank"][i]))
                  for i, g in enumerate(section["labels"])]
    else:
        qhat = certificate_threshold(certificate)
        strata = [("class", c, labels.to(all_scores.device) == c, (certificate["class_counts"][c], certificate["rank"][c]))
                  for c in range(logits.shape[1])] if certificate["class_conditional"] else []
    sets = prediction_sets(all_scores, qhat)
    metrics = set_metrics(sets, labels, logits=logits)
    m, covered = int(labels.shape[0]), covered_count(sets, labels.to(sets.device))
    at_least = certificate["guarantee"]["coverage_at_least"]
    per_stratum = None
    if strata:
        per_stratum = []
        for unit, key, mask, nk in strata:
            m_c = int(mask.sum())
            if m_c == 0:
                per_stratum.append({unit: key, "n": 0, "covered": 0, "coverage": None, "p_value": None})
                continue
            hits = covered_count(sets[mask], labels.to(sets.device)[mask])
            p_c, _ = _p_value(hits, m_c, certificate=certificate, nk=nk, pac_test=pac_test)
            per_stratum.append({unit: key, "n": m_c, "covered": hits, "coverage": hits / m_c, "p_value": p_c,
                                "nk": nk})
        tested = [r for r in per_stratum if r["p_value"] is not None]
        worst = min(tested, key=lambda r: r["p_value"])
        p_value = min(1.0, len(tested) * worst["p_value"])
        family = "Binomial" if certificate["delta"] is not None and pac_test == "binomial" else "Beta-Binomial"
        unit = strata[0][0]
        test = f"{family} per {unit}, Bonferroni over {len(tested)} {unit}{'es' if unit == 'class' else 's'}"
        where = (f"{unit} {worst[unit]} (smallest p-value) coverage {worst['coverage']:.4f} "
                 f"({worst['covered']}/{worst['n']})")
        laws = [_law(r["n"], certificate=certificate, nk=r.pop("nk"), pac_test=pac_test) for r in tested]
    else:
        p_value, test = _p_value(covered, m, certificate=certificate, pac_test=pac_test)
        where = f"coverage {covered / m:.4f} ({covered}/{m})"
        laws = [_law(m, certificate=certificate, nk=None, pac_test=pac_test)]
    drop = min_detectable_drop(laws, significance)
    conditional = conditional_metrics(sets, labels, alpha=certificate["alpha"])
    by_group = None if groups is None else group_metrics(sets, labels, groups, alpha=certificate["alpha"])
    flagged = [] if certificate["class_conditional"] else low_coverage_classes(sets, labels,
                                                                                alpha=certificate["alpha"])
    passed = p_value >= significance
    if passed:
        detail = (f"{where} is consistent with coverage >= {at_least:g}: p = {p_value:.3g} >= significance "
                  f"{significance:g} ({test})")
    else:
        detail = (f"{where} is improbably low for a certificate claiming coverage >= {at_least:g}: p = {p_value:.3g} "
                  f"< significance {significance:g} ({test}); the test data are not exchangeable with the "
                  "calibration data or the certificate is wrong: recalibrate on data like the deployment data")
    return {
        "schema_version": VERDICT_SCHEMA_VERSION,
        "passed": passed,
        "coverage": covered / m,
        "covered": covered,
        "n": m,
        "mean_set_size": metrics["mean_set_size"],
        "top1_accuracy": metrics["top1_accuracy"],
        "set_size_histogram": metrics["set_size_histogram"],
        "per_class_coverage": metrics["per_class_coverage"],
        "per_class": per_stratum if certificate["class_conditional"] else None,
        "per_group": per_stratum if section else None,
        "p_value": p_value,
        "test": test,
        "pac_test": pac_test if certificate["delta"] is not None else None,
        "significance": significance,
        "min_detectable_drop": drop,
        "detection_power": DETECTION_POWER,
        "alpha": certificate["alpha"],
        "delta": certificate["delta"],
        "guarantee": certificate["guarantee"]["type"],
        "coverage_at_least": at_least,
        "class_conditional": certificate["class_conditional"],
        **conditional,
        "groups": by_group,
        "low_coverage_classes": flagged,
        # a failed coverage test says more than the per-class screen: warn only when the audit passed
        "warnings": [class_warning(flagged, alpha=certificate["alpha"])] if flagged and passed else [],
        "checks": [{"name": "coverage", "passed": passed, "detail": detail}],
    }


def failure_message(verdict: dict[str, Any]) -> str:
    """One line naming every failed check (for the exit-4 error)."""
    failed = [f"{c['name']}: {c['detail']}" for c in verdict["checks"] if not c["passed"]]
    return "certificate does not hold: " + " | ".join(failed)


def certify(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    cert: str | Path | dict[str, Any],
    significance: float = 0.01,
    pac_test: str = PAC_TESTS[0],
    groups: str | Path | None = None,
    run: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """Audit ``cert`` for ``model`` on the held-out test split ``data``.

    Args:
        model: The certified model file (a path, or a :class:`ModelSource`).
        data: The test split: labelled, and disjoint from calibration and from everything the model used.
        cert: The certificate (path or dict).
        significance: Fail the coverage test when its p-value is below this.
        pac_test: How a PAC certificate is tested: ``beta-binomial`` (exact) or ``binomial``.
        groups: A ``.npy``/``.txt`` file with one group label per test example, for per-group metrics.
        run: Device, batch size (default 256) and reporter.

    Returns:
        The verdict (see :func:`verdict_from_logits`) with ``model``, ``data`` and ``certificate``
        records and the checks ``model-sha256``, ``test-data`` and ``coverage``. It does not raise
        when the audit fails: ``verdict["passed"]`` says so (the CLI exits 4).

    Raises:
        UsageError: ``significance`` outside (0, 1).
        CertificateError: The certificate is malformed or of another schema.
        CalibrationError: The test data are the calibration data or data the model used.
        DataError: Unlabelled test data, labels outside the model's classes, or a groups file that does
            not fit the data.
    """
    decimal_fraction(significance, name="significance")
    _check_pac_test(pac_test)
    certificate = validate_certificate(cert) if isinstance(cert, dict) else load_certificate(cert)
    model, data = ModelSource.of(model), DataSource.of(data)
    batch_size, reporter = run.batch(256), run.rep
    session = open_source(model, data, device=run.device, need_labels=True)
    dataset, loaded = session.data, session.loaded
    if dataset.sha256 == certificate["data"]["sha256"]:
        raise CalibrationError(
            f"{dataset.path.name} is the calibration data of this certificate (same sha256 as "
            f"{certificate['data']['file']}); certify needs a held-out test split that calibration did not use"
        )
    check_unused(dataset.sha256, session.used_data(), file=dataset.path.name, purpose="test")
    group_labels, group_file = read_groups(groups, n=len(dataset)) if groups is not None else (None, None)
    checks = []
    expected = certificate["model"]["sha256"]
    bound = export_binding(loaded, certificate)  # an .onnx/.pt2 export: intact, of the certified model
    if bound is not None:
        checks.append(bound)
    elif loaded.sha256 != expected:
        checks.append({"name": "model-sha256", "passed": False, "detail": (
            f"model file {loaded.path.name} has sha256 {loaded.sha256[:16]}…, but the certificate binds "
            f"{certificate['model']['file']} with sha256 {expected[:16]}…: the model changed since calibration "
            "(or this is another model's certificate); recalibrate it with prunecp calibrate")})
    else:
        checks.append({"name": "model-sha256", "passed": True,
                       "detail": f"{loaded.path.name} is the certified model (sha256 {expected[:16]}…)"})
    checks.append({"name": "test-data", "passed": True, "detail": (
        f"{dataset.path.name} (sha256 {dataset.sha256[:16]}…) is neither the calibration data nor data the "
        "model used")})
    record = {"model": {"file": loaded.path.name, "sha256": loaded.sha256},
              "data": {"file": dataset.path.name, "sha256": dataset.sha256},
              "certificate": {"file": Path(cert).name if not isinstance(cert, dict) else None,
                              "model_sha256": expected, "data_sha256": certificate["data"]["sha256"]},
              "groups_file": group_file}
    if not checks[0]["passed"]:
        checks.append({"name": "coverage", "passed": False,
                       "detail": "skipped: the certificate does not apply to this model file"})
        return {"schema_version": VERDICT_SCHEMA_VERSION, "passed": False, "coverage": None, "covered": None, "n": len(dataset), "mean_set_size": None,
                "p_value": None, "significance": significance, "min_detectable_drop": None,
                "pac_test": pac_test if certificate["delta"] is not None else None, "alpha": certificate["alpha"],
                "delta": certificate["delta"], "guarantee": certificate["guarantee"]["type"],
                "coverage_at_least": certificate["guarantee"]["coverage_at_least"],
                "class_conditional": certificate["class_conditional"], "low_coverage_classes": [], "warnings": [],
                "checks": checks, **record}
    logits, labels = collect_logits(session.model, dataset, device=session.device, batch_size=batch_size,
                                    num_classes=session.num_classes, reporter=reporter, description="certify")
    verdict = verdict_from_logits(logits, labels, certificate=certificate, significance=significance,
                                  pac_test=pac_test, groups=group_labels)
    for message in verdict["warnings"]:
        reporter.warn(message)
    verdict["checks"] = checks + verdict["checks"]
    verdict["passed"] = all(c["passed"] for c in verdict["checks"])
    return {**verdict, **record}
