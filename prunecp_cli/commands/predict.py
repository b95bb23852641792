"""``prunecp predict``: conformal prediction sets for new inputs, as JSON Lines."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


@c.cli_command
def predict(
    model: Annotated[Path, typer.Argument(help="The certified model file.")],
    cert: Annotated[Path, typer.Option("--cert", "-c", help="certificate.json from prunecp calibrate.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Inputs (.npz/tensor file/image folder; labels optional).",
                                       rich_help_panel="Data")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="JSON Lines file to write (default: stdout).")] = None,
    class_names: Annotated[Path | None, typer.Option("--class-names", help="File of class names: a JSON list or one "
                                                     "name per line, in class-index order.")] = None,
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
    """One JSON line per input: index, top-1 class, prediction set and the nonconformity score of every class."""
    import json
    import sys

    from prunecp_cli import api

    run = c.run_options(device, batch_size, quiet=quiet, results_to_stderr=out is None)
    model_source = c.model_source(model, arch, arch_kwargs, trust_arch=trust_arch)
    data_source = c.data_source(data, image_size, mean, std, channels)
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
