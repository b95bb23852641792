"""The zoo benchmark: every torchvision CNN and a set of timm models through score, prune and reload.

For each model (random initialisation, nothing downloaded): build it with 10 classes, save the dense
checkpoint (torchvision: a ``.pt`` state dict with ``--arch torchvision:NAME``; timm: a hub-style
folder, ``config.json`` beside ``model.safetensors``, which prunecp reads without ``--arch``), score
it with ``l1`` on a few hundred random images, prune it to half the FLOPs with BatchNorm
recalibration, then reload the pruned file in a *new process* with ``prunecp_cli.load_model`` and
check that it computes exactly what the pruned model computed (max |difference| = 0). The reload
process also times ``load_model`` against building the dense architecture and loading its weights,
and for the models of :data:`LATENCY_MODELS` measures CPU latency at 3×224×224, batch 1 and 16,
dense and pruned interleaved.

Every model runs in its own process with a time limit, so one failure cannot stop the table.

    python examples/benchmarks/zoo.py                      # everything (about 30 min on 2 cores)
    python examples/benchmarks/zoo.py --models resnet18,timm:dla34 --no-latency
    python examples/benchmarks/zoo.py --ci                 # the CI subset at a small input

Writes ``results/zoo.json`` and ``results/zoo.md`` (``--results`` changes the folder).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

TORCHVISION = (
    "alexnet", "vgg11", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2",
    "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1", "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5",
    "mnasnet1_0", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
    "convnext_tiny", "maxvit_t",
)
TIMM = (
    "resnet50d", "seresnext26d_32x4d", "efficientnet_b0", "mobilenetv3_large_100", "convnext_atto",
    "regnety_002", "ghostnet_100", "rexnet_100", "hrnet_w18_small", "dla34", "cspresnet50", "repvgg_a0",
    "mixnet_s", "densenet121", "dpn68", "res2net50_14w_8s", "resnest14d", "ese_vovnet19b_dw",
    "mobileone_s0", "lcnet_050",
)
ALL = (*TORCHVISION, *(f"timm:{name}" for name in TIMM))
CI_MODELS = (
    "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x0_5", "timm:mobilenetv3_large_100", "timm:mixnet_s",
)
LATENCY_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
#: Models the issue asks for "where the engine allows": reported, not counted against the run. MaxViT
#: spends most of its FLOPs in attention and MLP linear layers, which no convolution group reaches.
OPTIONAL = ("maxvit_t",)
#: Models that need a larger input than the default: their smallest working size.
MIN_SIZE = {"inception_v3": 75, "maxvit_t": 224}
TARGET_FLOPS = 0.5


def _spec(model: str) -> str:
    return model if model.startswith("timm:") else f"torchvision:{model}"


# --- worker: one model through score and prune (runs in its own process) ----------------------------------

def _build(model: str):
    from prunecp_cli.io.arch import build_model

    return build_model(_spec(model), {"num_classes": 10})


def _save_dense(model: str, net, folder: Path) -> tuple[Path, str | None]:
    """The dense checkpoint as a user has it: a state dict, or a timm hub-style folder."""
    import torch

    if model.startswith("timm:"):
        from safetensors.torch import save_file

        hub = folder / "hub"
        hub.mkdir()
        (hub / "config.json").write_text(json.dumps({
            "architecture": model.split(":", 1)[1], "num_classes": 10, "model_args": {}}))
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(hub / "model.safetensors"))
        return hub, None
    path = folder / "dense.pt"
    torch.save(net.state_dict(), path)
    return path, _spec(model)


def worker(model: str, size: int, images: int, folder: Path, round_to: int = 1) -> dict:
    import numpy as np
    import torch

    from prunecp_cli import api

    torch.manual_seed(0)
    size = max(size, MIN_SIZE.get(model, 0))
    net = _build(model).eval()
    checkpoint, arch = _save_dense(model, net, folder)
    rng = np.random.default_rng(0)
    data = folder / "data.npz"
    np.savez(data, x=rng.standard_normal((images, 3, size, size)).astype(np.float32),
             y=rng.integers(0, 10, images))
    source = api.ModelSource(checkpoint, arch=arch, arch_kwargs={"num_classes": 10} if arch else None)
    run = api.RunOptions(device="cpu", batch_size=32, seed=0)
    scores, pruned = folder / "scores.json", folder / "pruned.safetensors"
    started = time.perf_counter()
    api.score(source, data, method="l1", output=scores, run=run)
    result = api.prune(source, pruned, scores=scores, data=data,
                       pruning=api.PruneOptions(target_flops=TARGET_FLOPS, round_to=round_to), run=run)
    elapsed = time.perf_counter() - started
    model_out = api.load_model(pruned)
    x = torch.from_numpy(rng.standard_normal((2, 3, size, size)).astype(np.float32))
    with torch.no_grad():
        reference = model_out.eval()(x)
    np.savez(folder / "reference.npz", x=x.numpy(), y=reference.numpy())
    meta = json.loads(_metadata(pruned).get("prunecp.groups_left_whole", "[]"))
    return {"flops_kept": result.flops_ratio, "params_kept": result.params_ratio, "left_whole": len(meta),
            "size": size, "prune_s": elapsed, "pruned": str(pruned), "dense": str(checkpoint), "arch": arch}


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


# --- reload: a fresh process loads the pruned file, times it, and measures latency -------------------------

def reload(model: str, record: dict, folder: Path, latency: bool) -> dict:
    import numpy as np
    import torch

    import prunecp_cli
    from prunecp_cli import api

    pruned, dense = Path(record["pruned"]), Path(record["dense"])
    load_s, dense_s = [], []
    for _ in range(3):  # interleaved; the fastest of each
        started = time.perf_counter()
        net = prunecp_cli.load_model(pruned)
        load_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        dense_net = api.load_model(dense, arch=record["arch"], arch_kwargs={"num_classes": 10} if record["arch"] else None)
        dense_s.append(time.perf_counter() - started)
    saved = np.load(folder / "reference.npz")
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(saved["x"]))
    out_record = {"reload_s": min(load_s), "dense_load_s": min(dense_s),
                  "reload_max_abs_diff": float(np.abs(out.numpy() - saved["y"]).max())}
    if latency and model in LATENCY_MODELS:
        out_record["latency"] = _latency(dense_net.eval(), net.eval())
    return out_record


def _latency(dense, pruned) -> dict:
    import torch

    from prunecp_cli.measure import count_flops

    result = {}
    example = torch.randn(1, 3, 224, 224)
    result["flops_speedup_224"] = count_flops(dense, example) / count_flops(pruned, example)
    for batch in (1, 16):
        x = torch.randn(batch, 3, 224, 224)
        times = {"dense": [], "pruned": []}
        with torch.inference_mode():
            for net in (dense, pruned):
                net(x)  # warm-up
            for _ in range(5 if batch == 1 else 3):
                for name, net in (("dense", dense), ("pruned", pruned)):
                    started = time.perf_counter()
                    net(x)
                    times[name].append(time.perf_counter() - started)
        result[f"dense_ms_b{batch}"] = 1000 * min(times["dense"])
        result[f"pruned_ms_b{batch}"] = 1000 * min(times["pruned"])
        result[f"speedup_b{batch}"] = min(times["dense"]) / min(times["pruned"])
    return result


# --- the driver --------------------------------------------------------------------------------------------

def _child(args: list[str], timeout: float) -> tuple[int, dict | None, str]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    try:
        proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return 124, None, f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("ZOO ")]
    if proc.returncode == 0 and lines:
        return 0, json.loads(lines[-1][4:]), ""
    error = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    return proc.returncode, None, (error[-1] if error else "no output")[:300]


def run_model(model: str, args: argparse.Namespace) -> dict:
    row: dict = {"model": model}
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        started = time.perf_counter()
        code, record, error = _child(["--worker", model, "--size", str(args.size), "--images", str(args.images),
                                      "--round-to", str(args.round_to), "--folder", tmp], args.timeout)
        row.update(exit=code, error=error)
        if record is not None:
            row.update(record)
            code, reloaded, error = _child(["--reload", model, "--folder", tmp, "--record", json.dumps(record),
                                            *(["--latency"] if args.latency else [])], args.timeout)
            row.update(exit=code, error=error)
            row.update(reloaded or {})
        row["seconds"] = time.perf_counter() - started
        for key in ("pruned", "dense", "arch"):
            row.pop(key, None)
    return row


def _passed(row: dict) -> bool:
    """Pruned to half the FLOPs (within [0.45, 0.55]) and reloaded in a new process bit for bit."""
    return row["exit"] == 0 and 0.45 <= row.get("flops_kept", 0) <= 0.55 and row.get("reload_max_abs_diff") == 0


def markdown(rows: list[dict], total_s: float) -> str:
    lines = ["| model | input | FLOPs kept | params kept | groups left whole | reload s | dense build+load s "
             "| reload Δ | exit | error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def fmt(key, spec, r=r):
            return format(r[key], spec) if key in r else "–"
        lines.append(f"| {r['model']} | {fmt('size', 'd')} | {fmt('flops_kept', '.3f')} | {fmt('params_kept', '.3f')} "
                     f"| {fmt('left_whole', 'd')} | {fmt('reload_s', '.2f')} | {fmt('dense_load_s', '.2f')} "
                     f"| {fmt('reload_max_abs_diff', '.1g')} | {r['exit']} | {r.get('error', '')} |")
    lat = [r for r in rows if "latency" in r]
    if lat:
        lines += ["", "| model (3×224×224) | FLOPs speed-up | batch 1: dense / pruned ms | speed-up | "
                  "batch 16: dense / pruned ms | speed-up | batch-16 speed-up / FLOPs speed-up |",
                  "|---|---|---|---|---|---|---|"]
        for r in lat:
            t = r["latency"]
            lines.append(f"| {r['model']} | {t['flops_speedup_224']:.2f}× | {t['dense_ms_b1']:.1f} / "
                         f"{t['pruned_ms_b1']:.1f} | {t['speedup_b1']:.2f}× | {t['dense_ms_b16']:.0f} / "
                         f"{t['pruned_ms_b16']:.0f} | {t['speedup_b16']:.2f}× | "
                         f"{t['speedup_b16'] / t['flops_speedup_224']:.2f} |")
    passed = sum(_passed(r) for r in rows)
    optional = [r["model"] for r in rows if r["model"] in OPTIONAL and not _passed(r)]
    note = f" ({', '.join(optional)}: optional, where the engine allows)" if optional else ""
    lines += ["", f"{passed} of {len(rows)} models passed{note}; total {total_s / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated names (torchvision names, timm:NAME); default all")
    parser.add_argument("--ci", action="store_true", help="the CI subset at 3×32×32 with 64 images, no latency")
    parser.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    parser.add_argument("--images", type=int, default=200, help="random score images (default 200)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per model and step (default 600)")
    parser.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--round-to", type=int, default=1, help="prune's --round-to (default 1: any width)")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--worker"), parser.add_argument("--reload"), parser.add_argument("--folder", type=Path)
    parser.add_argument("--record")
    args = parser.parse_args(argv)
    if args.worker or args.reload:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        from prunecp_cli.errors import PrunecpError

        try:
            if args.worker:
                record = worker(args.worker, args.size, args.images, args.folder, args.round_to)
            else:
                record = reload(args.reload, json.loads(args.record), args.folder, args.latency)
        except PrunecpError as exc:  # the exit code and one-line message the CLI would give
            print(f"prunecp: error: {exc}", file=sys.stderr)
            return exc.exit_code
        print("ZOO " + json.dumps(record))
        return 0
    if args.ci:
        args.size, args.images, args.latency = 32, 64, False
    models = args.models.split(",") if args.models else list(CI_MODELS if args.ci else ALL)
    started, rows = time.perf_counter(), []
    for model in models:
        row = run_model(model, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    total = time.perf_counter() - started
    args.results.mkdir(parents=True, exist_ok=True)
    name = "zoo-ci" if args.ci else ("zoo" if not args.models else "zoo-subset")
    (args.results / f"{name}.json").write_text(json.dumps({"rows": rows, "total_s": total}, indent=1))
    table = markdown(rows, total)
    (args.results / f"{name}.md").write_text(table)
    print(table)
    return 0 if all(_passed(r) or r["model"] in OPTIONAL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
