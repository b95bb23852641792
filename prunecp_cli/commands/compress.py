"""``prunecp compress``: the whole pipeline on one labelled data set, in one shell line (exit code: certify's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


@c.cli_command
@c.shared(batch_size=None)
def compress(
    checkpoint: Annotated[Path, typer.Argument(help="Dense checkpoint (.safetensors/.pt; a plain one needs --arch).")],
    data: Annotated[Path, typer.Option("--data", "-d", help="One labelled data set: split into score / calibration / "
                                       "test parts, disjoint and stratified by class (--seed).",
                                       rich_help_panel="Data")],
    target_flops: Annotated[float, typer.Option("--target-flops", help="Fraction of the dense FLOPs to keep, in "
                                                "(0, 1).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for every artefact (parts, splits.json, "
                                      "importance.json, pruned model, certificate, verdict.json, export, model "
                                      "card, commands.sh).")],
    alpha: Annotated[float, typer.Option("--alpha", help="Target miscoverage of the certificate.")] = 0.1,
    method: Annotated[str, typer.Option("--method", "-m", help="Importance method (see prunecp score --help).")] = "l1",
    finetune_epochs: Annotated[int, typer.Option("--finetune-epochs", min=0, help="Fine-tune on the score part for "
                                                 "this many epochs after pruning (0: none).")] = 0,
    fmt: Annotated[str, typer.Option("--format", "-f", help="Export format: onnx or pt2.")] = "onnx",
    split: Annotated[str, typer.Option("--split", help="Fractions of the score, calibration and test parts.")]
    = "0.5,0.25,0.25",
    device: c.Device = "auto",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Examples per forward pass (default: "
                                                   "each step's own, as the separate commands).",
                                                   rich_help_panel="Run")] = None,
    *,
    o: c.Shared,
) -> None:
    """Split the data, then score, prune, calibrate, certify, export and write the model card into one folder."""
    from prunecp_cli import api, checks
    from prunecp_cli.errors import CertificationFailed

    fractions = checks.parse_floats(split, option="--split")
    run = api.RunOptions(device=device, batch_size=batch_size, seed=o.seed, reporter=c.reporter(o.quiet))
    result = api.compress(o.model(checkpoint), o.data(data), out, target_flops=target_flops, alpha=alpha,
                          method=method, finetune_epochs=finetune_epochs, format=fmt, fractions=fractions,
                          run=run)
    parts = ", ".join(f"{k} {v['n']}" for k, v in result["splits"].items())
    verdict = result["verdict"]
    run.rep.info(f"wrote {out}: parts {parts}; test coverage {verdict['coverage']:.4f} (certificate "
                 f"{'holds' if verdict['passed'] else 'does NOT hold'}); {len(result['files'])} files")
    if not verdict["passed"]:
        raise CertificationFailed(api.failure_message(verdict))
