"""``report``: what pruning bought: channels, parameters, FLOPs and measured latency, per layer.

The baseline is ``--baseline DENSE`` when given; for a prunecp file without it, the unpruned
architecture is rebuilt from the file's metadata (its weights do not matter for cost). Latency is the
median of repeated timed forward passes after warm-up, on the chosen device, for both models.

This step returns :class:`ReportData` and prints nothing; :mod:`prunecp_cli.present` renders it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunecp_cli.io.arch import build_model
from prunecp_cli.io.checkpoint import open_model
from prunecp_cli.io.digest import weights_sha256
from prunecp_cli.measure import FLOPS_UNIT, Latency, count_params, flops_by_module, measure_latency
from prunecp_cli.pipeline.session import open_session
from prunecp_cli.reporting import SILENT, Reporter
from prunecp_cli.surgery.groups import CONV_TYPES


@dataclass(frozen=True)
class LayerRow:
    """One convolution or linear layer, before and after pruning."""

    name: str
    kind: str
    channels_before: int | None
    channels_after: int
    params_before: int | None
    params_after: int
    flops_before: int | None
    flops_after: int


@dataclass
class ReportData:
    """Everything ``report`` shows (JSON-serialisable through :meth:`to_json`)."""

    model: str
    baseline: str | None
    input_shape: list[int]
    rows: list[LayerRow]
    params: dict[str, int | None]
    flops: dict[str, int | None]
    latency: dict[str, Latency | None]
    flops_unit: str = FLOPS_UNIT
    metadata: dict[str, Any] = field(default_factory=dict)
    certificate: dict[str, Any] | None = None
    deployment: list[dict[str, Any]] | None = None
    architecture: dict[str, Any] | None = None
    """``{arch, arch_kwargs}`` of the model (None for an export)."""
    """``report --ort``: PyTorch and ONNX Runtime latency rows (see :mod:`prunecp_cli.pipeline.report_ort`)."""

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        out = asdict(self)
        out["reduction"] = {
            "params": _reduction(self.params.get("before"), self.params["after"]),
            "flops": _reduction(self.flops.get("before"), self.flops["after"]),
            "latency": _reduction(
                self.latency["before"].median_ms if self.latency.get("before") else None,
                self.latency["after"].median_ms if self.latency.get("after") else None,
            ),
        }
        return out


def _reduction(before, after) -> float | None:
    if before in (None, 0) or after is None:
        return None
    return 1.0 - after / before


PROVENANCE_KEYS = ("method", "target", "source_file", "source_sha256", "data_sha256", "risk_control", "sparsity", "schedule",
                   "finetune")


@dataclass(frozen=True)
class Timing:
    """What ``report`` times.

    Attributes:
        latency: time both models in PyTorch.
        batch_size: examples per timed forward pass.
        repeats: timed forward passes per model.
        ort: also time them in ONNX Runtime, at batch 1 and ``batch_size`` (``report --ort``).
    """

    latency: bool = True
    batch_size: int = 32
    repeats: int = 30
    ort: bool = False


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, *CONV_TYPES))}


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def report(
    model: str | Path,
    *,
    baseline: str | Path | None = None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    device: str = "auto",
    timing: Timing = Timing(),
    cert: str | Path | None = None,
    reporter: Reporter = SILENT,
    trust_arch: bool = False,
) -> ReportData:
    """Compare a (pruned) model with its dense baseline.

    Args:
        model: a prunecp model file or a dense checkpoint (with ``arch``).
        baseline: the dense checkpoint to compare with (default: the unpruned architecture).
        arch: architecture spec for dense checkpoints.
        arch_kwargs: its keyword arguments.
        input_shape: example shape when the file does not record one.
        device: where to time the models.
        timing: what to time (:class:`Timing`; ``latency=False`` saves time).
        cert: a ``certificate.json`` to summarise (validated with ``load_certificate``).
        reporter: progress and messages.
        trust_arch: build the architecture a prunecp file (``model`` or ``baseline``) names even from an
            untrusted module (``--trust-arch``).
    """
    certificate = None
    if cert is not None:
        from prunecp_cli.conformal.certificate import load_certificate

        certificate = load_certificate(cert)
    session = open_session(model, arch=arch, arch_kwargs=arch_kwargs, input_shape=input_shape, device=device,
                           trust_arch=trust_arch)
    if certificate is not None:
        certificate = {**certificate, "binds_model": certificate["model"]["sha256"] == session.loaded.sha256}
    pruned, meta, example = session.model, session.loaded.meta, session.example
    dense: nn.Module | None = None
    if baseline is not None:
        base_arch = arch or meta.arch
        dense = open_model(baseline, arch=base_arch, arch_kwargs=arch_kwargs or meta.arch_kwargs,
                           trust_arch=trust_arch).model
    elif session.loaded.is_prunecp_file and meta.plan:
        dense = build_model(meta.arch, meta.arch_kwargs, origin=session.loaded.path)  # allowed by open_session
    after_flops = flops_by_module(pruned, example)
    before_flops = flops_by_module(dense, example) if dense is not None else {}
    dense_layers = _layers(dense) if dense is not None else {}
    rows = []
    for name, module in _layers(pruned).items():
        base = dense_layers.get(name)
        rows.append(LayerRow(
            name=name,
            kind=type(module).__name__,
            channels_before=_width(base) if base is not None else None,
            channels_after=_width(module),
            params_before=sum(p.numel() for p in base.parameters(recurse=False)) if base is not None else None,
            params_after=sum(p.numel() for p in module.parameters(recurse=False)),
            flops_before=before_flops.get(name) if base is not None else None,
            flops_after=after_flops.get(name, 0),
        ))
    timings: dict[str, Latency | None] = {"before": None, "after": None}
    if timing.latency:
        with reporter.status("timing"):
            shape = tuple(session.input_shape)
            timings["after"] = measure_latency(pruned, shape, batch_size=timing.batch_size, device=session.device,
                                               repeats=timing.repeats)
            if dense is not None:
                timings["before"] = measure_latency(dense, shape, batch_size=timing.batch_size,
                                                    device=session.device, repeats=timing.repeats)
        pruned.cpu()
    deployment = None
    if timing.ort:
        from prunecp_cli.pipeline.report_ort import deployment_latency

        measured = None
        if timings["after"] is not None and session.device.type == "cpu":  # the latency row above, not timed twice
            measured = {timing.batch_size: {"pruned": timings["after"].median_ms,
                                            "dense": timings["before"].median_ms if timings["before"] else None}}
        with reporter.status("timing PyTorch and ONNX Runtime"):
            deployment = deployment_latency({"dense": dense, "pruned": pruned.cpu()}, example,
                                            batch_sizes=[1, timing.batch_size], repeats=timing.repeats,
                                            measured=measured)
    return ReportData(
        model=str(model),
        baseline=str(baseline) if baseline is not None else ("unpruned architecture" if dense is not None else None),
        input_shape=session.input_shape,
        rows=rows,
        params={"before": count_params(dense) if dense is not None else None, "after": count_params(pruned)},
        flops={"before": before_flops.get("") if dense is not None else None, "after": after_flops[""]},
        latency=timings,
        metadata=_provenance(meta.extra, pruned),
        certificate=certificate,
        deployment=deployment,
        architecture={"arch": meta.arch, "arch_kwargs": meta.arch_kwargs},
    )


def _provenance(extra: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The provenance fields, with the Learn-then-Test record marked by whether it is about ``model``."""
    fields = {k: v for k, v in extra.items() if k in PROVENANCE_KEYS}
    control = fields.get("risk_control")
    if isinstance(control, dict):
        fields["risk_control"] = {**control, "bound_to_weights": control.get("weights_sha256") == weights_sha256(model)}
    return fields
