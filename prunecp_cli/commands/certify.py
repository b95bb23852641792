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
    from prunecp_cli import api
    from prunecp_cli.errors import CertificationFailed

    verdict = api.certify(c.model_source(model, arch, arch_kwargs, trust_arch=trust_arch),
                          c.data_source(data, image_size, mean, std, channels), cert=cert, significance=significance,
                          run=c.run_options(device, batch_size, quiet=quiet, results_to_stderr=as_json))
    if api.is_main_process():
        if as_json:
            import json

            print(json.dumps(verdict, indent=2, allow_nan=False))
        else:
            from prunecp_cli import present

            present.render_verdict(verdict, present.console())
    if not verdict["passed"]:
        raise CertificationFailed(api.failure_message(verdict))
