"""Writing a model directory: the verified front-end graphs, the trained head graph(s), the
manifest (format 2: every component with name, file, role, version, licence, sha256) and a
NOTICE stating where the pretrained part comes from and under which licences.

Training calls `write_model_directory`; ModelRunner reads and verifies what it writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from agent.errors import AgentError
from agent.recognition.frontend import EMBEDDING_FILE, MEL_FILE, STREAM_FILE, FrontendParams
from agent.recognition.model import MANIFEST, Component, Manifest, ModelRunner, sha256_file
from agent.recognition.vocabulary import vocabulary_problem
from agent.training import pretrained as P

NOTICE_FILE = "NOTICE"
HEAD_LICENCE = ("MIT (this project); trained on FSDD (CC BY-SA 4.0), Speech Commands (CC BY 4.0, "
                "Warden 2018), speechocean762 read sentences as negatives (CC BY 4.0, "
                "Speechocean and Xiaomi 2021) and synthetic speech")
HEAD_FILES = {"head": "head.onnx", "rejector": "rejector.onnx"}


def notice_text() -> str:
    """Provenance and licences of the pretrained front end, with the pinned hashes. The
    repository's NOTICE and every model directory's NOTICE are this text."""
    mel, emb, _ = P.FILES
    return f"""\
edge-voice-agent — third-party model components
================================================

The speech front end of the fsdd-digits 2.x and 3.x models (files melspectrogram.onnx,
embedding_model.onnx and embedding_stream.onnx in every model directory) is not this project's
work. embedding_stream.onnx is embedding_model.onnx with its input time axis declared dynamic
and its output transposed time-major, so one call embeds a whole sequence; weights and
operators are unchanged and its outputs equal the original's window by window (tested).

Model:       speech_embedding, Google. Described in: J. Lin, K. Kilgour, D. Roblek,
             M. Sharifi, "Training keyword spotters with limited and synthesized speech data",
             ICASSP 2020 (arXiv:2002.01322). Published on TF Hub as
             https://tfhub.dev/google/speech_embedding/1
Licence (1): Apache License 2.0 — Google publishes the model on TF Hub under Apache-2.0.
Conversion:  the two ONNX graphs as distributed in the Python wheel
             {P.PACKAGE}=={P.VERSION} (openWakeWord, David Scripka), whose README says the
             embedding is Google's model, manually re-implemented, and whose code is
             Apache-2.0 (its LICENSE file: Apache License 2.0 text, 11,357 bytes).
Licence (2): the same README states: "All of the included pre-trained models are licensed
             under the Creative Commons Attribution-NonCommercial-ShareAlike 4.0
             International license" (CC BY-NC-SA 4.0). That sentence was written for
             openWakeWord's own wake-word models; whether it also binds the re-implemented
             Google embedding is an open question upstream. Until it is settled, treat the
             two graphs as possibly CC BY-NC-SA 4.0 (non-commercial) when redistributing.

Pinned files (sha256), fetched by training only (`pip download --no-deps
{P.PACKAGE}=={P.VERSION}`), verified, copied into the model directory and verified again by the
daemon at every load; the device never downloads them and never imports openwakeword:

  {P.WHEEL}
      {P.WHEEL_SHA256}
  {mel.member} -> {mel.name} ({mel.size:,} bytes)
      {mel.sha256}
  {emb.member} -> {emb.name} ({emb.size:,} bytes)
      {emb.sha256}

Trained heads (head.onnx, rejector.onnx) are this project's, under its MIT licence, trained
on the Free Spoken Digit Dataset (Jakobovski et al., CC BY-SA 4.0), Speech Commands (Warden
2018, CC BY 4.0) where used, real read sentences of the speechocean762 corpus as examples of
people talking (Speechocean and Xiaomi 2021, CC BY 4.0) where used, and synthetic speech. No
recording of any of them is redistributed.
"""


def frontend_components(src: Path) -> list[Component]:
    mel, emb, _ = P.FILES
    version = f"{P.PACKAGE} {P.VERSION}"
    return [
        Component(name="melspectrogram", file=MEL_FILE, role="melspectrogram", version=version,
                  licence=P.LICENCE, sha256=mel.sha256, source=P.SOURCE),
        Component(name="speech_embedding_stream", file=STREAM_FILE, role="embedding",
                  version=version, licence=P.LICENCE, sha256=sha256_file(src / STREAM_FILE),
                  source=f"{P.SOURCE}; {P.STREAM_NOTE} (sha256 {emb.sha256})"),
        Component(name="speech_embedding", file=EMBEDDING_FILE, role="embedding_source",
                  version=version, licence=P.LICENCE, sha256=emb.sha256, source=P.SOURCE),
    ]


def write_model_directory(out_dir: str | Path, *, name: str, version: str,
                          classes: tuple[str, ...] | list[str], unknown_label: str | None,
                          heads: dict[str, bytes], training: dict[str, Any],
                          pretrained_dir: str | Path | None = None,
                          params: FrontendParams = FrontendParams(),
                          head_io: dict[str, tuple[str, str]] | None = None) -> Manifest:
    """Write a complete, verified model directory and return its manifest.

    `heads` maps role ("head", optional "rejector") to serialised ONNX; `head_io` optionally
    names each graph's (input, output) (default: its first input and output). The front-end
    graphs come from `pretrained_dir` (default: `pretrained.fetch()`), verified again here.
    Files not written by this call are left alone; the result is loaded once by ModelRunner
    before returning, so a broken export fails here, not on a device.
    """
    why = vocabulary_problem(classes, unknown_label)
    if why:
        raise AgentError(f"model {name}: {why}; choose other words")
    out = Path(out_dir)
    src = Path(pretrained_dir) if pretrained_dir is not None else P.fetch()
    P.verify_extracted(src)
    if P.streaming_gap(src / EMBEDDING_FILE, src / STREAM_FILE) > 1e-4:
        P.derive_streaming(src / EMBEDDING_FILE, src / STREAM_FILE)
    if "head" not in heads or set(heads) - set(HEAD_FILES):
        raise ValueError(f"heads must hold 'head' and optionally 'rejector', got {sorted(heads)}")
    out.mkdir(parents=True, exist_ok=True)
    comps = frontend_components(src)
    for c in comps:
        target = out / c.file
        if not target.is_file() or sha256_file(target) != c.sha256:
            shutil.copyfile(src / c.file, target)
    io = head_io or {}
    for role, blob in heads.items():
        path = out / HEAD_FILES[role]
        path.write_bytes(blob)
        i, o = io.get(role, ("", ""))
        comps.append(Component(name=role, file=path.name, role=role, version=version,
                               licence=HEAD_LICENCE, sha256=sha256_file(path),
                               source=f"trained by edge-voice-agent for {name}",
                               input_name=i, output_name=o))
    stale = out / HEAD_FILES["rejector"]
    if "rejector" not in heads and stale.exists():
        stale.unlink()  # a rejector from an earlier export must not linger unlisted
    m = Manifest(name=name, version=version, classes=tuple(classes),
                 sample_rate=params.sample_rate, frontend=params, components=tuple(comps),
                 unknown_label=unknown_label, training=training)
    (out / MANIFEST).write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    (out / NOTICE_FILE).write_text(notice_text())
    ModelRunner(out)
    return m
