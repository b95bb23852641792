"""``pipeline/prediction.py``: class-name files, and the records of a small prediction run."""

from __future__ import annotations

import json

import pytest
import torch
from testsupport import load_npz

from prunecp_cli import api
from prunecp_cli.errors import CertificateError, DataError
from prunecp_cli.pipeline.prediction import read_class_names

CPU = api.RunOptions(device="cpu")
DIGITS = [f"digit-{d}" for d in range(10)]


@pytest.mark.parametrize("text", ["\n".join(DIGITS), "\n".join(DIGITS) + "\n\n\n", json.dumps(DIGITS),
                                  "  " + json.dumps(DIGITS, indent=2)])
def test_class_names_from_lines_or_a_json_list(tmp_path, text):
    path = tmp_path / "names.txt"
    path.write_text(text)
    assert read_class_names(path, 10) == DIGITS


def test_class_name_lines_are_stripped_and_inner_blank_lines_count(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("  cat \n\ndog\n")
    assert read_class_names(path, 3) == ["cat", "", "dog"]


@pytest.mark.parametrize(("content", "message"), [
    (None, r"--class-names .*names\.txt cannot be read \(FileNotFoundError\); pass a text file"),
    (b"\xff\xfe\x00c", r"cannot be read \(UnicodeDecodeError\)"),
    ('["cat", "dog"', r"is not a valid JSON list \(.*\); write a JSON list of strings or one name per line"),
    ('["cat", 2]', "must be a JSON list of strings"),
    ("\n".join(DIGITS[:9]), "holds 9 names, but the model has 10 classes; give one name per class"),
    (json.dumps(DIGITS + ["eleven"]), "holds 11 names, but the model has 10 classes"),
])
def test_bad_class_name_files_are_data_errors(tmp_path, content, message):
    path = tmp_path / "names.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as caught:
        read_class_names(path, 10)
    assert "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def certified(trained_digits, digits_files, tmp_path_factory):
    """The trained digits model file and its certificate (alpha 0.1, LAC), on disk."""
    cert = tmp_path_factory.mktemp("cert") / "certificate.json"
    api.calibrate(trained_digits["safetensors"], digits_files["calib"], alpha=0.1, output=cert, run=CPU)
    return trained_digits["safetensors"], cert


def test_records_are_the_model_outputs_and_the_certificate_sets(certified, trained_digits, digits_files):
    model, cert = certified
    records = api.predict(model, digits_files["test"], cert=cert, run=api.RunOptions(device="cpu", batch_size=7))
    x, y = load_npz(digits_files["test"])
    with torch.no_grad():
        logits = trained_digits["model"](x)
    quantile = json.loads(cert.read_text())["quantile"]
    assert [r["index"] for r in records] == list(range(len(y)))  # data order across batches of 7
    for record, row, label in zip(records, logits, y.tolist(), strict=True):
        assert list(record) == ["index", "top1", "set", "scores", "label"]
        assert record["top1"] == int(row.argmax()) and record["label"] == label
        assert record["set"] == [c for c, s in enumerate(record["scores"]) if s <= quantile]
        # LAC: the nonconformity of class c is 1 - softmax(logits)[c]
        assert record["scores"] == pytest.approx((1 - row.softmax(0)).tolist(), abs=1e-5)
    covered = sum(r["label"] in r["set"] for r in records) / len(records)
    assert covered >= 0.8  # a 90% certificate on 270 held-out digits


def test_records_use_class_names_and_the_jsonl_file_holds_them(certified, digits_files, tmp_path):
    model, cert = certified
    out = tmp_path / "sets.jsonl"
    records = api.predict(model, digits_files["test"], cert=cert, class_names=DIGITS, output=out, run=CPU)
    plain = api.predict(model, digits_files["test"], cert=cert, run=CPU)
    for named, indexed in zip(records, plain, strict=True):
        assert named["top1"] == DIGITS[indexed["top1"]] and named["label"] == DIGITS[indexed["label"]]
        assert named["set"] == [DIGITS[c] for c in indexed["set"]] and named["scores"] == indexed["scores"]
    assert [json.loads(line) for line in out.read_text().splitlines()] == records


def test_prediction_refuses_wrong_class_names_and_another_model(certified, digits_files, trained_digits):
    model, cert = certified
    with pytest.raises(DataError, match="9 class names given for a model with 10 classes"):
        api.open_prediction(model, digits_files["test"], cert=cert, class_names=DIGITS[:9], run=CPU)
    dense = api.ModelSource(trained_digits["pt"], arch="prunecp_cli.models:digits_cnn")
    with pytest.raises(CertificateError, match=r"made for model dense\.safetensors .* but dense\.pt has sha256"):
        api.open_prediction(dense, digits_files["test"], cert=cert, run=CPU)
