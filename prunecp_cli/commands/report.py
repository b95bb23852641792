"""``prunecp report``: parameters, FLOPs and latency of a pruned model against its baseline."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


class Format(str, Enum):
    """Output formats."""

    table = "table"
    json = "json"
    markdown = "markdown"
    card = "card"


@c.cli_command
@c.shared(input_shape=True, data=False, batch_size=32, seed=False)
def report(
    model: Annotated[Path, typer.Argument(help="prunecp model file (or a dense checkpoint with --arch).")],
    baseline: Annotated[Path | None, typer.Option("--baseline", help="Dense checkpoint to compare with "
                                                     "(default: the unpruned architecture, for cost only).")] = None,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="table (rich), json, markdown, or card: a Markdown "
                                        "model card with PNG figures beside it (needs -o).")] = Format.table,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the report to this file "
                                                "instead of stdout.")] = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure latency of both models.")] = True,
    repeats: Annotated[int, typer.Option("--repeats", min=3, help="Timed forward passes per model.")] = 30,
    ort: Annotated[bool, typer.Option("--ort", help="Also time both models in ONNX Runtime beside PyTorch (CPU, "
                                      "batch 1 and --batch-size): the speed a deployment gets.")] = False,
    cert: Annotated[Path | None, typer.Option("--cert", help="certificate.json to summarise (alpha, quantile, "
                                                 "guarantee, calibration coverage and set size).")] = None,
    verdict: Annotated[Path | None, typer.Option("--verdict", help="--format card: the certify --json output "
                                                 "for the card's test-audit section.")] = None,
    *,
    o: c.Shared,
) -> None:
    """Tables of channels, parameters, FLOPs (fvcore, 1 multiply-add = 1 FLOP) and measured latency."""
    import json

    from prunecp_cli import api

    markdown = (".md", ".markdown")
    suffixes = {Format.json: api.JSON_SUFFIXES, Format.markdown: markdown, Format.card: markdown,
                Format.table: (".txt",)}[fmt]
    if fmt is Format.card and out is None:
        from prunecp_cli.errors import UsageError

        raise UsageError("--format card writes a file and figures beside it: give -o MODEL_CARD.md")
    api.check_output(out, suffixes=suffixes, inputs=[("model", model), ("baseline", baseline), ("cert", cert)])
    data = api.report(o.model(model), baseline=baseline, cert=cert,
                      latency=latency, repeats=repeats, ort=ort,
                      run=(run := o.run(results_to_stderr=out is None)))
    if fmt is Format.card:
        written = api.model_card(data, out, verdict=verdict)
        run.rep.info(f"wrote {out} and {len(written) - 1} figure(s): {', '.join(p.name for p in written[1:])}")
        return
    if fmt is Format.json:
        text = json.dumps(data.to_json(), indent=2) + "\n"
    elif fmt is Format.markdown:
        from prunecp_cli import present

        text = present.render_markdown(data)
    else:
        from prunecp_cli import present

        if out is None:
            present.render_table(data, present.console())
            return
        text = present.table_text(data)
    if out is None:
        print(text, end="")
    else:
        api.write_text(out, text)
