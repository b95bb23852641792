"""``prunecp export``: the certified model as ONNX or a torch.export program, checked to give the certified sets."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


class ExportFormat(str, Enum):
    """Export formats."""

    onnx = "onnx"
    pt2 = "pt2"


@c.cli_command
@c.shared(batch_size=256, seed=False)
def export(
    model: Annotated[Path, typer.Argument(help="The certified prunecp model file (.safetensors).")],
    cert: Annotated[Path, typer.Option("--cert", "-c", help="Its certificate.json; the essentials (score, alpha, "
                                       "q̂, guarantee, hashes) are embedded in the export.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The file to write: .onnx or .pt2, as --format says.")],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="onnx (torch.onnx dynamo exporter, checked "
                                              "with ONNX Runtime) or pt2 (torch.export program).")] = ExportFormat.onnx,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Inputs to check the export on: its prediction "
                                              "sets at q̂ must equal the certified model's on every one (labels not "
                                              "needed).", rich_help_panel="Data")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Any batch size (default: batch 1, "
                                                "the shape traced).")] = False,
    opset: Annotated[int | None, typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Write the export without checking it on --data "
                                            "(certify the export afterwards).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    *,
    o: c.Shared,
) -> None:
    """Export the certified model; with --data, refuse (exit 4, nothing written) unless its prediction sets agree."""
    from prunecp_cli import api

    run = o.run(results_to_stderr=as_json)
    result = api.export(o.model(model), out, cert=cert, format=fmt.value, data=o.data(data), opset=opset,
                        dynamic_batch=dynamic_batch, verify=not no_verify, run=run)
    if not api.is_main_process():
        return
    if as_json:
        import json

        print(json.dumps(result, indent=2, allow_nan=False))
        return
    check = result["verification"]
    checked = ("not checked (--no-verify)" if check is None else
               f"prediction sets agree on {check['n']}/{check['n']} inputs, max |Δlogit| "
               f"{check['max_abs_logit_diff']:.3g}, closest score to q̂ {check['closest_margin']:.3g}")
    run.rep.info(f"wrote {out} ({result['format']}, {result['bytes']:,} bytes, sha256 {result['sha256'][:16]}…): "
                 f"{checked}")
