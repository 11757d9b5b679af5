"""The model runner refuses anything that does not match its manifest."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from agent.errors import AgentError
from agent.model import Manifest, ModelRunner, sha256_file
from agent.resources import default_model_dir


@pytest.fixture()
def model_copy(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(default_model_dir(), dst)
    return dst


def edit_manifest(d, **changes):
    m = json.loads((d / "manifest.json").read_text())
    for k, v in changes.items():
        if k.startswith("features."):
            m["features"][k.split(".", 1)[1]] = v
        else:
            m[k] = v
    (d / "manifest.json").write_text(json.dumps(m))


def test_bundled_model_loads_and_predicts_probabilities():
    r = ModelRunner(default_model_dir())
    m = r.manifest
    assert m.sample_rate == 8000 and len(m.classes) >= 10
    p = r.predict(np.zeros((3, m.features.dim), np.float32))
    assert p.shape == (3, len(m.classes))
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-4)


def test_tampered_model_file_is_refused(model_copy):
    data = bytearray((model_copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (model_copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(AgentError, match="sha256") as e:
        ModelRunner(model_copy)
    assert "\n" not in str(e.value)


def test_corrupt_model_with_matching_hash_is_refused(model_copy):
    (model_copy / "model.onnx").write_bytes(b"not an onnx model")
    edit_manifest(model_copy, sha256=sha256_file(model_copy / "model.onnx"))
    with pytest.raises(AgentError, match="cannot be loaded"):
        ModelRunner(model_copy)


def test_rate_mismatch_is_refused(model_copy):
    edit_manifest(model_copy, sample_rate=16000)
    with pytest.raises(AgentError, match="sample_rate"):
        ModelRunner(model_copy)


def test_input_shape_mismatch_is_refused(model_copy):
    edit_manifest(model_copy, **{"features.n_frames": 20})
    with pytest.raises(AgentError, match="input shape"):
        ModelRunner(model_copy)


def test_class_count_mismatch_is_refused(model_copy):
    m = Manifest.read(model_copy / "manifest.json")
    edit_manifest(model_copy, classes=list(m.classes)[:-1])
    with pytest.raises(AgentError, match="classes"):
        ModelRunner(model_copy)


def test_missing_or_garbled_manifest_is_refused(model_copy):
    (model_copy / "manifest.json").write_text("{not json")
    with pytest.raises(AgentError, match="not valid JSON"):
        ModelRunner(model_copy)
    (model_copy / "manifest.json").unlink()
    with pytest.raises(AgentError, match="missing"):
        ModelRunner(model_copy)
