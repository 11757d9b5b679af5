"""The model runner refuses anything that does not match its manifest, component by component."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from agent.errors import AgentError
from agent.recognition.frontend import DEFAULT
from agent.recognition.model import Manifest, ModelRunner, build_digest, sha256_file
from agent.resources import default_model_dir
from tests.conftest import ROOT


@pytest.fixture()
def model_copy(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(default_model_dir(), dst)
    return dst


def edit_manifest(d, **changes):
    m = json.loads((d / "manifest.json").read_text())
    for k, v in changes.items():
        if k.startswith("frontend."):
            m["frontend"][k.split(".", 1)[1]] = v
        else:
            m[k] = v
    (d / "manifest.json").write_text(json.dumps(m))
    return m


def flip_byte(path, at=200):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_bundled_model_loads_and_lists_every_component_with_provenance():
    r = ModelRunner(default_model_dir())
    m = r.manifest
    assert m.sample_rate == 16000 and m.version.startswith("3.") and len(m.classes) >= 10
    roles = {c.role for c in m.components}
    assert {"melspectrogram", "embedding", "head"} <= roles
    for c in m.components:
        assert c.name and c.version and c.licence and len(c.sha256) == 64
        assert sha256_file(default_model_dir() / c.file) == c.sha256
    assert m.sha256 == build_digest(m.components)
    p = r.predict(np.zeros((3, DEFAULT.dim), np.float32))
    assert p.shape == (3, len(m.classes))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)
    notice = (default_model_dir() / "NOTICE").read_text()
    for c in m.components:
        if c.role in ("melspectrogram", "embedding_source"):  # the pinned files
            assert c.sha256 in notice and c.sha256 in (ROOT / "NOTICE").read_text()


@pytest.mark.parametrize("role", ["melspectrogram", "embedding", "head"])
def test_a_wrong_component_hash_is_refused_in_one_line_naming_file_and_fix(model_copy, role):
    m = Manifest.read(model_copy / "manifest.json")
    c = m.component(role)
    flip_byte(model_copy / c.file)
    with pytest.raises(AgentError) as e:
        ModelRunner(model_copy)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(model_copy / c.file) in msg and "sha256" in msg and "reinstall" in msg


def test_a_missing_component_is_refused(model_copy):
    (model_copy / "embedding_model.onnx").unlink()
    with pytest.raises(AgentError, match="embedding_model.onnx .* is missing"):
        ModelRunner(model_copy)


def test_corrupt_head_with_matching_hash_is_refused(model_copy):
    d = json.loads((model_copy / "manifest.json").read_text())
    head = [c for c in d["components"] if c["role"] == "head"][0]
    (model_copy / head["file"]).write_bytes(b"not an onnx model")
    head["sha256"] = sha256_file(model_copy / head["file"])
    d.pop("sha256")
    (model_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(AgentError, match="cannot be loaded"):
        ModelRunner(model_copy)


def test_an_edited_manifest_digest_is_refused(model_copy):
    edit_manifest(model_copy, sha256="0" * 64)
    with pytest.raises(AgentError, match="digest of its components"):
        ModelRunner(model_copy)


def test_rate_mismatch_is_refused(model_copy):
    edit_manifest(model_copy, sample_rate=8000)
    with pytest.raises(AgentError, match="sample_rate"):
        ModelRunner(model_copy)


def test_head_input_size_mismatch_is_refused(model_copy):
    edit_manifest(model_copy, **{"frontend.n_embeddings": 7})
    with pytest.raises(AgentError, match="input shape"):
        ModelRunner(model_copy)


def test_class_count_mismatch_is_refused(model_copy):
    m = Manifest.read(model_copy / "manifest.json")
    edit_manifest(model_copy, classes=list(m.classes)[:-1])
    with pytest.raises(AgentError, match="classes"):
        ModelRunner(model_copy)


def test_format_1_manifest_is_refused_in_one_line(model_copy):
    d = json.loads((model_copy / "manifest.json").read_text())
    d.pop("format")
    (model_copy / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(AgentError, match="format 1") as e:
        ModelRunner(model_copy)
    assert "\n" not in str(e.value)


def test_missing_or_garbled_manifest_is_refused(model_copy):
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(AgentError, match="not valid JSON"):
        ModelRunner(model_copy)
    (model_copy / "manifest.json").unlink()
    with pytest.raises(AgentError, match="missing"):
        ModelRunner(model_copy)


def const_graph(values: list[float]) -> bytes:
    """An ONNX graph [N, 1056] → [N, k] that outputs `values` for every row."""
    from onnx import TensorProto, helper

    k = len(values)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["features", "w"], ["z"]),
         helper.make_node("Add", ["z", "b"], ["probabilities"])],
        "const", [helper.make_tensor_value_info("features", TensorProto.FLOAT,
                                                 [None, DEFAULT.dim])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor("w", TensorProto.FLOAT, [DEFAULT.dim, k], [0.0] * DEFAULT.dim * k),
         helper.make_tensor("b", TensorProto.FLOAT, [k], values)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def add_component(d, role: str, blob: bytes, replace: bool = False) -> None:
    name = f"{role}.onnx" if not replace else f"{role}-test.onnx"
    (d / name).write_bytes(blob)
    m = json.loads((d / "manifest.json").read_text())
    if replace:
        m["components"] = [c for c in m["components"] if c["role"] != role]
    m["components"].append({"name": role, "file": name, "role": role, "version": "test",
                            "licence": "MIT", "sha256": sha256_file(d / name)})
    m.pop("sha256", None)
    (d / "manifest.json").write_text(json.dumps(m))


def test_a_rejector_is_folded_in_by_the_chain_rule(model_copy):
    """With a rejector (p_in), known classes are scaled by p_in and unknown gets the rest;
    a head over the digits only and a head with its own unknown output both work."""
    pytest.importorskip("onnx", reason="building test graphs needs onnx (the train extra)")
    x = np.random.default_rng(0).standard_normal((4, DEFAULT.dim)).astype(np.float32)
    classes = ModelRunner(default_model_dir()).manifest.classes
    unk = classes.index("unknown")
    known = [i for i in range(len(classes)) if i != unk]

    full = list(np.linspace(1, 3, len(classes)) / np.linspace(1, 3, len(classes)).sum())
    add_component(model_copy, "head", const_graph(full), replace=True)  # with an unknown output
    add_component(model_copy, "rejector", const_graph([0.25]), replace=True)  # (n, 1): p_in
    out = ModelRunner(model_copy).predict(x)
    head = np.array([full] * 4)
    np.testing.assert_allclose(out[:, known], 0.25 * head[:, known], rtol=1e-5)
    np.testing.assert_allclose(out[:, unk], 0.75 + 0.25 * head[:, unk], rtol=1e-5)
    np.testing.assert_allclose(out.sum(1), 1.0, atol=1e-5)

    digits = list(np.linspace(1, 2, len(known)) / np.linspace(1, 2, len(known)).sum())
    add_component(model_copy, "head", const_graph(digits), replace=True)  # no unknown output
    add_component(model_copy, "rejector", const_graph([0.4, 0.6]), replace=True)  # (n, 2)
    out = ModelRunner(model_copy).predict(x)
    np.testing.assert_allclose(out[:, known], 0.6 * np.array([digits] * 4), rtol=1e-5)
    np.testing.assert_allclose(out[:, unk], 0.4, rtol=1e-5)


def test_a_digits_only_head_without_a_rejector_is_refused(model_copy):
    pytest.importorskip("onnx", reason="building test graphs needs onnx (the train extra)")
    add_component(model_copy, "head", const_graph([0.1] * 10), replace=True)
    m = json.loads((model_copy / "manifest.json").read_text())  # the shipped one has a rejector
    m["components"] = [c for c in m["components"] if c["role"] != "rejector"]
    (model_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(AgentError, match="classes"):
        ModelRunner(model_copy)
