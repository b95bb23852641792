"""Everything prunecp draws for people: the report's tables, the certificate summary, the verdict panel.

Only the command layer (``prunecp_cli.commands``) and the demo import this module; the library
returns data (:class:`~prunecp_cli.pipeline.report.ReportData`, the certificate and verdict dicts)
and renders nothing. Nothing here imports torch, and rich is imported inside the functions that
draw, so ``prunecp --help`` loads neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prunecp_cli.reporting import is_main_process

if TYPE_CHECKING:
    from rich.console import Console

    from prunecp_cli.pipeline.report import ReportData


def console() -> Console:
    """A rich console on stdout (rank 0 prints; other ranks get a silent one)."""
    from rich.console import Console

    return Console(quiet=not is_main_process(), highlight=False)


def render_verdict(verdict: dict[str, Any], console: Console) -> None:
    """Print the verdict as a rich panel."""
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    table = Table.grid(padding=(0, 2))
    table.add_column(justify="left")
    table.add_column()
    for check in verdict["checks"]:
        mark = "[green]✓ pass[/green]" if check["passed"] else "[red]✗ FAIL[/red]"
        table.add_row(f"{mark} {escape(check['name'])}", escape(check["detail"]))
    if verdict.get("coverage") is not None:
        table.add_row("", "")
        table.add_row("test coverage", f"{verdict['coverage']:.4f} ({verdict['covered']}/{verdict['n']}); "
                      f"certificate: >= {verdict['coverage_at_least']:g} ({verdict['guarantee']})")
        table.add_row("mean set size", f"{verdict['mean_set_size']:.3f}")
        table.add_row("set sizes", ", ".join(f"{s}: {n}" for s, n in enumerate(verdict["set_size_histogram"]) if n))
        table.add_row("p-value", f"{verdict['p_value']:.4g} (significance {verdict['significance']:g}; "
                      f"{verdict['test']})")
        drop = verdict.get("min_detectable_drop")
        table.add_row("power", "no coverage drop can be detected with this few test points" if drop is None else
                      f"a coverage drop of {drop * 100:.2f} points is detected with probability "
                      f"{verdict.get('detection_power', 0.8):g}; smaller drops may pass unnoticed")
        per_class = verdict.get("per_class_coverage") or []
        table.add_row("per-class coverage", " ".join("-" if v is None else f"{v:.2f}" for v in per_class))
        for name, value in conditional_rows(verdict, alpha=verdict["alpha"]):
            table.add_row(name, value)
    for message in verdict.get("warnings", []):
        table.add_row("[yellow]! warning[/yellow]", escape(message))
    title = "certificate holds" if verdict["passed"] else "certificate does NOT hold"
    console.print(Panel(table, title=f"[bold]{title}[/bold]", border_style="green" if verdict["passed"] else "red"))


def conditional_rows(metrics: dict[str, Any], *, alpha: float) -> list[tuple[str, str]]:
    """(field, value) rows of the conditional-coverage metrics (verdict or certificate calibration record)."""
    if metrics.get("class_coverage_gap") is None:
        return []
    worst = metrics["worst_class"]
    rows = [("class coverage gap", f"{metrics['class_coverage_gap']:.4f} (mean |class coverage - {1 - alpha:g}|); "
             f"worst class {worst['class']}: {worst['coverage']:.4f} ({worst['n']} points)"),
            ("size-stratified coverage", f"SSCV {metrics['sscv']:.4f}; " + ", ".join(
                f"sizes {s['sizes']}: {s['coverage']:.3f} ({s['n']})" for s in metrics["size_strata"])),
            ("singleton / empty sets", f"{metrics['singleton_rate']:.4f} / {metrics['empty_rate']:.4f}")]
    groups = metrics.get("groups")
    if groups:
        shown = ", ".join(f"{g['group']}: {g['coverage']:.3f} ({g['n']})" for g in groups["per_group"][:8])
        more = f" and {len(groups['per_group']) - 8} more" if len(groups["per_group"]) > 8 else ""
        rows.append(("group coverage", f"{shown}{more}; gap {groups['group_coverage_gap']:.4f}, worst group "
                     f"{groups['worst_group']['group']} {groups['worst_group']['coverage']:.4f}"))
    return rows


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
    if before in (None, 0) or after is None:
        return "-"
    return f"{-(1.0 - after / before):+.1%}"


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
    for row in data.deployment or []:  # report --ort
        rows.append((f"{row['runtime']} latency (batch {row['batch_size']}, {row['device']}, {row['threads']} "
                     f"threads, median of {row['repeats']})", _pair(row["dense_ms"], row["pruned_ms"], _ms),
                     _pct(row["dense_ms"], row["pruned_ms"])))
    return rows


def _ms(value: float) -> str:
    return f"{value:.2f} ms"


def render_table(data: ReportData, console: Console) -> None:
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


def table_text(data: ReportData, *, width: int = 120) -> str:
    """The report's rich tables as text, ``width`` columns wide (``report --format table -o FILE``)."""
    import io

    from rich.console import Console

    capture = Console(width=width, file=io.StringIO())
    render_table(data, capture)
    return capture.file.getvalue()


def render_certificate(cert: dict[str, Any], console: Console) -> None:
    """Print a certificate's key figures."""
    from rich.table import Table

    table = Table(title="Conformal certificate")
    table.add_column("field")
    table.add_column("value", justify="right")
    for key, value in certificate_rows(cert):
        table.add_row(key, value)
    console.print(table)


def certificate_rows(cert: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, value) rows summarising a certificate (schema 1 or 2, see prunecp_cli.conformal.certificate)."""
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
    if isinstance(cert.get("alpha"), (int, float)):
        rows += [(f"calibration {name}", value) for name, value in conditional_rows(calib, alpha=cert["alpha"])]
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
    if value is None:
        return "per group (see groups)"
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


def auto_lines(record: dict[str, Any]) -> list[str]:
    """Lines describing a ``--method auto`` choice: every candidate's held-out figures, the winner marked."""
    lines = [f"--method auto: mean LAC set size (alpha {record['alpha']:g}) over {record['resplits']} re-splits of "
             f"{record['holdout_examples']} held-out score examples"]
    for c in record["candidates"]:
        mark = "  <- chosen" if c["method"] == record["chosen"] else ""
        lines.append(f"  {c['method']:<14} set size {c['holdout_set_size']:.3f}, coverage {c['holdout_coverage']:.3f}, "
                     f"accuracy {c['holdout_accuracy']:.3f}, FLOPs kept {c['flops_kept']:.3f}{mark}")
    return lines
