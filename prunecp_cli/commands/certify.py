"""``prunecp certify``: audit a certificate on held-out test data; exit 0 when it holds, 4 when not."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from prunecp_cli.commands import _common as c


class PacTest(str, Enum):
    """How a PAC certificate's coverage is tested."""

    beta_binomial = "beta-binomial"
    binomial = "binomial"


@c.cli_command
@c.shared(batch_size=256, seed=False)
def certify(
    model: Annotated[Path, typer.Argument(help="The certified model file.")],
    cert: Annotated[Path, typer.Option("--cert", "-c", help="certificate.json from prunecp calibrate.")],
    data: Annotated[Path, typer.Option("--data", "-d", help="Test split (labelled), disjoint from calibration and "
                                       "from every split the model has seen.", rich_help_panel="Data")],
    significance: Annotated[float, typer.Option("--significance", help="Fail when the coverage test's p-value is "
                                                "below this (a valid certificate fails this often at most).")] = 0.01,
    pac_test: Annotated[PacTest, typer.Option("--pac-test", help="How a training-conditional (PAC) certificate is "
                                              "tested: beta-binomial (exact law of the coverage at the PAC rank; "
                                              "fails a valid certificate at most --significance of the time) or "
                                              "binomial (Bin(m, 1 - alpha); conservative, less power).")
                        ] = PacTest.beta_binomial,
    groups: Annotated[Path | None, typer.Option("--groups", help="One group label per test example (.npy array or "
                                                ".txt, one per line, in the data's order): coverage, set size, SSCV "
                                                "and gap per group.", rich_help_panel="Data")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (for CI) instead of a panel.")] = False,
    *,
    o: c.Shared,
) -> None:
    """Check the model hash and test the certificate's coverage on held-out data (exit 0 holds, 4 does not)."""
    from prunecp_cli import api
    from prunecp_cli.errors import CertificationFailed

    verdict = api.certify(o.model(model),
                          o.data(data), cert=cert, significance=significance, pac_test=pac_test.value, groups=groups,
                          run=o.run(results_to_stderr=as_json))
    if api.is_main_process():
        if as_json:
            import json

            print(json.dumps(verdict, indent=2, allow_nan=False))
        else:
            from prunecp_cli import present

            present.render_verdict(verdict, present.console())
    if not verdict["passed"]:
        raise CertificationFailed(api.failure_message(verdict))
