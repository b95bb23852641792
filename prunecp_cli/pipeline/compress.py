"""``compress``: the whole pipeline on one labelled data set, as one call.

1. The data are split into **score**, **calibration** and **test** parts, disjoint, stratified by
   class and reproducible from ``seed`` (:func:`stratified_split`), written as ``score.npz``,
   ``calib.npz`` and ``test.npz`` (byte-identical for the same input and seed) and recorded in
   ``splits.json`` with each part's sha256 and row indices.
2. Then the same :mod:`prunecp_cli.api` calls the separate commands make: ``score`` (importance.json),
   ``prune`` to the FLOPs target (optionally fine-tuning on the score part), ``calibrate``
   (certificate.json), ``certify`` on the test part (verdict.json), ``export`` (checked on the test
   part) and the model card (``report --format card``). ``commands.sh`` lists the equivalent command
   lines, so running them on the written parts reproduces every file.

The result's ``verdict`` decides the exit code (certify's).
"""

from __future__ import annotations

import shlex
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from prunecp_cli import api
from prunecp_cli.errors import DataError, UsageError
from prunecp_cli.io.data import open_dataset
from prunecp_cli.io.files import atomic_write_path, sha256_file, write_json, write_text

PARTS = ("score", "calib", "test")
DEFAULT_FRACTIONS = (0.5, 0.25, 0.25)


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], *, seed: int) -> list[np.ndarray]:
    """Disjoint sorted row indices, one array per fraction, each class split in those proportions.

    Within a class the rows are shuffled by ``numpy.random.default_rng(seed)`` (classes in increasing
    order) and cut by largest remainders, so every part gets its share of every class.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    total = float(sum(fractions))
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        exact = np.array(fractions) / total * len(rows)
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(rows) - counts.sum()]:
            counts[i] += 1
        for part, chunk in zip(parts, np.split(rows, np.cumsum(counts)[:-1]), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    """An uncompressed ``.npz`` with fixed timestamps (same arrays, same bytes), atomically; its sha256."""
    with atomic_write_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
    return sha256_file(path)


def write_parts(data: api.DataSource, outdir: Path, *, fractions: tuple[float, ...], seed: int) -> dict[str, Any]:
    """Split ``data`` into the three parts in ``outdir``; the ``splits.json`` record.

    Raises:
        DataError: unlabelled data, or a class too small to appear in every part.
    """
    dataset = open_dataset(data.path, preprocess=data.preprocess)
    if not dataset.has_labels:
        raise DataError(f"{data.path} has no labels; compress needs one labelled data set")
    batch = next(dataset.batches(len(dataset)))
    order = batch.index.argsort()
    x, y = batch.x[order].numpy().astype(np.float32), batch.y[order].numpy().astype(np.int64)
    parts = stratified_split(y, fractions, seed=seed)
    record = {"schema_version": 1, "source": {"file": dataset.path.name, "sha256": dataset.sha256, "n": len(y)},
              "seed": seed, "fractions": dict(zip(PARTS, fractions, strict=True)), "stratified_by": "class",
              "parts": {}}
    for name, rows in zip(PARTS, parts, strict=True):
        if len(np.unique(y[rows])) < len(np.unique(y)):
            raise DataError(f"{data.path}: some class has too few examples to appear in the {name} part; give "
                            "more data per class or other --split fractions")
        path = outdir / f"{name}.npz"
        record["parts"][name] = {"file": path.name, "sha256": write_npz(path, x=x[rows], y=y[rows]),
                                 "n": int(len(rows)), "indices": rows.tolist()}
    write_json(outdir / "splits.json", record)
    return record


def _command(*words: Any) -> str:
    return " ".join(shlex.quote(str(w)) for w in words if w is not None and w != "")


def compress(
    model: str | Path | api.ModelSource,
    data: str | Path | api.DataSource,
    outdir: str | Path,
    *,
    target_flops: float,
    alpha: float = 0.1,
    method: str = "l1",
    finetune_epochs: int = 0,
    format: str = "onnx",  # noqa: A002 - the command line's --format
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS,
    run: api.RunOptions = api.RunOptions(),
) -> dict[str, Any]:
    """Split, score, prune (fine-tune), calibrate, certify, export and write the model card into ``outdir``.

    Returns:
        ``{outdir, splits, verdict, export, files, commands}``; ``verdict["passed"]`` is certify's answer.

    Raises:
        UsageError: bad fractions, target or alpha (checked before anything is read).
    """
    model, data = api.ModelSource.of(model), api.DataSource.of(data)
    if len(fractions) != 3 or any(not f > 0 for f in fractions):
        raise UsageError("{split} needs three positive fractions: score, calibration, test (e.g. 0.5,0.25,0.25)",
                         arguments={"split": "fractions"})
    api.checks.open_unit(target_flops, "target_flops")
    api.checks.open_unit(alpha, "alpha")
    if format not in ("onnx", "pt2"):
        raise UsageError(f"{{fmt}} {format!r}: give onnx or pt2", arguments={"fmt": "format"})
    if finetune_epochs < 0:
        raise UsageError("{epochs} must be 0 (no fine-tuning) or more", arguments={"epochs": "finetune_epochs"})
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    splits = write_parts(data, outdir, fractions=fractions, seed=run.seed)
    score, calib, test = (outdir / f"{p}.npz" for p in PARTS)
    scores, pruned, cert = outdir / "importance.json", outdir / "pruned.safetensors", outdir / "certificate.json"
    exported, card = outdir / f"pruned.{format}", outdir / "MODEL_CARD.md"
    arch = model.arch
    api.score(model, score, method=method, output=scores, run=run)
    tune = api.FinetuneConfig(epochs=finetune_epochs, seed=run.seed) if finetune_epochs else None
    api.prune(model, pruned, scores=scores, data=score, pruning=api.PruneOptions(target_flops=target_flops),
              finetune=tune, finetune_data=score if tune else None, run=run)
    api.calibrate(pruned, calib, alpha=alpha, output=cert, run=run)
    verdict = api.certify(pruned, test, cert=cert, run=run)
    write_json(outdir / "verdict.json", verdict)
    result = api.export(pruned, exported, cert=cert, format=format, data=test, run=run)
    api.model_card(api.report(pruned, cert=cert, repeats=10, run=run), card, verdict=verdict)
    model_flags = ("--arch", arch) if arch else ()
    source = Path(model.checkpoint).resolve()
    tune_flags = ("--finetune-data", score.name, "--finetune-epochs", finetune_epochs) if tune else ()
    seed = ("--seed", run.seed) if run.seed else ()
    commands = [
        _command("prunecp", "score", source, *model_flags, "--method", method, "--data", score.name, "-o",
                 scores.name, *seed),
        _command("prunecp", "prune", source, *model_flags, "--scores", scores.name, "--data", score.name,
                 "--target-flops", target_flops, *tune_flags, "-o", pruned.name, *seed),
        _command("prunecp", "calibrate", pruned.name, "--data", calib.name, "--alpha", alpha, "-o", cert.name, *seed),
        _command("prunecp", "certify", pruned.name, "--cert", cert.name, "--data", test.name, "--json"),
        _command("prunecp", "export", pruned.name, "--cert", cert.name, "--format", format, "--data", test.name,
                 "-o", exported.name),
    ]
    write_text(outdir / "commands.sh", "# run in this folder; the parts are score.npz, calib.npz, test.npz\n"
               + "\n".join(commands) + "\n")
    files = sorted(p.name for p in outdir.iterdir() if p.is_file() and not p.name.startswith("."))
    return {"outdir": str(outdir), "splits": {k: {f: v[f] for f in ("file", "sha256", "n")}
                                              for k, v in splits["parts"].items()},
            "verdict": verdict, "export": result, "files": files, "commands": commands}
