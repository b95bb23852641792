"""``prunecp demo``: the whole pipeline on scikit-learn's digits, in a temporary folder.

It splits the 1,797 digits into disjoint train / score / calibration / test files, trains a small
CNN, then runs the same steps a user runs from the shell (each printed as its command line) through
the Python API, and prints what each step produced: ``score --method auto`` (the recommended method),
``prune`` to half the FLOPs, keeping the candidate with the smallest conformal sets on held-out score
data and distilling the dense model into the pruned one for three epochs on the train split
(``--loss kd``), then ``calibrate``, ``certify``, ``report`` and the export.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from prunecp_cli import api, present
from prunecp_cli.datasets import digits, write_splits
from prunecp_cli.io.checkpoint import ModelMeta, save_model
from prunecp_cli.io.data import open_dataset
from prunecp_cli.models import digits_cnn
from prunecp_cli.runtime import Reporter, seed_everything
from prunecp_cli.training import accuracy, train_classifier

SPLITS = {"train": 0.5, "score": 0.2, "calib": 0.15, "test": 0.15}
ARCH = "prunecp_cli.models:digits_cnn"
FINETUNE = {"loss": "kd", "epochs": 3, "batch_size": 64, "lr": 0.02}
"""The demo's fine-tuning: distil the dense model on the train split (its command-line flags below)."""


def _tensors(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = open_dataset(path)
    batch = next(data.batches(len(data)))
    return batch.x, batch.y


def run_demo(workdir: str | Path | None = None, *, seed: int = 0, target_flops: float = 0.5,
             reporter: Reporter | None = None, console=None) -> dict:
    """Run the demo; return the figures it printed (for tests).

    Args:
        workdir: folder to work in (default: a new temporary folder, kept after the run).
        seed: seed for the split, training and scoring.
        target_flops: fraction of dense FLOPs the pruned model keeps.
        reporter: progress reporter.
        console: rich console to print to (default: :func:`prunecp_cli.present.console`, stdout).
    """
    console = console or present.console()
    reporter = reporter or Reporter(quiet=True)
    folder = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="prunecp-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    console.print(f"[bold]prunecp demo[/bold] in {folder}")

    x, y = digits()
    paths = write_splits(x, y, folder, SPLITS, seed=seed)
    sizes = ", ".join(f"{k} {len(open_dataset(p))}" for k, p in paths.items())
    console.print(f"digits (scikit-learn, 8×8, 10 classes) split into disjoint files: {sizes}")

    seed_everything(seed)
    x_train, y_train = _tensors(paths["train"])
    with reporter.status("training a small CNN"):
        model = train_classifier(digits_cnn(), x_train, y_train, epochs=30, seed=seed)
    dense = folder / "dense.safetensors"
    save_model(model, dense, ModelMeta(arch=ARCH, arch_kwargs={}, input_shape=[1, 8, 8]))
    x_test, y_test = _tensors(paths["test"])
    dense_acc = accuracy(model, x_test, y_test)
    console.print(f"trained {ARCH}: test accuracy {dense_acc:.3f} → {dense.name}")

    run = api.RunOptions(seed=seed, reporter=reporter)
    on_cpu = api.RunOptions(device="cpu", seed=seed, reporter=reporter)

    def step(command: str) -> None:
        console.print(f"\n[bold cyan]$ {command}[/bold cyan]")

    scores_path = folder / "importance.json"
    step(f"prunecp score {dense.name} --method auto --data score.npz -o {scores_path.name}")
    table = api.score(dense, paths["score"], method="auto", output=scores_path, run=run)
    console.print(f"scored {sum(g.channels for g in table.groups)} channels in {len(table.groups)} groups with "
                  f"{table.params['candidates'].replace(',', ', ')}")

    pruned = folder / "pruned.safetensors"
    tune = api.FinetuneConfig(seed=seed, **FINETUNE)
    step(f"prunecp prune {dense.name} --scores {scores_path.name} --data score.npz --target-flops {target_flops} "
         f"--finetune-data train.npz --loss {tune.loss} --epochs {tune.epochs} --finetune-batch-size {tune.batch_size} "
         f"--lr {tune.lr:g} -o {pruned.name}")
    result = api.prune(dense, pruned, scores=scores_path, data=paths["score"],
                       pruning=api.PruneOptions(target_flops=target_flops), finetune=tune,
                       finetune_data=paths["train"], run=run)
    for line in present.auto_lines(result.extra["auto"]):
        console.print(line, markup=False, highlight=False)
    pruned_acc = accuracy(api.load_model(pruned), x_test, y_test)
    console.print(f"FLOPs kept {result.flops_ratio:.3f}, params kept {result.params_ratio:.3f}; after "
                  f"{tune.epochs} epochs of {tune.loss} fine-tuning, test accuracy {dense_acc:.3f} → {pruned_acc:.3f}")

    cert_path = folder / "certificate.json"
    step(f"prunecp calibrate {pruned.name} --data calib.npz --alpha 0.1 -o {cert_path.name}")
    cert = api.calibrate(pruned, paths["calib"], alpha=0.1, output=cert_path, run=on_cpu)
    claim = cert["guarantee"]
    upper = "" if claim["coverage_at_most"] is None else f" and at most {claim['coverage_at_most']:.4f}"
    console.print(f"q̂ = {cert['quantile']:.4f} from n = {cert['data']['n']} calibration points: {claim['type']} "
                  f"coverage at least {claim['coverage_at_least']:g}{upper}; calibration mean set size "
                  f"{cert['calibration']['mean_set_size']:.2f}")

    step(f"prunecp certify {pruned.name} --cert {cert_path.name} --data test.npz")
    verdict = api.certify(pruned, paths["test"], cert=cert_path, run=on_cpu)
    present.render_verdict(verdict, console)

    step(f"prunecp report {pruned.name} --cert {cert_path.name}")
    report = api.report(pruned, repeats=10, cert=cert_path, run=on_cpu)
    present.render_table(report, console)

    shipped = _export_and_certify(folder, pruned, cert_path, paths["test"], step=step, console=console, run=on_cpu)

    elapsed = time.perf_counter() - started
    console.print(f"\n[bold]done in {elapsed:.1f} s[/bold]; files are in {folder}")
    return {"folder": str(folder), "dense_accuracy": dense_acc, "pruned_accuracy": pruned_acc,
            "flops_ratio": result.flops_ratio, "params_ratio": result.params_ratio, "seconds": elapsed,
            "test_coverage": verdict["coverage"], "mean_set_size": verdict["mean_set_size"],
            "certified": verdict["passed"], "auto": result.extra["auto"], **shipped}


def _export_and_certify(folder: Path, pruned: Path, cert: Path, test: Path, *, step, console, run) -> dict:
    """The deployment step: export to ONNX (checked with ONNX Runtime) and certify the exported file."""
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")):
        console.print("\n(skipping the ONNX export: pip install 'prunecp[export]' for it)")
        return {}
    onnx_path = folder / "pruned.onnx"
    step(f"prunecp export {pruned.name} --cert {cert.name} --format onnx --data test.npz -o {onnx_path.name}")
    result = api.export(pruned, onnx_path, cert=cert, format="onnx", data=test, run=run)
    check = result["verification"]
    console.print(f"wrote {onnx_path.name} ({result['bytes']:,} bytes): ONNX Runtime's prediction sets equal the "
                  f"certified model's on {check['n']}/{check['n']} test inputs, max |Δlogit| "
                  f"{check['max_abs_logit_diff']:.2g}")
    step(f"prunecp certify {onnx_path.name} --cert {cert.name} --data test.npz")
    verdict = api.certify(onnx_path, test, cert=cert, run=run)
    present.render_verdict(verdict, console)
    return {"export_max_abs_logit_diff": check["max_abs_logit_diff"], "export_certified": verdict["passed"]}
