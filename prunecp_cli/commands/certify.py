"""``prunecp certify``: audit a certificate on held-out test data; exit 0 when it holds, 4 when not."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


@c.cli_command
def certify(
    model: Annotated[Path, typer.Argument(help="The certified model file.")],
    cert: Annotated[Path, typer.Option("--cert", "-c", help="certificate.json from prunecp calibrate.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Test split (labelled), disjoint from calibration and "
                                       "from every split the model has seen.", rich_help_panel="Data")],
    significance: Annotated[float, typer.Option("--significance", help="Fail when the coverage test's p-value is "
                                                "below this (a valid certificate fails this often at most).")] = 0.01,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for CI) instead of a panel.")] = False,
    arch: c.Arch = None,
    arch_kwargs: c.ArchKwargs = None,
    trust_arch: c.TrustArch = False,
    image_size: c.ImageSize = None,
    mean: c.Mean = None,
    std: c.Std = None,
    channels: c.Channels = None,
    device: c.Device = "auto",
    batch_size: c.BatchSize = 256,
    quiet: c.Quiet = False,
    debug: c.Debug = False,
) -> None:
    """Check the model hash and test the certificate's coverage on held-out data (exit 0 holds, 4 does not)."""
    c.check_unit(significance=significance)
    kwargs = c.arch_kwargs(arch_kwargs)
    pre = c.preprocess(image_size, mean, std, channels)
    from prunecp_cli import api
    from prunecp_cli.dist import rank
    from prunecp_cli.errors import CertificationFailed
    from prunecp_cli.pipeline.certification import failure_message

    verdict = api.certify(model, cert=cert, data=data, significance=significance, arch=arch,
                          arch_kwargs=kwargs,
                          preprocess=pre,
                          device=device, batch_size=batch_size, reporter=c.reporter(quiet, results_to_stderr=as_json),
                          trust_arch=trust_arch)
    if rank() == 0:
        if as_json:
            import json

            print(json.dumps(verdict, indent=2, allow_nan=False))
        else:
            render_verdict(verdict, c.console())
    if not verdict["passed"]:
        raise CertificationFailed(failure_message(verdict))


def render_verdict(verdict: dict, console) -> None:
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
        per_class = verdict.get("per_class_coverage") or []
        table.add_row("per-class coverage", " ".join("-" if v is None else f"{v:.2f}" for v in per_class))
    for message in verdict.get("warnings", []):
        table.add_row("[yellow]! warning[/yellow]", escape(message))
    title = "certificate holds" if verdict["passed"] else "certificate does NOT hold"
    console.print(Panel(table, title=f"[bold]{title}[/bold]", border_style="green" if verdict["passed"] else "red"))
