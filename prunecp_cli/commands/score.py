"""``prunecp score``: rank every conv filter and write importance.json."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli import importance as registry
from prunecp_cli.commands import _common as c


def _methods_help() -> str:
    lines = []
    for name in registry.METHODS:
        info = registry.METHODS[name]
        opts = "; ".join(f"{k}={d!r}: {h}" for k, (d, h) in info.options.items())
        lines.append(f"{name}: {info.description}" + (f" [options: {opts}]" if opts else ""))
    return "Importance method. " + " | ".join(lines)


@c.cli_command
@c.shared(input_shape=True, batch_size=128, verbose=True)
def score(
    checkpoint: Annotated[Path, typer.Argument(help="Dense checkpoint (.safetensors/.pt/.pth/.bin) or prunecp model.")],
    method: Annotated[str, typer.Option("--method", "-m", help=_methods_help(), rich_help_panel="Importance")] = "l1",
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Score split: .npz, tensor file or image folder.",
                                                 rich_help_panel="Data")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the scores.")] = Path("importance.json"),
    opt: c.Opt = None,
    max_samples: c.MaxSamples = None,
    ignore: c.Ignore = None,
    *,
    o: c.Shared,
) -> None:
    """Score every channel of every prunable conv group (higher = more important) into importance.json."""
    from prunecp_cli import api

    options = registry.parse_options(method, opt)
    run = o.run()
    table = api.score(o.model(checkpoint),
                      o.data(data, max_samples), method=method,
                      options=options, ignore=tuple(ignore or ()), output=out, run=run)
    if api.is_main_process():
        channels = sum(g.channels for g in table.groups)
        run.rep.info(f"wrote {out}: {len(table.groups)} groups, {channels} channels, method {method}")
        if method == "auto":
            run.rep.info(f"candidates {table.params['candidates']}: prune --scores {out} with the same --data "
                         "prunes with each and keeps the smallest conformal sets")
