"""The pretrained front-end graphs, fetched for training from the pinned wheel and verified.

Source: the wheel `openwakeword==0.4.0` (later versions ship no models), downloaded with the
ordinary package client (`pip download --no-deps`) into a cache directory. The wheel's sha256
and each extracted file's sha256 must equal the pins below; anything else is refused with one
line. Training copies the verified graphs into the exported model directory, whose manifest
pins them again, so a device never downloads anything and never imports openwakeword.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from agent.errors import AgentError
from agent.recognition.frontend import (
    DEFAULT,
    EMBEDDING_FILE,
    MEL_FILE,
    STREAM_FILE,
    SpeechEmbedding,
)
from agent.recognition.model import sha256_file

PACKAGE = "openwakeword"
VERSION = "0.4.0"
WHEEL = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "2c353f49a35d384507403efde3db439353d8281a52d08a0e42a5b493e5145075"
LICENSE_FILE = "LICENSE"
CACHE_ENV = "EVA_PRETRAINED_CACHE"

# Where the provenance and both licence statements are written out (see NOTICE).
SOURCE = (f"Google speech_embedding (Lin et al. 2020), ONNX conversion distributed in the "
          f"wheel {PACKAGE}=={VERSION}")
LICENCE = ("Apache-2.0 (Google, TF Hub speech_embedding/1); openwakeword's metadata says its "
           "included pre-trained models are CC BY-NC-SA 4.0 (question open upstream)")


@dataclass(frozen=True)
class Pinned:
    """One file inside the wheel and the name it gets in a model directory."""

    member: str
    name: str
    size: int
    sha256: str


FILES = (
    Pinned(f"{PACKAGE}/resources/models/melspectrogram.onnx", MEL_FILE, 1087958,
           "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f"),
    Pinned(f"{PACKAGE}/resources/models/embedding_model.onnx", EMBEDDING_FILE, 1328103,
           "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51"),
    Pinned(f"{PACKAGE}-{VERSION}.dist-info/LICENSE", LICENSE_FILE, 11357, ""),
)


def default_cache() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / \
        "edge-voice-agent" / "pretrained"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_wheel(cache: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into `cache` (reused when already there)."""
    wheel = cache / WHEEL
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(cache), f"{PACKAGE}=={VERSION}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AgentError(f"pip download {PACKAGE}=={VERSION} failed ({e}); check the network "
                         f"or put {WHEEL} into {cache} (or set {CACHE_ENV})") from None
    if r.returncode != 0 or not wheel.is_file():
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise AgentError(f"pip download {PACKAGE}=={VERSION} failed ({last}); check the network "
                         f"or put {WHEEL} into {cache} (or set {CACHE_ENV})")
    return wheel


def verify_wheel(wheel: Path) -> None:
    digest = sha256_file(wheel)
    if digest != WHEEL_SHA256:
        raise AgentError(f"wheel {wheel} has sha256 {digest[:12]}… but the pin is "
                         f"{WHEEL_SHA256[:12]}…; it is not {PACKAGE}=={VERSION} as published — "
                         "delete it and fetch again")


def extract(wheel: Path, out: Path) -> dict[str, Path]:
    """The pinned members of a verified wheel → `out`, each checked against its pin."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    try:
        z = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as e:
        raise AgentError(f"wheel {wheel} cannot be opened ({e}); delete it and fetch "
                         "again") from None
    with z:
        for f in FILES:
            try:
                data = z.read(f.member)
            except KeyError:
                raise AgentError(f"wheel {wheel} lacks {f.member}; it is not {PACKAGE}=="
                                 f"{VERSION} — delete it and fetch again") from None
            digest = sha256_bytes(data)
            if f.sha256 and digest != f.sha256:
                raise AgentError(f"{f.member} in {wheel} has sha256 {digest[:12]}… but the pin "
                                 f"is {f.sha256[:12]}…; refusing it — delete the wheel and "
                                 "fetch again")
            target = out / f.name
            if not target.is_file() or sha256_file(target) != digest:
                tmp = target.with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
            paths[f.name] = target
    return paths


def verify_extracted(directory: Path) -> None:
    """Files already extracted (by an earlier run) still match their pins."""
    for f in FILES:
        path = directory / f.name
        if not path.is_file():
            raise AgentError(f"{path} is missing; fetch the pretrained front end again")
        if f.sha256:
            digest = sha256_file(path)
            if digest != f.sha256:
                raise AgentError(f"{path} has sha256 {digest[:12]}… but the pin is "
                                 f"{f.sha256[:12]}…; delete it and fetch again")


# The pinned embedding graph's layout, as derive_streaming expects it (checked, not assumed).
_TIME_RESHAPE = "new_shape__315"      # [-1, 1, 76, 34]: NHWC input → (n, 1, time, mel)
_OUT_RESHAPE_INPUT = "model/conv2d_19/Conv2D:0"  # (n, 96, time', 1) → reshaped to (n, 1, 1, 96)
STREAM_NOTE = ("derived from embedding_model.onnx by training: input time axis declared dynamic "
               "(batch 1), output transposed time-major; weights and operators unchanged")


def derive_streaming(src: Path, dst: Path) -> None:
    """embedding_model.onnx (one 76-frame window per row) → the same network over a whole mel
    sequence in one call: the time axis is declared dynamic, the internal reshape keeps it, and
    a transpose makes the output one row per window. Refused unless it reproduces the pinned
    graph window by window on a probe sequence."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    shapes = [i for i in g.initializer if i.name == _TIME_RESHAPE]
    outs = [k for k, n in enumerate(g.node)
            if n.op_type == "Reshape" and n.input[0] == _OUT_RESHAPE_INPUT]
    if len(shapes) != 1 or len(outs) != 1 or \
            list(numpy_helper.to_array(shapes[0])) != [-1, 1, DEFAULT.mel_window, 34]:
        raise AgentError(f"{src} does not have the layout of the pinned embedding graph; "
                         "delete the cache and fetch again")
    dims = g.input[0].type.tensor_type.shape.dim
    dims[0].ClearField("dim_value")
    dims[0].dim_param = "one"
    dims[1].ClearField("dim_value")
    dims[1].dim_param = "frames"
    g.output[0].type.tensor_type.shape.dim[0].dim_param = "windows"
    shapes[0].CopyFrom(numpy_helper.from_array(np.array([1, 1, -1, 34], np.int64),
                                               _TIME_RESHAPE))
    g.node[outs[0]].input[0] = "time_major"
    g.node.insert(outs[0], helper.make_node("Transpose", [_OUT_RESHAPE_INPUT], ["time_major"],
                                            perm=[0, 2, 3, 1]))
    del g.value_info[:]
    onnx.checker.check_model(m)
    tmp = dst.with_suffix(f".{os.getpid()}.tmp")
    onnx.save(m, str(tmp))
    gap = streaming_gap(src, tmp)
    if gap > 1e-4:
        tmp.unlink()
        raise AgentError(f"the streaming embedding graph derived from {src} differs from it by "
                         f"{gap:.2e}; refusing it (onnx/onnxruntime versions?)")
    tmp.replace(dst)


def streaming_gap(original: Path, streaming: Path, frames: int = 147) -> float:
    """Largest difference between the pinned graph, window by window, and the streaming graph
    on one sequence (a fixed pseudo-random mel)."""
    import onnxruntime as ort

    p = DEFAULT
    spec = np.random.default_rng(0).normal(1.0, 2.0, (frames, 32)).astype(np.float32)
    k = (frames - p.mel_window) // p.mel_step + 1
    wins = np.stack([spec[i * p.mel_step:i * p.mel_step + p.mel_window] for i in range(k)])
    a = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(streaming), providers=["CPUExecutionProvider"])
    want = a.run(None, {a.get_inputs()[0].name: wins[..., None]})[0].reshape(k, -1)
    got = b.run(None, {b.get_inputs()[0].name: spec[None, :, :, None]})[0].reshape(-1, 96)
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max())


def fetch(cache: Path | None = None, log=print) -> Path:
    """A directory holding the verified melspectrogram.onnx, embedding_model.onnx and LICENSE,
    and embedding_stream.onnx derived from them.

    Downloads the pinned wheel once (pip), checks its hash, extracts and checks each file.
    """
    cache = Path(cache) if cache is not None else default_cache()
    out = cache / f"{PACKAGE}-{VERSION}"
    wheel = cache / WHEEL
    if not wheel.is_file():
        log(f"pretrained: downloading {PACKAGE}=={VERSION} (no dependencies) into {cache}")
    wheel = download_wheel(cache)
    verify_wheel(wheel)
    extract(wheel, out)
    verify_extracted(out)
    stream = out / STREAM_FILE
    if not stream.is_file() or streaming_gap(out / EMBEDDING_FILE, stream) > 1e-4:
        derive_streaming(out / EMBEDDING_FILE, stream)
    return out


@lru_cache(maxsize=2)
def training_embedder(directory: str | None = None) -> SpeechEmbedding:
    """One embedder per process (also inside Pool workers), on the verified files."""
    d = Path(directory) if directory else fetch(log=lambda *_: None)
    if not (d / STREAM_FILE).is_file():
        derive_streaming(d / EMBEDDING_FILE, d / STREAM_FILE)
    return SpeechEmbedding(d / MEL_FILE, d / STREAM_FILE, threads=1)
