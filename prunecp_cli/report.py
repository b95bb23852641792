"""``report``: what pruning bought: channels, parameters, FLOPs and measured latency, per layer.

The baseline is ``--baseline DENSE`` when given; for a prunecp file without it, the unpruned
architecture is rebuilt from the file's metadata (its weights do not matter for cost). Latency is the
median of repeated timed forward passes after warm-up, on the chosen device, for both models.
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
from prunecp_cli.runtime import SILENT, Reporter
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


PROVENANCE_KEYS = ("method", "target", "source_sha256", "data_sha256", "risk_control", "sparsity", "schedule",
                   "finetune")


def provenance_rows(meta: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows saying how a model was pruned, from its metadata."""
    rows = []
    if meta.get("method"):
        rows.append(("importance method", str(meta["method"])))
    target = meta.get("target") or {}
    if target.get("target_flops") is not None:
        rows.append(("target", f"keep {target['target_flops']} of dense FLOPs ({target.get('scope', 'local')})"))
    elif target.get("ratio") is not None:
        what = "weights" if target.get("granularity") == "weight" else "channels"
        rows.append(("target", f"remove {target['ratio']} of {what} ({target.get('scope', 'global')})"))
    if target.get("steps", 1) > 1:
        rows.append(("schedule", f"{target['steps']} equal steps"))
    tune = meta.get("finetune")
    if tune:
        rows.append(("fine-tuning", f"{tune['loss']}, {tune['epochs']} epoch(s) per step, lr {tune['lr']}"))
    last = (meta.get("schedule") or [{}])[-1]
    if "accuracy" in last:
        rows.append(("score split after pruning", f"top-1 {last['accuracy']:.4f}, mean set size "
                     f"{last['mean_set_size']:.3f} (alpha 0.1)"))
    roles = {}
    for record in meta.get("data_sha256") or []:
        roles.setdefault(record["file"], []).append(record["role"])
    if roles:
        rows.append(("data seen", "; ".join(f"{f} ({', '.join(r)})" for f, r in roles.items())))
    control = meta.get("risk_control")
    if control and control.get("bound_to_weights", True):
        rows.append(("Learn-then-Test", str(control.get("statement", ""))))
    elif control:
        rows.append(("Learn-then-Test", "a record is present but was not made for these weights (the model was "
                     "changed after the test): no risk guarantee applies"))
    sparsity = meta.get("sparsity")
    if sparsity:
        rows.append(("weight sparsity", f"{sparsity.get('zeroed_fraction', 0):.1%} of weights zeroed: shapes and "
                     "FLOPs unchanged, no speed-up without a sparse kernel"))
    return rows


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
    batch_size: int = 32,
    repeats: int = 30,
    latency: bool = True,
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
        batch_size: examples per timed forward pass.
        repeats: timed forward passes per model.
        latency: measure latency (off to save time).
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
    if latency:
        with reporter.status("timing"):
            shape = tuple(session.input_shape)
            timings["after"] = measure_latency(pruned, shape, batch_size=batch_size, device=session.device,
                                               repeats=repeats)
            if dense is not None:
                timings["before"] = measure_latency(dense, shape, batch_size=batch_size, device=session.device,
                                                    repeats=repeats)
        pruned.cpu()
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
    )


def _provenance(extra: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The provenance fields, with the Learn-then-Test record marked by whether it is about ``model``."""
    fields = {k: v for k, v in extra.items() if k in PROVENANCE_KEYS}
    control = fields.get("risk_control")
    if isinstance(control, dict):
        fields["risk_control"] = {**control, "bound_to_weights": control.get("weights_sha256") == weights_sha256(model)}
    return fields


def _fmt_count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _pair(before, after, fmt=_fmt_count) -> str:
    return fmt(after) if before is None else f"{fmt(before)} → {fmt(after)}"


def _pct(before, after) -> str:
    red = _reduction(before, after)
    return "-" if red is None else f"{-red:+.1%}"


def summary_rows(data: ReportData) -> list[tuple[str, str, str]]:
    """(quantity, before → after, change) rows of the totals table."""
    lat_b, lat_a = data.latency.get("before"), data.latency.get("after")
    rows = [
        ("parameters", _pair(data.params["before"], data.params["after"]), _pct(data.params["before"], data.params["after"])),
        ("FLOPs", _pair(data.flops["before"], data.flops["after"]), _pct(data.flops["before"], data.flops["after"])),
    ]
    if lat_a is not None:
        ms = lambda v: f"{v:.2f} ms"  # noqa: E731
        rows.append((
            f"latency (batch {lat_a.batch_size}, {lat_a.device}, median of {lat_a.repeats})",
            _pair(lat_b.median_ms if lat_b else None, lat_a.median_ms, ms),
            _pct(lat_b.median_ms if lat_b else None, lat_a.median_ms),
        ))
    return rows


def render_table(data: ReportData, console) -> None:
    """Print the report as rich tables."""
    from rich.table import Table

    layers = Table(title=f"Layers of {data.model}", caption=data.flops_unit)
    for column in ("layer", "type", "channels", "params", "FLOPs", "FLOPs change"):
        layers.add_column(column, justify="left" if column in ("layer", "type") else "right")
    for row in data.rows:
        layers.add_row(row.name, row.kind, _pair(row.channels_before, row.channels_after, str),
                       _pair(row.params_before, row.params_after), _pair(row.flops_before, row.flops_after),
                       _pct(row.flops_before, row.flops_after))
    console.print(layers)
    totals = Table(title="Totals" + (f" (baseline: {data.baseline})" if data.baseline else ""))
    for column in ("quantity", "value", "change"):
        totals.add_column(column, justify="left" if column == "quantity" else "right")
    for row in summary_rows(data):
        totals.add_row(*row)
    console.print(totals)
    made = provenance_rows(data.metadata)
    if made:
        table = Table(title="How this model was made")
        table.add_column("field")
        table.add_column("value", overflow="fold")
        for key, value in made:
            table.add_row(key, value)
        console.print(table)
    if data.certificate:
        render_certificate(data.certificate, console)


def render_certificate(cert: dict[str, Any], console) -> None:
    """Print a certificate's key figures."""
    from rich.table import Table

    table = Table(title="Conformal certificate")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in certificate_rows(cert):
        table.add_row(key, value)
    console.print(table)


def certificate_rows(cert: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows summarising a certificate (schema 1, see prunecp_cli.conformal.certificate)."""
    guarantee = cert.get("guarantee", {})
    calib = cert.get("calibration", {})
    nc = cert.get("nonconformity", {})
    params = ", ".join(f"{k}={v}" for k, v in nc.get("parameters", {}).items())
    rows = [
        ("nonconformity", f"{nc.get('name')}" + (f" ({params})" if params else "")),
        ("alpha", f"{cert.get('alpha')}"),
        ("quantile q̂", _fmt_quantile(cert.get("quantile"))),
        ("guarantee", f"{guarantee.get('type')}" + (" (per class)" if cert.get("class_conditional") else "")),
        ("coverage at least", f"{guarantee.get('coverage_at_least')}"),
    ]
    if guarantee.get("coverage_at_most") is not None:
        rows.append(("coverage at most", f"{guarantee['coverage_at_most']:.6f}"))
    if guarantee.get("confidence") is not None:
        rows.append(("confidence (1-delta)", f"{guarantee['confidence']}"))
    rows += [
        ("calibration n", f"{cert.get('data', {}).get('n')} ({cert.get('data', {}).get('file')})"),
        ("calibration coverage", f"{calib.get('coverage', float('nan')):.4f}"),
        ("calibration mean set size", f"{calib.get('mean_set_size', float('nan')):.3f}"),
        ("calibration top-1 accuracy", f"{calib.get('top1_accuracy', float('nan')):.4f}"),
    ]
    if "binds_model" in cert:
        rows.append(("binds this model file", "yes" if cert["binds_model"] else "NO (recalibrate)"))
    control = cert.get("risk_control")
    if control:
        bound = control.get("max_risk") if control.get("max_risk") is not None else control.get("max_set_size")
        whose = "" if cert.get("binds_model", True) else " for the model the certificate binds, not this file"
        rows.append(("risk control", f"{control.get('risk')} <= {bound} with confidence "
                     f"{control.get('confidence')} (Learn-then-Test, n={control.get('n')}){whose}"))
        if control.get("level_text") is not None:
            rows.append(("risk-certified level", f"{control['level_text']}"))
    return rows


def _fmt_quantile(value) -> str:
    if isinstance(value, list):
        return f"per class ({len(value)})"
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def render_markdown(data: ReportData) -> str:
    """The report as GitHub Markdown tables."""
    lines = [f"### Layers of `{data.model}`", "", "| layer | type | channels | params | FLOPs | FLOPs change |",
             "|---|---|---:|---:|---:|---:|"]
    for r in data.rows:
        lines.append(f"| `{r.name}` | {r.kind} | {_pair(r.channels_before, r.channels_after, str)} | "
                     f"{_pair(r.params_before, r.params_after)} | {_pair(r.flops_before, r.flops_after)} | "
                     f"{_pct(r.flops_before, r.flops_after)} |")
    lines += ["", f"_{data.flops_unit}_", "", "| quantity | value | change |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(data)]
    made = provenance_rows(data.metadata)
    if made:
        lines += ["", "| how this model was made | |", "|---|---|"]
        lines += [f"| {a} | {b} |" for a, b in made]
    if data.certificate:
        lines += ["", "| certificate | value |", "|---|---:|"]
        lines += [f"| {a} | {b} |" for a, b in certificate_rows(data.certificate)]
    return "\n".join(lines) + "\n"
