"""The model card (``prunecp report MODEL --cert CERT --format card -o MODEL_CARD.md``).

A Markdown file with what a reviewer needs before shipping a pruned model: architecture and per-layer
widths, parameters/FLOPs/latency before and after, how it was pruned (method, target, data roles and
hashes, fine-tuning, the Learn-then-Test record), the certificate's guarantee in words with its
numbers, the test audit when a ``certify --json`` verdict is given, and the commands that rebuild it.
PNG figures are written beside the card (:mod:`prunecp_cli.card_figures`, matplotlib) and linked
from it. Nothing here imports torch.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from prunecp_cli import present
from prunecp_cli.io.files import write_text


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines + [""]


def _num(value: Any, fmt: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return f"{len(value)} per-class values, {min(value):{fmt}} to {max(value):{fmt}}"
    return format(value, fmt)


def _data_rows(meta: dict[str, Any], certificate: dict[str, Any] | None,
               verdict: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    rows = [(r["file"], r["role"], r["sha256"]) for r in meta.get("data_sha256") or []]
    if certificate:
        rows.append((certificate["data"]["file"], f"calibration (n = {certificate['data']['n']})",
                     certificate["data"]["sha256"]))
    if verdict and verdict.get("data"):
        rows.append((verdict["data"]["file"], f"test (n = {verdict['n']})", verdict["data"]["sha256"]))
    return rows


def reproduce_commands(data, certificate: dict[str, Any] | None, verdict: dict[str, Any] | None) -> list[str]:
    """The commands that rebuild the model and its certificate, from the recorded provenance."""
    meta, model = data.metadata, Path(data.model).name
    arch_flags = f"--arch {(data.architecture or {}).get('arch', 'ARCH')}"
    arch_kwargs = (data.architecture or {}).get("arch_kwargs") or {}
    if arch_kwargs:  # the dense checkpoint holds only weights: the architecture needs the same arguments
        arch_flags += f" --arch-kwargs {shlex.quote(json.dumps(arch_kwargs, separators=(',', ':')))}"
    files = {r["role"]: r["file"] for r in meta.get("data_sha256") or []}
    target = meta.get("target") or {}
    goal = (f"--target-flops {target['target_flops']}" if target.get("target_flops") is not None
            else f"--ratio {target.get('ratio')}" if target.get("ratio") is not None else "")
    commands = []
    if meta.get("method"):
        score = files.get("score", files.get("bn-recalibration", "SCORE.npz"))
        tune = meta.get("finetune")
        extra = (f" --finetune-data {files.get('fine-tune', score)} --finetune-epochs {tune['epochs']} --loss "
                 f"{tune['loss']}" if tune else "")
        steps = f" --steps {target['steps']}" if target.get("steps", 1) > 1 else ""
        source = meta.get("source_file") or "DENSE_CHECKPOINT"  # files made before prunecp recorded it
        commands.append(f"prunecp prune {source} {arch_flags} --method {meta['method']} --data {score} "
                        f"{goal}{steps}{extra} -o {model}")
    if certificate:
        c = certificate
        flags = f" --delta {c['delta']}" if c["delta"] is not None else ""
        params = c["nonconformity"]["parameters"]
        flags += " --randomized" if params.get("randomized") else ""
        flags += " --class-conditional" if c["class_conditional"] else ""
        commands.append(f"prunecp calibrate {model} --data {c['data']['file']} --alpha {c['alpha']} "
                        f"--nonconformity {c['nonconformity']['name']}{flags} -o CERTIFICATE.json")
        test = verdict["data"]["file"] if verdict and verdict.get("data") else "TEST.npz"
        commands.append(f"prunecp certify {model} --cert CERTIFICATE.json --data {test} --json")
        commands.append(f"prunecp export {model} --cert CERTIFICATE.json --format onnx --data {test} -o "
                        f"{Path(model).stem}.onnx")
    return commands


def card_markdown(data, *, certificate: dict[str, Any] | None, verdict: dict[str, Any] | None,
                  figures: dict[str, str]) -> str:
    """The card's Markdown (``figures``: figure name to the file name beside the card)."""
    arch = data.architecture or {}
    lines = [f"# Model card: {Path(data.model).name}", ""]
    lines += _table(("field", "value"), [
        ("architecture", f"`{arch.get('arch', '-')}` {json.dumps(arch.get('arch_kwargs') or {})}"),
        ("input", "×".join(str(v) for v in data.input_shape)),
        ("source checkpoint", data.metadata.get("source_file", "-")),
        ("source checkpoint sha256", data.metadata.get("source_sha256", "-")),
        ("model sha256", certificate["model"]["sha256"] if certificate else "-"),
    ])
    lines += ["## Cost before and after pruning", ""]
    lines += _table(("quantity", "dense → pruned", "change"), present.summary_rows(data))
    lines += [f"{data.flops_unit}. Baseline: {data.baseline or 'none'}.", ""]
    lines += ["## Layers", ""]
    if "channels" in figures:
        lines += [f"![channels per layer before and after pruning]({figures['channels']})", ""]
    lines += _table(("layer", "type", "channels", "params"), [
        (r.name, r.kind, present._pair(r.channels_before, r.channels_after, str),
         present._pair(r.params_before, r.params_after)) for r in data.rows])
    lines += ["## How it was pruned", ""]
    lines += _table(("field", "value"), present.provenance_rows(data.metadata) or [("pruning", "none recorded")])
    lines += ["Data used, by role (sha256 of each file):", ""]
    lines += _table(("file", "role", "sha256"), _data_rows(data.metadata, certificate, verdict))
    control = data.metadata.get("risk_control")
    if control:
        lines += ["### Learn-then-Test", "", str(control.get("statement", "")), ""]
        if "ltt" in figures:
            lines += [f"![risk and p-value of every tested level]({figures['ltt']})", ""]
        lines += _table(("level", "risk", "p-value", "certified"), [
            (r["level"], _num(r["risk_hat"]), _num(r["p_value"], ".3g"), "yes" if r["certified"] else "no")
            for r in control.get("levels", [])])
    if certificate:
        lines += _certificate_section(certificate, verdict, figures)
    commands = reproduce_commands(data, certificate, verdict)
    if commands:
        lines += ["## Reproduce", "", "```sh", *commands, "```", ""]
    return "\n".join(lines)


def _certificate_section(c: dict[str, Any], verdict: dict[str, Any] | None, figures: dict[str, str]) -> list[str]:
    g, calib = c["guarantee"], c["calibration"]
    lines = ["## Conformal certificate", "", f"**Guarantee.** {g['statement']}", ""]
    lines += _table(("field", "value"), [
        ("nonconformity", f"{c['nonconformity']['name']} {json.dumps(c['nonconformity']['parameters'])}"),
        ("alpha", c["alpha"]), ("delta", "-" if c["delta"] is None else c["delta"]),
        ("calibration points n", c["data"]["n"]), ("q̂", _num(c["quantile"], ".6g")),
        ("quantile level", _num(c["quantile_level"], ".6g")), ("guarantee", g["type"]),
        ("coverage at least", _num(g["coverage_at_least"])),
        ("calibration coverage", _num(calib["coverage"])), ("calibration mean set size", _num(calib["mean_set_size"])),
        ("calibration top-1 accuracy", _num(calib.get("top1_accuracy"))),
    ])
    if verdict:
        lines += ["### Test audit (`prunecp certify`)", ""]
        lines += _table(("field", "value"), [
            ("verdict", "certificate holds" if verdict["passed"] else "certificate does NOT hold"),
            ("test points", verdict["n"]), ("test coverage", _num(verdict.get("coverage"))),
            ("mean set size", _num(verdict.get("mean_set_size"))), ("p-value", _num(verdict.get("p_value"), ".3g")),
            ("set sizes", ", ".join(f"{k}: {v}" for k, v in _histogram(verdict).items())),
        ])
    if "sets" in figures:
        lines += [f"![prediction-set sizes and per-class coverage]({figures['sets']})", ""]
    return lines


def _histogram(record: dict[str, Any]) -> dict[str, int]:
    hist = record.get("set_size_histogram") or {}
    if isinstance(hist, list):
        return {str(i): int(v) for i, v in enumerate(hist) if v}
    return {str(k): int(v) for k, v in hist.items()}


def write_model_card(data, output: str | Path, *, certificate: dict[str, Any] | None = None,
                     verdict: dict[str, Any] | None = None) -> list[Path]:
    """Write the card and its PNG figures beside it (atomically); returns every file written."""
    from prunecp_cli.card_figures import write_figures

    output = Path(output)
    figures = write_figures(data, output, certificate=certificate, verdict=verdict)
    write_text(output, card_markdown(data, certificate=certificate, verdict=verdict,
                                     figures={k: p.name for k, p in figures.items()}))
    return [output, *figures.values()]


def read_verdict(path: str | Path) -> dict[str, Any]:
    """A verdict written by ``prunecp certify --json``.

    Raises:
        InputError: the file is unreadable, not JSON, or not a verdict.
    """
    from prunecp_cli.errors import InputError

    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"--verdict {path} cannot be read as JSON ({type(exc).__name__}); pass the output of "
                         "prunecp certify --json") from None
    if not isinstance(value, dict) or not {"passed", "n", "checks"} <= set(value):
        raise InputError(f"--verdict {path} is not a certify verdict (no passed/n/checks); pass the output of "
                         "prunecp certify --json")
    return value
