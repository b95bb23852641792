"""Malformed model files, importance.json and certificate.json: always exit 3 with one line, never exit 1.

Every field of the three file kinds prunecp reads may be missing, of the wrong type, out of range
or huge. A table of hand-written cases runs each through the command that reads it; hypothesis then
mutates valid files with random JSON values in random places and calls the readers directly, which
must either accept the result or raise a :class:`~prunecp_cli.errors.PrunecpError` with exit code 3.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from testsupport import assert_one_line_error

from prunecp_cli.errors import PrunecpError

DIGITS_ARCH = "prunecp_cli.models:digits_cnn"


def _read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


@pytest.fixture(scope="module")
def files(tmp_path_factory, trained_digits, digits_files):
    """Valid files to break: a pruned model (with a plan), its importance.json and a certificate."""
    from prunecp_cli import api

    folder = tmp_path_factory.mktemp("malformed")
    dense = api.ModelSource(trained_digits["pt"], arch=DIGITS_ARCH, input_shape=[1, 8, 8])
    on_cpu = api.RunOptions(device="cpu")
    importance = folder / "importance.json"
    api.score(dense, method="l1", output=importance, run=on_cpu)
    pruned = folder / "pruned.safetensors"
    api.prune(dense, pruned, scores=importance, pruning=api.PruneOptions(ratio=0.5), run=on_cpu,
              data=digits_files["score"])
    cert = folder / "cert.json"
    api.calibrate(pruned, digits_files["calib"], alpha=0.1, output=cert, run=on_cpu)
    state, metadata = _read(pruned)
    return {"folder": folder, "pt": trained_digits["pt"], "pruned": pruned, "importance": importance,
            "cert": cert, "state": state, "metadata": metadata, **digits_files}


# --- hand-written cases -------------------------------------------------------------------------------------------

HUGE = 10**6  # a million-entry list: a few MB of JSON
BIG = 10**5  # for lists of larger items
NESTED = "[" * 100_000 + "]" * 100_000
LONG_INT = "1" * 5000  # beyond Python's int-string conversion limit

# field -> raw metadata text (None: delete the field); run through `report`
MODEL_CASES = {
    "schema_version missing": ("schema_version", None),
    "schema_version not a number": ("schema_version", "one"),
    "schema_version from the future": ("schema_version", "99"),
    "schema_version zero": ("schema_version", "0"),
    "arch missing": ("arch", None),
    "arch not a spec": ("arch", "rm -rf /"),
    "arch unknown torchvision model": ("arch", "torchvision:resnet_nine_thousand"),
    "arch attribute path in a trusted module": ("arch", "prunecp_cli.models:nn.Module"),
    "arch_kwargs a list": ("arch_kwargs", "[1, 2]"),
    "arch_kwargs not JSON": ("arch_kwargs", "{"),
    "arch_kwargs nested too deeply": ("arch_kwargs", NESTED),
    "arch_kwargs unknown argument": ("arch_kwargs", '{"bogus": 1}'),
    "arch_kwargs negative width": ("arch_kwargs", '{"width": -3}'),
    "arch_kwargs huge width": ("arch_kwargs", '{"width": 1000000}'),
    "input_shape negative": ("input_shape", "[-1, 8, 8]"),
    "input_shape huge": ("input_shape", "[1, 100000, 100000]"),
    "input_shape a million entries": ("input_shape", json.dumps([1] * HUGE)),
    "input_shape a string": ("input_shape", '"1,8,8"'),
    "input_shape floats": ("input_shape", "[1.5, 8, 8]"),
    "plan a list": ("plan", "[]"),
    "plan version 2": ("plan", json.dumps({"version": 2, "history": []})),
    "plan without history": ("plan", json.dumps({"version": 1})),
    "plan unknown module": ("plan", json.dumps({"version": 1, "history": [["features.9.9", True, [0]]]})),
    "plan empty module name": ("plan", json.dumps({"version": 1, "history": [["", True, [0]]]})),
    "plan index out of range": ("plan", json.dumps({"version": 1, "history": [["features.0.0", True, [999]]]})),
    "plan negative index": ("plan", json.dumps({"version": 1, "history": [["features.0.0", True, [-1]]]})),
    "plan index a string": ("plan", json.dumps({"version": 1, "history": [["features.0.0", True, ["0"]]]})),
    "plan direction a string": ("plan", json.dumps({"version": 1, "history": [["features.0.0", "out", [0]]]})),
    "plan 100,000 entries": ("plan", json.dumps({"version": 1, "history": [["features.0.0", True, [0]]] * BIG})),
    "plan a million indices": ("plan", json.dumps({"version": 1, "history": [["features.0.0", True,
                                                                              list(range(HUGE))]]})),
    "plan removes a whole layer": ("plan", json.dumps({"version": 1, "history": [["features.0.0", True,
                                                                                 list(range(16))]]})),
    "plan groups wrong": ("plan", json.dumps({"version": 1, "history": [], "groups": {"a": 3}})),
    "data_sha256 not records": ("data_sha256", "[1, 2]"),
    "data_sha256 100,000 records": ("data_sha256", json.dumps([{"sha256": "0", "role": "s", "file": "x"}] * BIG)),
    "risk_control a string": ("risk_control", '"certified"'),
    "target steps a string": ("target", '{"steps": "many"}'),
    "finetune without loss": ("finetune", '{"epochs": 1, "lr": 0.1}'),
    "schedule accuracy NaN": ("schedule", '[{"accuracy": NaN, "mean_set_size": 1.0}]'),
    "sparsity fraction 5": ("sparsity", '{"zeroed_fraction": 5}'),
    "params_after negative": ("params_after", "-5"),
    "method not JSON": ("method", "l1"),
    "method a long int": ("method", LONG_INT),
}

# torchvision factories called with a file's arguments
TORCHVISION_CASES = {
    "torchvision negative classes": ("torchvision:resnet18", {"num_classes": -5}),
    "torchvision huge classes": ("torchvision:resnet18", {"num_classes": 10**10}),
    "torchvision pretrained weights": ("torchvision:resnet18", {"weights": "DEFAULT"}),
    "torchvision unknown argument": ("torchvision:resnet18", {"bogus": True}),
}


def _with_field(files, tmp_path, key, text):
    metadata = dict(files["metadata"])
    if text is None:
        metadata.pop(f"prunecp.{key}")
    else:
        metadata[f"prunecp.{key}"] = text
    path = tmp_path / "bad.safetensors"
    save_file(files["state"], str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_malformed_model_metadata(cli, files, tmp_path, name):
    key, text = MODEL_CASES[name]
    path = _with_field(files, tmp_path, key, text)
    started = time.monotonic()
    result = cli("report", path, "--no-latency")
    assert_one_line_error(result, 3)
    assert time.monotonic() - started < 20, "far too slow for a bad file"


@pytest.mark.parametrize("name", ["data_sha256 not records", "risk_control a string", "input_shape negative"])
def test_malformed_model_metadata_calibrate(cli, files, tmp_path, name):
    key, text = MODEL_CASES[name]
    path = _with_field(files, tmp_path, key, text)
    result = cli("calibrate", path, "--data", files["calib"], "-o", tmp_path / "c.json", "--device", "cpu")
    assert_one_line_error(result, 3)
    assert not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("name", list(TORCHVISION_CASES))
def test_trusted_factory_with_bad_arguments(cli, tmp_path, name):
    arch, kwargs = TORCHVISION_CASES[name]
    metadata = {"prunecp.schema_version": "1", "prunecp.arch": arch, "prunecp.arch_kwargs": json.dumps(kwargs),
                "prunecp.input_shape": "[3, 32, 32]", "prunecp.plan": "{}"}
    path = tmp_path / "tv.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(path), metadata=metadata)
    result = cli("report", path, "--no-latency")
    assert_one_line_error(result, 3, contains="resnet18")


def _mutate_json(doc, path, value):
    """A deep copy of ``doc`` with the item at ``path`` replaced by ``value`` (deleted when value is DELETE)."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


DELETE = object()
IMPORTANCE_CASES = {
    "not JSON": "{not json",
    "a list": [],
    "schema_version a string": (("schema_version",), "1"),
    "groups missing": (("groups",), DELETE),
    "groups an object": (("groups",), {"features.0.0": [1.0]}),
    "group not an object": (("groups", 0), 7),
    "group name missing": (("groups", 0, "name"), DELETE),
    "channels a string": (("groups", 0, "channels"), "16"),
    "channels a bool": (("groups", 0, "channels"), True),
    "importance a number": (("groups", 0, "importance"), 5),
    "importance too short": (("groups", 0, "importance"), [1.0]),
    "importance NaN": (("groups", 0, "importance", 0), float("nan")),
    "importance huge int": (("groups", 0, "importance", 0), 10**400),
    "importance a million entries": (("groups", 0), {"name": "features.0.0", "modules": [], "channels": HUGE,
                                                     "importance": [1.0] * HUGE}),
    "groups 100,000 entries": (("groups",), [{"name": "a", "modules": [], "channels": 1, "importance": [1]}] * BIG),
    "modules a string": (("groups", 0, "modules"), "features.0.0"),
    "model_sha256 a number": (("model_sha256",), 123),
    "params a list": (("params",), [["a", 1]]),
    "input_shape negative": (("input_shape",), [-1, 8, 8]),
    "input_shape huge": (("input_shape",), [3, 100000, 100000]),
    "warnings a number": (("warnings",), 3),
    "nested too deeply": NESTED,
    "a long int": LONG_INT,
}


def _write_case(files, tmp_path, base_key, case, name):
    path = tmp_path / name
    if isinstance(case, str):
        path.write_text(case)
    elif isinstance(case, tuple):
        doc = json.loads(files[base_key].read_text())
        path.write_text(json.dumps(_mutate_json(doc, *case)))
    else:
        path.write_text(json.dumps(case))
    return path


@pytest.mark.parametrize("name", list(IMPORTANCE_CASES))
def test_malformed_importance(cli, files, tmp_path, name):
    scores = _write_case(files, tmp_path, "importance", IMPORTANCE_CASES[name], "importance.json")
    out = tmp_path / "out.safetensors"
    result = cli("prune", files["pt"], "--arch", DIGITS_ARCH, "--scores", scores, "--ratio", "0.5",
                 "--input-shape", "1,8,8", "-o", out, "--device", "cpu")
    assert_one_line_error(result, 3)
    assert not out.exists()


CERTIFICATE_CASES = {
    "not JSON": "[1, 2",
    "not an object": [],
    "quantile NaN": (("quantile",), float("nan")),
    "quantile a string": (("quantile",), "0.5"),
    "quantile infinite": (("quantile",), float("inf")),
    "alpha above 1": (("alpha",), 1.5),
    "alpha a bool": (("alpha",), True),
    "data.n negative": (("data", "n"), -1),
    "data.n huge": (("data", "n"), 10**400),
    "model missing": (("model",), DELETE),
    "model.sha256 a number": (("model", "sha256"), 1),
    "num_classes a million": (("model", "num_classes"), HUGE),
    "nonconformity name a list": (("nonconformity", "name"), ["lac"]),
    "nonconformity name an object": (("nonconformity", "name"), {"lac": 1}),
    "nonconformity parameters unknown": (("nonconformity", "parameters"), {"bogus": 1}),
    "nonconformity parameters a list": (("nonconformity", "parameters"), [1]),
    "rank wrong": (("rank",), 3),
    "class_conditional a string": (("class_conditional",), "yes"),
    "histogram a million entries": (("calibration", "set_size_histogram"), [0] * HUGE),
    "guarantee type unknown": (("guarantee", "type"), "absolute"),
    "delta a string": (("delta",), "0.1"),
    "risk_control a list": (("risk_control",), [1]),
    "nested too deeply": NESTED,
    "a long int": LONG_INT,
}


@pytest.mark.parametrize("command", ["certify", "predict"])
@pytest.mark.parametrize("name", list(CERTIFICATE_CASES))
def test_malformed_certificate(cli, files, tmp_path, name, command):
    cert = _write_case(files, tmp_path, "cert", CERTIFICATE_CASES[name], "certificate.json")
    result = cli(command, files["pruned"], "--cert", cert, "--data", files["test"], "--device", "cpu")
    assert_one_line_error(result, 3)


def test_malformed_certificate_report(cli, files, tmp_path):
    cert = _write_case(files, tmp_path, "cert", CERTIFICATE_CASES["quantile NaN"], "certificate.json")
    assert_one_line_error(cli("report", files["pruned"], "--cert", cert, "--no-latency"), 3)


def test_the_valid_files_pass(cli, files):
    assert cli("report", files["pruned"], "--no-latency", "--cert", files["cert"]).code == 0


# --- hypothesis: random JSON values in random places ----------------------------------------------------------------

SPECIAL = [None, True, False, 0, -1, 1, 2**63, 10**400, 0.5, -0.0, float("nan"), float("inf"), "", "x", [], {},
           [0], [-1], {"": None}, [1.0] * 1000]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
VALUES = st.one_of(st.sampled_from(SPECIAL), JSON)


@st.composite
def mutations(draw, doc, *, rounds=3):
    """``doc`` with 1..rounds random changes below its root: a node replaced, deleted, or given a new member."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, rounds))):
        parent, key, node = None, None, doc
        while isinstance(node, (dict, list)) and node and (parent is None or draw(st.integers(0, 3)) > 0):
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        value = copy.deepcopy(draw(VALUES))  # SPECIAL values are shared: never mutate them in place
        if parent is None:
            if action == "replace":
                doc = value
            elif isinstance(doc, dict):
                doc[draw(st.text(max_size=8))] = value
        elif action == "delete":
            del parent[key]
        elif action == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=8))] = value
        elif action == "add" and isinstance(node, list):
            node.append(value)
        else:
            parent[key] = value
    return doc


def _reader_outcome(call):
    """Run ``call``: it may succeed, or raise a PrunecpError of exit code 3; anything else fails the test."""
    try:
        call()
    except PrunecpError as exc:
        assert exc.exit_code == 3, f"{type(exc).__name__} (exit {exc.exit_code}): {exc}"
        assert "\n" not in str(exc)


# derandomize: the same examples on every run (a reproducible suite); no example database in the repo
SETTINGS = {"deadline": None, "suppress_health_check": list(HealthCheck), "database": None, "derandomize": True}
FUZZ = settings(max_examples=150, **SETTINGS)


def test_fuzz_importance(files, tmp_path):
    from prunecp_cli.io.checkpoint import open_model
    from prunecp_cli.pipeline.scoring import read_importance, scores_for_graph
    from prunecp_cli.surgery.groups import ModelGraph

    valid = json.loads(files["importance"].read_text())
    loaded = open_model(files["pt"], arch=DIGITS_ARCH)
    graph = ModelGraph(loaded.model, torch.zeros(1, 1, 8, 8))
    path = tmp_path / "importance.json"

    @FUZZ
    @given(mutations(valid))
    def check(doc):
        path.write_text(json.dumps(doc))

        def read():
            table = read_importance(path)
            scores_for_graph(table, graph, model_sha256=loaded.sha256, path=path)

        _reader_outcome(read)

    check()


def test_fuzz_certificate(files, tmp_path):
    from prunecp_cli.conformal.certificate import load_certificate
    from prunecp_cli.conformal.nonconformity import from_parameters
    from prunecp_cli.present import certificate_rows

    valid = json.loads(files["cert"].read_text())
    path = tmp_path / "certificate.json"

    @FUZZ
    @given(mutations(valid))
    def check(doc):
        path.write_text(json.dumps(doc))

        def read():
            cert = load_certificate(path)
            from_parameters(cert["nonconformity"]["name"], cert["nonconformity"]["parameters"])
            certificate_rows(cert)

        _reader_outcome(read)

    check()


def _metadata_text(doc: dict, raw_key: str | None) -> dict[str, str]:
    """Metadata strings for parsed fields: JSON text, except the plain-text fields and ``raw_key``'s string."""
    metadata = {}
    for key, value in doc.items():
        raw = isinstance(value, str) and key in ("arch", "schema_version", "version", raw_key)
        metadata[f"prunecp.{key}"] = value if raw else json.dumps(value)
    return metadata


def _open_and_use(path):
    """What commands do with a model file's metadata: open it, show its provenance, list the data it saw."""
    from prunecp_cli.io.checkpoint import open_model
    from prunecp_cli.present import provenance_rows
    from prunecp_cli.types import UsedData

    loaded = open_model(path)
    provenance_rows(loaded.meta.extra)
    assert all(UsedData(**d) for d in loaded.meta.extra.get("data_sha256", []))


@pytest.fixture
def parsed_metadata(files):
    """The pruned model's metadata with every JSON field parsed."""
    fields = {key[len("prunecp."):]: value for key, value in files["metadata"].items()}
    return {key: (value if key in ("arch", "schema_version", "version") else json.loads(value))
            for key, value in fields.items()}


def test_fuzz_model_metadata(files, tmp_path, parsed_metadata):
    """Mutate any metadata field of a pruned model file; open_model accepts it or refuses with exit 3."""
    path = tmp_path / "model.safetensors"

    @settings(max_examples=60, **SETTINGS)
    @given(mutations(parsed_metadata), st.one_of(st.none(), st.sampled_from(sorted(parsed_metadata))))
    def check(doc, raw_key):
        save_file(files["state"], str(path), metadata=_metadata_text(doc, raw_key))
        _reader_outcome(lambda: _open_and_use(path))

    check()


def test_fuzz_plan(files, tmp_path, parsed_metadata):
    """Mutate the replayable plan only (names, directions, indices, groups); the replay refuses with exit 3."""
    path = tmp_path / "model.safetensors"
    valid = parsed_metadata["plan"]
    names = sorted({step[0] for step in valid["history"]}) + ["classifier", "features", "features.0.1", "nope", ""]
    entry = st.tuples(st.one_of(st.sampled_from(names), st.text(max_size=8)), st.booleans(),
                      st.lists(st.integers(-2, 40), max_size=6)).map(list)
    histories = st.builds(lambda k, extra: {**valid, "history": valid["history"][:k] + extra},
                          st.integers(0, len(valid["history"])), st.lists(entry, max_size=4))

    @settings(max_examples=80, **SETTINGS)
    @given(st.one_of(mutations(valid, rounds=2), histories))
    def check(plan):
        save_file(files["state"], str(path), metadata=_metadata_text({**parsed_metadata, "plan": plan}, None))
        _reader_outcome(lambda: _open_and_use(path))

    check()
