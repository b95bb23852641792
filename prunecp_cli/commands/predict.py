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

    c.check_output(out, c.checks.JSONL_SUFFIXES, ("MODEL", model), ("--cert", cert), ("--data", data),
                   ("--class-names", class_names))
    kwargs = c.arch_kwargs(arch_kwargs)
    pre = c.preprocess(image_size, mean, std, channels)
    from prunecp_cli.dist import rank
    from prunecp_cli.io.files import atomic_write_path
    from prunecp_cli.pipeline.prediction import open_prediction

    rep = c.reporter(quiet, results_to_stderr=out is None)
    run = open_prediction(model, cert=cert, data=data, class_names=class_names, arch=arch,
                          arch_kwargs=kwargs,
                          preprocess=pre,
                          device=device, batch_size=batch_size, reporter=rep, trust_arch=trust_arch)
    if rank() != 0:
        return
    if out is None:
        try:
            for record in run.records():
                sys.stdout.write(json.dumps(record, allow_nan=False) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:  # `prunecp predict ... | head`: the reader left, which is not an error
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    count = 0
    with atomic_write_path(out) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in run.records():
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            count += 1
    rep.info(f"wrote {out}: {count} prediction sets")
