"""A shipped model: manifest, integrity check, ONNX Runtime session, probabilities out.

A model directory holds `model.onnx` and `manifest.json`. Loading refuses, with one line naming
the file and the fix, anything that does not match: hash, rate, feature size, input shape,
number of classes. The daemon never runs a model it cannot vouch for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.features import FeatureParams

MANIFEST = "manifest.json"
ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    classes: tuple[str, ...]
    sample_rate: int
    features: FeatureParams
    sha256: str
    input_name: str = "features"
    output_name: str = "probabilities"
    unknown_label: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise AgentError(f"model manifest {path} is missing; a model directory needs "
                             f"{ONNX_FILE} and {MANIFEST}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AgentError(f"model manifest {path} is not valid JSON ({e}); re-export the "
                             "model with 'edge-voice-agent train'") from None
        try:
            return cls(name=str(d["name"]), version=str(d["version"]),
                       classes=tuple(str(c) for c in d["classes"]),
                       sample_rate=int(d["sample_rate"]),
                       features=FeatureParams.from_dict(d["features"]),
                       sha256=str(d["sha256"]), input_name=str(d.get("input_name", "features")),
                       output_name=str(d.get("output_name", "probabilities")),
                       unknown_label=d.get("unknown_label"), training=d.get("training", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise AgentError(f"model manifest {path} lacks or garbles {e}; re-export the model "
                             "with 'edge-voice-agent train'") from None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "classes": list(self.classes),
                "sample_rate": self.sample_rate, "features": self.features.to_dict(),
                "sha256": self.sha256, "input_name": self.input_name,
                "output_name": self.output_name, "unknown_label": self.unknown_label,
                "training": self.training}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ModelRunner:
    """ONNX Runtime session on CPU that maps feature vectors to class probabilities."""

    def __init__(self, directory: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = m = Manifest.read(self.directory / MANIFEST)
        onnx_path = self.directory / ONNX_FILE
        if not onnx_path.is_file():
            raise AgentError(f"model file {onnx_path} is missing; reinstall the model directory")
        digest = sha256_file(onnx_path)
        if digest != m.sha256:
            raise AgentError(f"model file {onnx_path} has sha256 {digest[:12]}… but its manifest "
                             f"says {m.sha256[:12]}…; the file is corrupt or not this model's — "
                             "reinstall it")
        if m.sample_rate != m.features.sample_rate:
            raise AgentError(f"model manifest {self.directory / MANIFEST}: sample_rate "
                             f"{m.sample_rate} differs from the feature rate "
                             f"{m.features.sample_rate}; re-export the model")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(str(onnx_path), opts,
                                                 providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise AgentError(f"model file {onnx_path} cannot be loaded by ONNX Runtime "
                             f"({' '.join(str(e).split())[:200]}); re-export it") from None
        inputs = {i.name: i for i in self._session.get_inputs()}
        if m.input_name not in inputs:
            raise AgentError(f"model {m.ref}: ONNX input '{m.input_name}' named in the manifest "
                             f"does not exist (has {', '.join(inputs)}); re-export the model")
        shape = inputs[m.input_name].shape
        if len(shape) != 2 or shape[1] != m.features.dim:
            raise AgentError(f"model {m.ref}: ONNX input shape {shape} does not match the "
                             f"manifest's feature size [N, {m.features.dim}]; the manifest "
                             "belongs to another model — re-export it")
        outputs = [o.name for o in self._session.get_outputs()]
        if m.output_name not in outputs:
            raise AgentError(f"model {m.ref}: ONNX output '{m.output_name}' named in the "
                             f"manifest does not exist (has {', '.join(outputs)})")
        probe = self.predict(np.zeros((1, m.features.dim), np.float32))
        if probe.shape != (1, len(m.classes)):
            raise AgentError(f"model {m.ref}: ONNX gives {probe.shape[1]} probabilities but the "
                             f"manifest lists {len(m.classes)} classes; re-export the model")

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(n, dim) float32 features → (n, classes) probabilities."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self._session.run([self.manifest.output_name], {self.manifest.input_name: x})[0]
