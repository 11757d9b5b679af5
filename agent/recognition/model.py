"""A shipped model: manifest, integrity check of every component, ONNX Runtime sessions.

A model directory holds several components, each an ONNX graph listed in `manifest.json` with
its name, file, role, version, licence and sha256:

* `melspectrogram` and `embedding` — the pretrained front end the daemon runs (see
  agent/recognition/frontend.py, NOTICE), and `embedding_source`, the pinned graph `embedding` was
  derived from (kept for provenance and checked like the rest, never loaded);
* `head` — the trained classifier: head input (1,056 floats) → calibrated class probabilities;
* `rejector` (optional) — head input → p_in, the probability that the utterance is one of the
  known classes at all ((n, 2) with p_in in column 1, or (n, 1)). With a rejector, `predict`
  returns P(class) = p_in · P_head(class) for the known classes and P(unknown) = 1 − p_in
  (a head without an `unknown` output) or 1 − p_in + p_in · P_head(unknown) (a head with one):
  the chain rule, so the decision policy, calibration files and monitoring keep reading one
  probability vector over the manifest's classes.

The classes are the model's vocabulary (its words plus `unknown`, agent.recognition.vocabulary):
any list of words works on the device; a class name that breaks the word rule is refused at reading.
Loading refuses, with one line naming the file and the fix, anything that does not match: a
component's hash, the rate, the head's input size, the number of classes. The manifest's `sha256` is
the model build's identity (a digest over every component's hash): thresholds, baselines and
telemetry refer to it. The daemon never runs a model it cannot vouch for.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.recognition.frontend import FrontendParams, SpeechEmbedding, features
from agent.recognition.vocabulary import vocabulary_problem

MANIFEST = "manifest.json"
FORMAT = 2
ROLES = ("melspectrogram", "embedding", "embedding_source", "head", "rejector")
REQUIRED_ROLES = ("melspectrogram", "embedding", "head")
RETRAIN = "re-export the model with 'edge-voice-agent train'"


@dataclass(frozen=True)
class Component:
    """One file of a model directory and where it comes from."""

    name: str
    file: str
    role: str
    version: str
    licence: str
    sha256: str
    source: str = ""
    input_name: str = ""
    output_name: str = ""

    def to_dict(self) -> dict[str, str]:
        d = {"name": self.name, "file": self.file, "role": self.role, "version": self.version,
             "licence": self.licence, "sha256": self.sha256}
        for k in ("source", "input_name", "output_name"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Component:
        c = cls(name=str(d["name"]), file=str(d["file"]), role=str(d["role"]),
                version=str(d["version"]), licence=str(d["licence"]), sha256=str(d["sha256"]),
                source=str(d.get("source", "")), input_name=str(d.get("input_name", "")),
                output_name=str(d.get("output_name", "")))
        if c.role not in ROLES:
            raise ValueError(f"component role {c.role!r} (allowed: {', '.join(ROLES)})")
        if "/" in c.file or "\\" in c.file or c.file.startswith("."):
            raise ValueError(f"component file {c.file!r} (a plain file name is required)")
        return c


def build_digest(components: tuple[Component, ...] | list[Component]) -> str:
    """The model build's identity: sha256 over every component's name and hash."""
    lines = sorted(f"{c.name} {c.sha256}\n" for c in components)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    classes: tuple[str, ...]
    sample_rate: int
    frontend: FrontendParams
    components: tuple[Component, ...]
    unknown_label: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def sha256(self) -> str:
        return build_digest(self.components)

    def component(self, role: str) -> Component | None:
        found = [c for c in self.components if c.role == role]
        return found[0] if found else None

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise AgentError(f"model manifest {path} is missing; a model directory needs "
                             f"{MANIFEST} and the component files it lists") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AgentError(f"model manifest {path} is not valid JSON ({e}); {RETRAIN}") \
                from None
        except OSError as e:
            raise AgentError(f"model manifest {path} cannot be read ({e.strerror}); fix its "
                             "permissions or reinstall the model") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            got = d.get("format", 1) if isinstance(d, dict) else "?"
            raise AgentError(f"model manifest {path} is format {got}, this agent reads format "
                             f"{FORMAT} (pretrained speech-embedding front end); install a 2.x "
                             f"model or {RETRAIN}")
        try:
            m = cls(name=str(d["name"]), version=str(d["version"]),
                    classes=tuple(str(c) for c in d["classes"]),
                    sample_rate=int(d["sample_rate"]),
                    frontend=FrontendParams.from_dict(d["frontend"]),
                    components=tuple(Component.from_dict(c) for c in d["components"]),
                    unknown_label=d.get("unknown_label"), training=d.get("training", {}))
        except (KeyError, TypeError, ValueError) as e:
            raise AgentError(f"model manifest {path} lacks or garbles {e}; {RETRAIN}") from None
        why = vocabulary_problem(m.classes, m.unknown_label)
        if why:
            raise AgentError(f"model manifest {path}: {why}; {RETRAIN} "
                             "(agent/recognition/vocabulary.py "
                             "says what a word may be)")
        missing = [r for r in REQUIRED_ROLES if m.component(r) is None]
        if missing:
            raise AgentError(f"model manifest {path} lists no {', '.join(missing)} component; "
                             f"{RETRAIN}")
        if d.get("sha256") not in (None, m.sha256):
            raise AgentError(f"model manifest {path}: its sha256 {str(d['sha256'])[:12]}… is not "
                             f"the digest of its components ({m.sha256[:12]}…); the manifest was "
                             f"edited — {RETRAIN}")
        return m

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "name": self.name, "version": self.version,
                "classes": list(self.classes), "sample_rate": self.sample_rate,
                "unknown_label": self.unknown_label, "sha256": self.sha256,
                "frontend": self.frontend.to_dict(),
                "components": [c.to_dict() for c in self.components],
                "training": self.training}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_components(directory: Path, m: Manifest) -> None:
    """Every listed file exists and has the listed sha256; else one line naming file and fix."""
    for c in m.components:
        path = directory / c.file
        if not path.is_file():
            raise AgentError(f"model component {path} ({c.name}) is missing; reinstall the model "
                             "directory")
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise AgentError(f"model component {path} cannot be read ({e.strerror}); fix its "
                             "permissions or reinstall the model directory") from None
        if digest != c.sha256:
            raise AgentError(f"model component {path} ({c.name}) has sha256 {digest[:12]}… but "
                             f"{MANIFEST} says {c.sha256[:12]}…; the file is corrupt or not this "
                             "model's — reinstall the model directory")


def _same_front_end(a: Manifest, b: Manifest) -> bool:
    return a.frontend == b.frontend and all(
        a.component(r) is not None and b.component(r) is not None
        and a.component(r).sha256 == b.component(r).sha256 for r in ("melspectrogram",
                                                                     "embedding"))


class ModelRunner:
    """The verified model in ONNX Runtime on CPU: audio → head input → class probabilities."""

    def __init__(self, directory: str | Path, threads: int = 1,
                 share_from: ModelRunner | None = None) -> None:
        """`share_from`: a loaded model whose front-end sessions this one reuses when its
        melspectrogram and embedding files are the same (sha256) — a shadow candidate then
        costs only its head in memory (agent.rollout)."""
        import onnxruntime as ort

        self.directory = Path(directory)
        self.manifest = m = Manifest.read(self.directory / MANIFEST)
        verify_components(self.directory, m)
        if m.sample_rate != m.frontend.sample_rate:
            raise AgentError(f"model manifest {self.directory / MANIFEST}: sample_rate "
                             f"{m.sample_rate} differs from the front end's rate "
                             f"{m.frontend.sample_rate}; {RETRAIN}")
        if m.component("rejector") is not None and m.unknown_label not in m.classes:
            raise AgentError(f"model {m.ref}: a rejector needs the unknown label among the "
                             f"classes ({m.unknown_label!r} is not); {RETRAIN}")
        if share_from is not None and _same_front_end(share_from.manifest, m):
            self.embedder = share_from.embedder
        else:
            self.embedder = SpeechEmbedding(self._path("melspectrogram"),
                                            self._path("embedding"), threads, m.frontend)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._head = self._graph(ort, opts, "head")
        self._rejector = self._graph(ort, opts, "rejector") \
            if m.component("rejector") is not None else None
        self._unknown = m.classes.index(m.unknown_label) if m.unknown_label in m.classes \
            else -1
        self._known = [i for i in range(len(m.classes)) if i != self._unknown]
        self.features(np.zeros(m.sample_rate // 4, np.float32))  # warm up: first runs allocate
        probe = self.predict(np.zeros((1, m.frontend.dim), np.float32))
        if probe.shape != (1, len(m.classes)):
            raise AgentError(f"model {m.ref}: the head gives {probe.shape[1]} probabilities but "
                             f"the manifest lists {len(m.classes)} classes; {RETRAIN}")

    def _path(self, role: str) -> Path:
        c = self.manifest.component(role)
        assert c is not None
        return self.directory / c.file

    def _graph(self, ort, opts, role: str):
        m = self.manifest
        c = m.component(role)
        assert c is not None
        path = self.directory / c.file
        try:
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise AgentError(f"model component {path} cannot be loaded by ONNX Runtime "
                             f"({' '.join(str(e).split())[:200]}); {RETRAIN}") from None
        inputs = {i.name: i for i in sess.get_inputs()}
        in_name = c.input_name or next(iter(inputs))
        if in_name not in inputs:
            raise AgentError(f"model {m.ref}: {role} input '{in_name}' named in the manifest "
                             f"does not exist in {path} (has {', '.join(inputs)}); {RETRAIN}")
        shape = inputs[in_name].shape
        if len(shape) != 2 or shape[1] != m.frontend.dim:
            raise AgentError(f"model {m.ref}: {role} input shape {shape} in {path} does not "
                             f"match the front end's head input [N, {m.frontend.dim}]; {RETRAIN}")
        outputs = [o.name for o in sess.get_outputs()]
        out_name = c.output_name or ("probabilities" if "probabilities" in outputs
                                     else outputs[-1])
        if out_name not in outputs:
            raise AgentError(f"model {m.ref}: {role} output '{out_name}' named in the manifest "
                             f"does not exist in {path} (has {', '.join(outputs)}); {RETRAIN}")
        return sess, in_name, out_name

    def features(self, audio: np.ndarray) -> np.ndarray:
        """One utterance (mono float32 at the model's rate) → head input (dim,)."""
        return features(audio, self.embedder)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(n, dim) head inputs → (n, classes) probabilities (rejector folded in, if any)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        sess, i, o = self._head
        probs = sess.run([o], {i: x})[0]
        if self._rejector is None:
            return probs
        sess, i, o = self._rejector
        r = sess.run([o], {i: x})[0]
        p_in = (r[:, 1] if r.ndim == 2 and r.shape[1] == 2 else r.reshape(len(x)))
        out = np.empty((len(x), len(self.manifest.classes)), np.float32)
        if probs.shape[1] == len(self._known):       # a head over the known classes only
            out[:, self._known] = probs * p_in[:, None]
            out[:, self._unknown] = 1.0 - p_in
        else:                                        # a head with its own unknown output
            out[:] = probs * p_in[:, None]
            out[:, self._unknown] += 1.0 - p_in
        return out
