"""Test models for rollouts, derived from the shipped default model whatever its version.

`derive(dst, version=..., behaviour=...)` copies the bundled model directory and its calibration
into `dst` (calibration/ inside, as a delivered model carries it), gives it a new version and,
for `behaviour="abstain"`, rewrites the graph that produces the probabilities so it outputs a
uniform distribution (it then abstains on everything). Every file's sha256 is rewritten in the
manifest and the calibration by replacing the old digest with the new one wherever it appears,
so this works for a one-file manifest and for one that lists several components.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from agent.model import MANIFEST, Manifest, sha256_file
from agent.resources import calibration_dir, default_model_dir


def _uniform_output(onnx_path: Path, output: str, n_classes: int) -> None:
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(onnx_path))
    raw = f"{output}__raw"
    for node in m.graph.node:
        node.output[:] = [raw if o == output else o for o in node.output]
    zero = numpy_helper.from_array(np.zeros((), np.float32), f"{output}__zero")
    unif = numpy_helper.from_array(np.full((), 1.0 / n_classes, np.float32), f"{output}__unif")
    m.graph.initializer.extend([zero, unif])
    mul = f"{output}__mul"
    m.graph.node.extend([helper.make_node("Mul", [raw, zero.name], [mul]),
                         helper.make_node("Add", [mul, unif.name], [output])])
    onnx.save(m, str(onnx_path))


def _producer_of(model_dir: Path, output: str) -> Path:
    import onnx

    for p in sorted(model_dir.glob("*.onnx")):
        if output in [o.name for o in onnx.load(str(p), load_external_data=False).graph.output]:
            return p
    raise AssertionError(f"no graph in {model_dir} outputs {output!r}")


def derive(dst: Path, *, version: str = "9.0.0-test", behaviour: str = "same",
           src: Path | None = None) -> Path:
    """A complete, installable model directory at `dst`; returns `dst`."""
    src = src or default_model_dir()
    shutil.copytree(src, dst)
    m = Manifest.read(src / MANIFEST)
    cal = dst / "calibration"
    if not cal.exists():
        cal.mkdir()
        for f in ("thresholds.json", "baseline.json"):
            if (calibration_dir(m.name) / f).is_file():
                shutil.copy(calibration_dir(m.name) / f, cal / f)
    before = {p.name: sha256_file(p) for p in dst.iterdir() if p.is_file() and p.name != MANIFEST}
    if behaviour == "abstain":
        _uniform_output(_producer_of(dst, m.output_name), m.output_name, len(m.classes))
    elif behaviour != "same":
        raise ValueError(behaviour)
    d = json.loads((dst / MANIFEST).read_text())
    d["version"] = version
    text = json.dumps(d, indent=2)
    cal_files = [p for p in cal.glob("*.json")]
    cal_texts = {p: p.read_text() for p in cal_files}
    for name, old in before.items():
        new = sha256_file(dst / name)
        if new != old:
            text = text.replace(old, new)
            cal_texts = {p: t.replace(old, new) for p, t in cal_texts.items()}
    (dst / MANIFEST).write_text(text)
    for p, t in cal_texts.items():
        p.write_text(t)
    return dst
