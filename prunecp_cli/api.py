"""The Python API, and the only door the command line goes through.

One function per command; each takes parameter objects or plain paths, returns a typed result::

    from prunecp_cli import api
    from prunecp_cli.options import ModelSource, PruneOptions

    dense = ModelSource("model.pt", arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})
    table = api.score(dense, "score.npz", method="taylor")
    result = api.prune(dense, "pruned.safetensors", method="taylor", data="score.npz",
                       pruning=PruneOptions(target_flops=0.5))
    cert = api.calibrate("pruned.safetensors", "calib.npz", alpha=0.1, output="certificate.json")

Arguments are checked here, once, before anything heavy is imported: this module imports no torch
at module level, so a bad value fails in a fraction of a second. Messages name the API argument
(``target_flops``); the command line shows the flag (``--target-flops``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunecp_cli import checks
from prunecp_cli.checks import JSON_SUFFIXES, JSONL_SUFFIXES, MODEL_SUFFIXES, check_output
from prunecp_cli.errors import UsageError
from prunecp_cli.options import (
    DataSource,
    FinetuneConfig,
    ModelSource,
    Preprocess,
    PruneOptions,
    RiskOptions,
    RunOptions,
)
from prunecp_cli.types import Certificate, ImportanceTable, PruneResult, Verdict

_LAZY = {
    "load_model": "prunecp_cli.io.checkpoint",
    "save_model": "prunecp_cli.io.checkpoint",
    "load_certificate": "prunecp_cli.conformal.certificate",
    "ConformalClassifier": "prunecp_cli.conformal.predictor",
    "read_importance": "prunecp_cli.pipeline.scoring",
    "failure_message": "prunecp_cli.pipeline.certification",
    "write_json": "prunecp_cli.io.files",
    "run_demo": "prunecp_cli.demo",
    "Reporter": "prunecp_cli.reporting",
    "write_text": "prunecp_cli.io.files",
    "compress": "prunecp_cli.pipeline.compress",
}


__all__ = [
    "DataSource", "FinetuneConfig", "ModelSource", "Preprocess", "PruneOptions", "RiskOptions", "RunOptions",
    "calibrate", "certify", "export", "is_main_process", "model_card", "open_prediction", "predict", "prune", "report", "score",
    "write_jsonl", "check_output", "Certificate", "Verdict", "ImportanceTable", "PruneResult", "JSON_SUFFIXES", "JSONL_SUFFIXES", "MODEL_SUFFIXES", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prunecp_cli.api' has no attribute {name!r}")


def _path(source: ModelSource | DataSource | None) -> Path | None:
    if source is None:
        return None
    return Path(source.checkpoint if isinstance(source, ModelSource) else source.path)


def score(
    model: str | Path | ModelSource,
    data: str | Path | DataSource | None = None,
    *,
    method: str = "l1",
    options: dict[str, Any] | None = None,
    ignore: tuple[str, ...] = (),
    output: str | Path | None = None,
    run: RunOptions = RunOptions(),
) -> ImportanceTable:
    """Score every channel of every prunable conv group (higher = more important).

    Args:
        model: a prunecp file, or a :class:`ModelSource` (a dense checkpoint needs ``arch``).
        data: the score split (data-driven methods); ``DataSource.max_samples`` caps it.
        method: an importance method (``prunecp score --help`` lists them).
        options: method options, ``{name: value}``.
        ignore: layers whose groups are not scored.
        output: write ``importance.json`` here (rank 0, atomically).
        run: device, batch size (default 128), seed, reporter.

    Returns:
        The :class:`~prunecp_cli.types.ImportanceTable`.
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    checks.check_output(output, suffixes=checks.JSON_SUFFIXES, inputs=[("checkpoint", _path(model)),
                                                                       ("data", _path(data))])
    from prunecp_cli import dist
    from prunecp_cli.io.files import write_json
    from prunecp_cli.pipeline.scoring import score as run_score

    table = run_score(model, data, method=method, options=options, ignore=ignore, run=run)
    if output is not None and dist.rank() == 0:
        write_json(output, table.to_json())
    return table


def prune(
    model: str | Path | ModelSource,
    output: str | Path,
    *,
    scores: str | Path | None = None,
    method: str | None = None,
    options: dict[str, Any] | None = None,
    data: str | Path | DataSource | None = None,
    pruning: PruneOptions = PruneOptions(),
    steps: int = 1,
    finetune: FinetuneConfig | None = None,
    finetune_data: str | Path | DataSource | None = None,
    risk: RiskOptions | None = None,
    run: RunOptions = RunOptions(),
) -> PruneResult:
    """Remove channels physically (or, with ``pruning.granularity="weight"``, zero weights) and save.

    Args:
        model: a dense checkpoint or prunecp file (a path, or a :class:`ModelSource`).
        output: the ``.safetensors`` file to write.
        scores: an ``importance.json`` from :func:`score` (or give ``method``).
        method: an importance method to run now on ``data``.
        options: its options.
        data: the score split, for ``method`` and BatchNorm recalibration.
        pruning: the target (``ratio`` or ``target_flops``) and the constraints on it.
        steps: reach the target in this many equal steps (re-scoring, recalibrating, fine-tuning).
        finetune: fine-tuning settings (with ``finetune_data``).
        finetune_data: data to fine-tune on (never calibration data); labelled unless ``finetune.loss`` is ``kd``.
        risk: prune as far as Learn-then-Test certifies instead of to ``pruning``'s target.
        run: device, batch size (default 128), seed, reporter.

    Returns:
        The :class:`~prunecp_cli.types.PruneResult`.

    Raises:
        UsageError: a value out of range or options that contradict each other.
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    finetune_data = DataSource.of(finetune_data, preprocess=data.preprocess if data is not None else None)
    checks.check_output(output, suffixes=checks.MODEL_SUFFIXES, inputs=[
        ("checkpoint", _path(model)), ("scores", scores), ("data", _path(data)), ("finetune_data", _path(finetune_data)),
        ("risk_data", risk.risk_data if risk else None), ("cert", risk.cert if risk else None)])
    for name in ("ratio", "target_flops", "max_layer_ratio"):
        checks.open_unit(getattr(pruning, name), name)
    if risk is None and pruning.granularity == "channel" and (pruning.ratio is None) == (pruning.target_flops is None):
        raise UsageError("give exactly one of {ratio} and {flops}", arguments={"ratio": "ratio", "flops": "target_flops"})
    if steps < 1:
        raise UsageError("{arg} must be at least 1", arguments={"arg": "steps"})
    if (finetune is None) != (finetune_data is None):
        raise UsageError("fine-tuning needs {data} and its settings together",
                         arguments={"data": "finetune_data"})
    if finetune is not None:
        checks.open_unit(finetune.conftr_alpha, "conftr_alpha")
    if risk is not None:
        checks.open_unit(risk.max_risk, "max_risk")
        checks.open_unit(risk.delta, "delta")
        if steps > 1 or finetune is not None:
            raise UsageError("{risk} certifies one-shot pruning levels; drop {data} and {steps}",
                             arguments={"risk": "risk_data", "data": "finetune_data", "steps": "steps"})
        if pruning.ratio is not None or pruning.target_flops is not None:
            raise UsageError("{ratio} and {flops} fix one level, but with {risk} the level is the largest certified one "
                             "on {grid}; drop them (use {kind} flops for FLOPs levels)",
                             arguments={"ratio": "ratio", "flops": "target_flops", "risk": "risk_data", "grid": "grid",
                                        "kind": "grid_kind"})
        if method == "auto":
            raise UsageError("{method} auto chooses among prunings at one target, but {risk} tests a grid of levels; "
                             "name one method (e.g. {method} l1)", arguments={"method": "method", "risk": "risk_data"})
        from prunecp_cli.pipeline.confident import prune_confident

        return prune_confident(model, output, risk=risk, scores=scores, method=method, options=options, data=data,
                               pruning=pruning, run=run)
    from prunecp_cli.pipeline.pruning import prune as run_prune

    schedule = None
    if steps > 1 or finetune is not None:
        from prunecp_cli.io.data import open_dataset
        from prunecp_cli.pipeline.schedule import Schedule

        tune_set = None if finetune_data is None else open_dataset(finetune_data.path,
                                                                   preprocess=finetune_data.preprocess)
        schedule = Schedule(steps=steps, finetune=finetune, finetune_data=tune_set)
    return run_prune(model, output, scores=scores, method=method, options=options, data=data, pruning=pruning,
                     schedule=schedule, run=run)


def calibrate(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    alpha: float = 0.1,
    delta: float | None = None,
    nonconformity: str = "lac",
    randomized: bool = False,
    k_reg: int | None = None,
    lambda_reg: float | None = None,
    class_conditional: bool = False,
    groups: str | Path | None = None,
    output: str | Path | None = None,
    run: RunOptions = RunOptions(),
) -> Certificate:
    """Calibrate the model's conformal prediction sets on the calibration split; the certificate.

    See :func:`prunecp_cli.pipeline.calibration.calibrate` for the arguments (``run``: batch size
    default 256; ``run.seed`` draws randomised scores and the RAPS ``k_reg`` hold-out). ``groups``: a
    ``.npy``/``.txt`` file with one group label per calibration example, for one threshold per group
    (Mondrian by user group; ``certify`` then needs the test examples' groups).

    Raises:
        UsageError: ``alpha``/``delta`` outside (0, 1), or an output that would replace an input.
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    if groups is not None:
        import dataclasses

        data = dataclasses.replace(data, groups=groups)
    checks.check_output(output, suffixes=checks.JSON_SUFFIXES, inputs=[("model", _path(model)),
                                                                       ("data", _path(data))])
    checks.open_unit(alpha, "alpha")
    checks.open_unit(delta, "delta")
    from prunecp_cli.pipeline.calibration import calibrate as run_calibrate

    return run_calibrate(model, data, alpha=alpha, delta=delta, nonconformity=nonconformity, randomized=randomized,
                         k_reg=k_reg, lambda_reg=lambda_reg, class_conditional=class_conditional, output=output,
                         run=run)


def certify(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    cert: str | Path | dict[str, Any],
    significance: float = 0.01,
    pac_test: str = "beta-binomial",
    groups: str | Path | None = None,
    run: RunOptions = RunOptions(),
) -> Verdict:
    """Audit a certificate on held-out test data; the verdict (``verdict["passed"]``; it never raises on a fail).

    ``pac_test`` (``beta-binomial`` or ``binomial``) is how a PAC certificate is tested; ``groups`` is a
    ``.npy``/``.txt`` file with one group label per test example, for per-group metrics.

    Raises:
        UsageError: ``significance`` outside (0, 1), or an unknown ``pac_test``.
    """
    checks.open_unit(significance, "significance")
    from prunecp_cli.pipeline.certification import certify as run_certify

    return run_certify(model, data, cert=cert, significance=significance, pac_test=pac_test, groups=groups, run=run)


def open_prediction(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    cert: str | Path | dict[str, Any],
    class_names: str | Path | list[str] | None = None,
    run: RunOptions = RunOptions(),
):
    """Everything ``predict`` needs, checked; iterate ``.records()`` for one JSON-ready dict per input."""
    from prunecp_cli.pipeline.prediction import open_prediction as run_open

    return run_open(model, data, cert=cert, class_names=class_names, run=run)


def predict(
    model: str | Path | ModelSource,
    data: str | Path | DataSource,
    *,
    cert: str | Path | dict[str, Any],
    output: str | Path | None = None,
    class_names: str | Path | list[str] | None = None,
    run: RunOptions = RunOptions(),
) -> list[dict[str, Any]]:
    """Prediction sets of every input, as records; written as JSON Lines to ``output`` when given."""
    model, data = ModelSource.of(model), DataSource.of(data)
    checks.check_output(output, suffixes=checks.JSONL_SUFFIXES, inputs=[
        ("model", _path(model)), ("data", _path(data)), ("cert", cert if not isinstance(cert, dict) else None),
        ("class_names", class_names if isinstance(class_names, (str, Path)) else None)])
    records = list(open_prediction(model, data, cert=cert, class_names=class_names, run=run).records())
    if output is not None:
        write_jsonl(output, records)
    return records


def write_jsonl(path: str | Path, records) -> int:
    """Write records as JSON Lines, atomically; returns how many."""
    import json

    from prunecp_cli.io.files import atomic_write_path

    count = 0
    with atomic_write_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
            count += 1
    return count


def report(
    model: str | Path | ModelSource,
    *,
    baseline: str | Path | None = None,
    cert: str | Path | None = None,
    latency: bool = True,
    repeats: int = 30,
    ort: bool = False,
    run: RunOptions = RunOptions(),
):
    """Parameters, FLOPs and measured latency of a model against its dense baseline, as data.

    Args:
        model: a prunecp file or a :class:`ModelSource`.
        baseline: the dense checkpoint to compare with (default: the unpruned architecture).
        cert: a certificate to summarise.
        latency: time both models.
        repeats: timed forward passes per model.
        ort: also time both models in ONNX Runtime beside PyTorch (CPU), at batch 1 and the batch size.
        run: device, batch size (default 32), reporter.
    """
    model = ModelSource.of(model)
    from prunecp_cli.pipeline.report import Timing
    from prunecp_cli.pipeline.report import report as run_report

    timing = Timing(latency=latency, batch_size=run.batch(32), repeats=repeats, ort=ort)
    return run_report(model.checkpoint, baseline=baseline, arch=model.arch, arch_kwargs=model.arch_kwargs,
                      input_shape=model.input_shape, device=run.device, timing=timing, cert=cert, reporter=run.rep,
                      trust_arch=model.trust_arch)


def model_card(data, output: str | Path, *, verdict: str | Path | dict[str, Any] | None = None) -> list[Path]:
    """Write a Markdown model card of a :func:`report` result (with its ``cert``) and its PNG figures beside it.

    Args:
        data: what :func:`report` returned (give it ``cert`` for the certificate section).
        output: the card, ``MODEL_CARD.md``; figures go to ``MODEL_CARD_channels.png`` and so on.
        verdict: a ``certify --json`` verdict (path or dict) for the test-audit section.

    Returns:
        Every file written, the card first.
    """
    checks.check_output(output, suffixes=(".md", ".markdown"))
    from prunecp_cli.card import read_verdict, write_model_card

    if isinstance(verdict, (str, Path)):
        verdict = read_verdict(verdict)
    return write_model_card(data, output, certificate=data.certificate, verdict=verdict)


def export(
    model: str | Path | ModelSource,
    output: str | Path,
    *,
    cert: str | Path | dict[str, Any],
    format: str = "onnx",  # noqa: A002 - the command line's --format
    data: str | Path | DataSource | None = None,
    opset: int | None = None,
    dynamic_batch: bool = False,
    verify: bool = True,
    run: RunOptions = RunOptions(),
) -> dict[str, Any]:
    """Export the certified model to ONNX or a ``torch.export`` program, with the certificate's essentials inside.

    With ``verify`` (the default, which needs ``data``) the exported file is run (ONNX Runtime, or the
    loaded program) on ``data`` and its prediction sets at q̂ must equal the prunecp model's on every
    input; otherwise nothing is written and :class:`~prunecp_cli.errors.CertificationFailed` (exit 4) is
    raised. See :func:`prunecp_cli.pipeline.export.export`.

    Raises:
        UsageError: an unknown format, an output that does not end in ``.onnx``/``.pt2`` as ``format``
            says, or no ``data`` without ``verify=False``.
    """
    model, data = ModelSource.of(model), DataSource.of(data)
    if format not in ("onnx", "pt2"):
        raise UsageError(f"{{fmt}} {format!r}: give onnx or pt2", arguments={"fmt": "format"})
    checks.check_output(output, suffixes=(f".{format}",), inputs=[
        ("model", _path(model)), ("data", _path(data)), ("cert", cert if not isinstance(cert, dict) else None)])
    if opset is not None and (format != "onnx" or not 18 <= opset <= 30):
        raise UsageError("{opset} applies to onnx and must be 18 or more (the lowest opset the dynamo exporter "
                         "writes), e.g. {opset} 18", arguments={"opset": "opset"})
    from prunecp_cli.pipeline.export import export as run_export

    return run_export(model, output, cert=cert, fmt=format, data=data, opset=opset, dynamic_batch=dynamic_batch,
                      verify=verify, run=run)


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun launch (rank 0 writes and prints)."""
    from prunecp_cli import dist

    return dist.rank() == 0
