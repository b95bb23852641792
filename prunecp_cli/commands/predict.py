"""``prunecp predict``: conformal prediction sets for new inputs, as JSON Lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


@c.cli_command
@c.shared(batch_size=256, seed=False)
def predict(
    model: Annotated[Path, typer.Argument(help="The certified model file.")],
    cert: Annotated[Path, typer.Option("--cert", "-c", help="certificate.json from prunecp calibrate.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Inputs (.npz/tensor file/image folder; labels optional).",
                                       rich_help_panel="Data")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON Lines file to write (default: stdout).")] = None,
    class_names: Annotated[Path | None, typer.Option("--class-names", help="File of class names: a JSON list or one "
                                                     "name per line, in class-index order.")] = None,
    *,
    o: c.Shared,
) -> None:
    """One JSON line per input: index, top-1 class, prediction set and the nonconformity score of every class."""
    import json
    import sys

    from prunecp_cli import api

    run = o.run(results_to_stderr=out is None)
    model_source = o.model(model)
    data_source = o.data(data)
    api.check_output(out, suffixes=api.JSONL_SUFFIXES, inputs=[("model", model), ("cert", cert), ("data", data),
                                                              ("class_names", class_names)])
    prediction = api.open_prediction(model_source, data_source, cert=cert, class_names=class_names, run=run)
    if not api.is_main_process():
        return
    if out is None:
        try:
            for record in prediction.records():
                sys.stdout.write(json.dumps(record, allow_nan=False) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `prunecp predict ... | head`: the reader left, which is not an error
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    count = api.write_jsonl(out, prediction.records())
    run.rep.info(f"wrote {out}: {count} prediction sets")
