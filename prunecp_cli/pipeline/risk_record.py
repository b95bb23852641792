"""The Learn-then-Test record a new certificate copies from its model (``calibrate``), and when it applies."""

from __future__ import annotations

import json
from typing import Any

from prunecp_cli.conformal.nonconformity import Nonconformity
from prunecp_cli.runtime import SILENT, Reporter

__all__ = ["risk_record"]


def risk_record(
    control: Any,
    *,
    weights: str,
    nonconformity: Nonconformity,
    alpha: float,
    delta: float | None,
    class_conditional: bool,
    reporter: Reporter = SILENT,
) -> dict[str, Any] | None:
    """The model's Learn-then-Test record for a new certificate, or None when it does not apply.

    A record is copied only when it was made for exactly these weights (its ``weights_sha256``), and a
    set-size record only when the certificate's sets are the ones it tested (same nonconformity and
    parameters, alpha, delta and class-conditional choice). The copy says which threshold it is about:
    the set-size test recalibrated q̂ on the risk data at each level, so its bound is about those
    sets, not about this certificate's q̂; the other risks are about top-1 predictions and use no q̂.

    Args:
        control: the model metadata's ``risk_control`` record (None when absent).
        weights: :func:`~prunecp_cli.io.digest.weights_sha256` of the model being calibrated.
        nonconformity: the certificate's score, after any tuning.
        alpha: the certificate's alpha.
        delta: the certificate's delta (None: marginal).
        class_conditional: whether the certificate has one threshold per class.
        reporter: receives a warning when a record is left out.
    """
    if not isinstance(control, dict):
        return None
    if control.get("weights_sha256") != weights:
        reporter.warn("the model carries a Learn-then-Test record that was not made for these weights (the model "
                      "was changed after the test); it is left out of the certificate")
        return None
    record = dict(control)
    if control.get("risk") != "set-size":
        record["threshold"] = {"uses_quantile": False, "about": "the model's top-1 predictions; the bound does not "
                               "depend on q-hat"}
        return record
    tested = control.get("set_size") or {}
    wanted = {"nonconformity": {"name": nonconformity.name, "parameters": nonconformity.parameters()},
              "alpha": float(alpha), "delta": None if delta is None else float(delta),
              "class_conditional": bool(class_conditional)}
    have = {key: tested.get(key) for key in wanted}
    if json.dumps(have, sort_keys=True) != json.dumps(wanted, sort_keys=True):
        reporter.warn(
            f"the model's Learn-then-Test set-size bound was tested on sets of {_sets_text(have)}, but this "
            f"certificate makes sets of {_sets_text(wanted)}; the bound is left out of the certificate")
        return None
    at_level = next((r for r in reversed(control.get("levels") or []) if r.get("level") == control.get("level")), {})
    record["threshold"] = {
        "uses_quantile": True, "quantile_in_test": at_level.get("qhat"),
        "about": f"sets with q-hat recalibrated on {tested.get('calibration_n')} points of the risk data "
                 f"({control.get('data_file')}), not this certificate's q-hat",
    }
    return record


def _sets_text(spec: dict[str, Any]) -> str:
    score = spec.get("nonconformity") or {}
    text = f"{score.get('name')} {json.dumps(score.get('parameters'), sort_keys=True)} at alpha {spec.get('alpha')}"
    if spec.get("delta") is not None:
        text += f", delta {spec['delta']}"
    return text + (", per class" if spec.get("class_conditional") else "")
