"""``prunecp export`` on the pruned digits CNN: round trips, set agreement, certify/predict on exports, tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from testsupport import assert_one_line_error, load_npz

from prunecp_cli import api
from prunecp_cli.conformal.certificate import load_certificate
from prunecp_cli.io import exported as ex
from prunecp_cli.io.data import open_dataset
from prunecp_cli.pipeline import export as export_step
from prunecp_cli.pipeline.export_check import compare_on


@pytest.fixture(scope="module")
def work(tmp_path_factory, trained_digits, digits_files):
    """A pruned digits CNN, its certificate, and its ONNX and .pt2 exports (checked on the score split)."""
    folder = tmp_path_factory.mktemp("export")
    pruned, cert = folder / "pruned.safetensors", folder / "cert.json"
    api.prune(trained_digits["safetensors"], pruned, method="l1", pruning=api.PruneOptions(ratio=0.4))
    api.calibrate(pruned, digits_files["calib"], alpha=0.1, output=cert, run=api.RunOptions(device="cpu"))
    results = {fmt: api.export(pruned, folder / f"pruned.{fmt}", cert=cert, format=fmt, data=digits_files["score"])
               for fmt in ("onnx", "pt2")}
    return {"folder": folder, "pruned": pruned, "cert": cert, "results": results, "dense": trained_digits["safetensors"],
            **digits_files}


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_round_trip_agrees_and_carries_the_certificate(work, fmt):
    result = work["results"][fmt]
    check = result["verification"]
    n = len(open_dataset(work["score"]))
    assert check["n"] == n and check["disagreements"] == 0 and check["set_agreement"] == 1.0
    assert 0 < check["max_abs_logit_diff"] < 1e-4  # float rounding, not a different model
    info, _, _ = ex.read_export(result["output"])
    cert = load_certificate(work["cert"])
    assert info.intact and info.content_sha256 == result["content_sha256"]
    record = info.record
    assert record["quantile"] == cert["quantile"] and record["alpha"] == cert["alpha"]
    assert record["guarantee"]["statement"] == cert["guarantee"]["statement"]
    assert record["source"]["sha256"] == cert["model"]["sha256"]
    # the file, reopened, computes the prunecp model's logits
    loaded = ex.open_exported(result["output"])
    x, _ = load_npz(work["test"])
    with torch.no_grad():
        reference = api.load_model(work["pruned"])(x[:40])
    torch.testing.assert_close(loaded.model(x[:40]), reference, atol=1e-4, rtol=1e-4)


def test_onnx_metadata_props_hold_the_record(work):
    import onnx

    proto = onnx.load(work["results"]["onnx"]["output"])
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props[ex.RECORD_KEY])["certificate"]["sha256"] == work["results"]["onnx"]["certificate"]["sha256"]
    assert props[ex.CONTENT_KEY] == ex.onnx_content_sha256(proto)


def _perturbed_onnx(path, scale=0.5):
    """The ONNX bytes with noise added to the largest weight tensor."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(path)
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weights = numpy_helper.to_array(init)
    noisy = weights + scale * np.random.default_rng(0).standard_normal(weights.shape).astype(weights.dtype)
    init.CopyFrom(numpy_helper.from_array(noisy, init.name))
    return proto.SerializeToString()


def test_perturbed_weights_fail_the_agreement_check(work):
    reference = api.load_model(work["pruned"])
    check = compare_on(reference, ex.OrtModule(_perturbed_onnx(work["results"]["onnx"]["output"])),
                       open_dataset(work["score"]), certificate=load_certificate(work["cert"]), num_classes=10,
                       batch_size=64)
    assert check["disagreements"] > 0 and check["set_agreement"] < 1.0 and check["largest_gap"] > 0


def test_disagreement_is_exit_4_and_writes_nothing(cli, work, monkeypatch):
    honest = export_step.run_export

    class Noisy(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.inner = module

        def forward(self, x):
            return self.inner(x) + 3.0 * torch.randn(len(x), 10, generator=torch.Generator().manual_seed(0))

    def perturbed(payload, fmt, *, path):
        return Noisy(honest(payload, fmt, path=path))

    monkeypatch.setattr(export_step, "run_export", perturbed)
    out = work["folder"] / "bad.pt2"
    result = cli("export", work["pruned"], "--cert", work["cert"], "--format", "pt2", "-o", out, "--data", work["score"])
    assert_one_line_error(result, 4, contains="inputs (largest score gap to q̂")
    assert not out.exists() and not list(work["folder"].glob(".bad.pt2*"))


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_certify_export_gives_the_safetensors_verdict(cli, work, fmt):
    args = ("--cert", work["cert"], "--data", work["test"], "--json")
    export = json.loads(cli("certify", work["results"][fmt]["output"], *args).stdout)
    source = json.loads(cli("certify", work["pruned"], *args).stdout)
    assert export["passed"] is source["passed"] is True
    assert export["covered"] == source["covered"] and export["p_value"] == pytest.approx(source["p_value"])
    assert export["checks"][0]["name"] == "model-sha256" and "intact" in export["checks"][0]["detail"]


def _flip_weight_byte(path, out):
    """Copy the ONNX file with one byte flipped inside the largest initializer's raw data."""
    import onnx

    data = bytearray(Path(path).read_bytes())
    init = max(onnx.load(path).graph.initializer, key=lambda t: len(t.raw_data))
    start = bytes(data).find(init.raw_data)
    assert start > 0
    data[start + len(init.raw_data) // 2] ^= 0x10
    out.write_bytes(bytes(data))


def test_flipped_weight_byte_fails_certify_with_exit_4(cli, work):
    tampered = work["folder"] / "tampered.onnx"
    _flip_weight_byte(work["results"]["onnx"]["output"], tampered)
    result = cli("certify", tampered, "--cert", work["cert"], "--data", work["test"])
    assert_one_line_error(result, 4, contains="changed after prunecp export")
    predicted = cli("predict", tampered, "--cert", work["cert"], "--data", work["test"])
    assert_one_line_error(predicted, 3, contains="changed after prunecp export")


def test_predict_on_exports_gives_the_certified_sets(work):
    source = api.predict(work["pruned"], work["test"], cert=work["cert"])
    for fmt in ("onnx", "pt2"):
        records = api.predict(work["results"][fmt]["output"], work["test"], cert=work["cert"])
        assert [r["set"] for r in records] == [r["set"] for r in source]


def test_export_refuses_without_data_and_a_wrong_suffix(cli, work):
    out = work["folder"] / "x.onnx"
    assert_one_line_error(cli("export", work["pruned"], "--cert", work["cert"], "-o", out), 2, contains="--no-verify")
    assert_one_line_error(cli("export", work["pruned"], "--cert", work["cert"], "-o", work["folder"] / "x.pt2",
                              "--data", work["score"]), 2, contains="must end in .onnx")
    assert_one_line_error(cli("export", work["pruned"], "--cert", work["cert"], "-o", out, "--data", work["score"],
                              "--opset", "17"), 2, contains="--opset 18")
    assert not out.exists()


PROBE = """
import sys
from pathlib import Path
from prunecp_cli.app import app
try:
    app(sys.argv[1:], prog_name="prunecp")
except SystemExit as exc:
    code = exc.code
print("LOADED=" + ",".join(m for m in ("onnx", "onnxruntime", "onnxscript", "matplotlib") if m in sys.modules))
sys.exit(code)
"""


def test_certify_on_safetensors_imports_no_onnx(work):
    out = subprocess.run([sys.executable, "-c", PROBE, "certify", str(work["pruned"]), "--cert", str(work["cert"]),
                          "--data", str(work["test"]), "--quiet"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "LOADED=\n" in out.stdout, out.stdout[-200:]


def test_report_ort_times_both_runtimes(work):
    from prunecp_cli import present

    data = api.report(work["pruned"], repeats=3, ort=True, run=api.RunOptions(device="cpu", batch_size=8))
    rows = data.deployment
    assert [(r["runtime"], r["batch_size"]) for r in rows] == [("PyTorch", 1), ("PyTorch", 8), ("ONNX Runtime", 1),
                                                               ("ONNX Runtime", 8)]
    assert all(r["dense_ms"] > 0 and r["pruned_ms"] > 0 for r in rows)
    # PyTorch at --batch-size is the latency row's own measurement, not a second timing
    assert (rows[1]["dense_ms"], rows[1]["pruned_ms"]) == (data.latency["before"].median_ms,
                                                           data.latency["after"].median_ms)
    assert "ONNX Runtime latency (batch 8" in present.render_markdown(data)
    assert json.loads(json.dumps(data.to_json()))["deployment"][2]["runtime"] == "ONNX Runtime"


def test_model_card_states_the_certificate_and_audit(cli, work):
    verdict_path = work["folder"] / "verdict.json"
    result = cli("certify", work["pruned"], "--cert", work["cert"], "--data", work["test"], "--json")
    verdict_path.write_text(result.stdout)
    card = work["folder"] / "card" / "MODEL_CARD.md"
    made = cli("report", work["pruned"], "--cert", work["cert"], "--format", "card", "-o", card, "--verdict",
               verdict_path, "--no-latency")
    assert made.code == 0, made
    text, cert, verdict = card.read_text(), load_certificate(work["cert"]), json.loads(result.stdout)
    assert cert["guarantee"]["statement"] in text
    assert f"| q̂ | {cert['quantile']:.6g} |" in text and f"| alpha | {cert['alpha']} |" in text
    assert f"| calibration points n | {cert['data']['n']} |" in text
    assert f"| test coverage | {verdict['coverage']:.4g} |" in text and "certificate holds" in text
    assert cert["data"]["sha256"] in text and verdict["data"]["sha256"] in text
    for name in ("MODEL_CARD_channels.png", "MODEL_CARD_sets.png"):
        png = card.parent / name
        assert f"]({name})" in text and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "prunecp calibrate pruned.safetensors --data calib.npz --alpha 0.1" in text
    dense = Path(work["dense"]).name  # the reproduce command names the checkpoint that was pruned
    assert f"| source checkpoint | {dense} |" in text and f"prunecp prune {dense} --arch " in text


def test_card_reproduce_command_carries_the_architecture_arguments():
    import shlex
    from types import SimpleNamespace

    from prunecp_cli.card import reproduce_commands

    data = SimpleNamespace(model="out/r18-p.safetensors", architecture={
        "arch": "torchvision:resnet18", "arch_kwargs": {"num_classes": 4, "name": "it's"}}, metadata={
        "method": "l1", "source_file": "r18.pt", "target": {"target_flops": 0.5},
        "data_sha256": [{"role": "score", "file": "imgs", "sha256": "0" * 64}]})
    command = reproduce_commands(data, None, None)[0]
    words = shlex.split(command)  # what a shell passes to prunecp
    assert words[:3] == ["prunecp", "prune", "r18.pt"]
    assert json.loads(words[words.index("--arch-kwargs") + 1]) == {"num_classes": 4, "name": "it's"}
    assert words[words.index("--target-flops") + 1] == "0.5" and words[-2:] == ["-o", "r18-p.safetensors"]


def test_flipped_weight_byte_in_a_pt2_fails_certify_with_exit_4(cli, work):
    import zipfile

    source = Path(work["results"]["pt2"]["output"])
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = max((i for i in archive.infolist() if "/data/weights/weight_" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # local header, then the bytes
    data[start + info.file_size // 2] ^= 0x10
    tampered = work["folder"] / "tampered.pt2"
    tampered.write_bytes(bytes(data))
    result = cli("certify", tampered, "--cert", work["cert"], "--data", work["test"])
    assert_one_line_error(result, 4, contains="changed after prunecp export")
