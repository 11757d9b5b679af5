"""Test models for rollouts, derived from the shipped default model whatever its version.

`derive(dst, version=..., behaviour=...)` copies the bundled model directory and its calibration
into `dst` (calibration/ inside, as a delivered model carries it), gives it a new version and,
for `behaviour="abstain"`, rewrites the graph that produces the probabilities so it outputs a
uniform distribution (it then abstains on everything). Every file's sha256 is rewritten in the
manifest and the calibration by replacing the old digest with the new one wherever it appears,
so this works for a one-file manifest and for one that lists several components.

`classes=("yes", "no", ...)` relabels the model: a vocabulary of words instead of digits
without training (the head's outputs map one to one, in manifest order). The head graph gets
the vocabulary in its metadata, so the build has its own sha256, and the calibration (per-class
thresholds, head-input reference) is renamed and re-digested with it. A test model with a
non-digit vocabulary in about a second.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from agent.recognition.model import MANIFEST, Manifest, sha256_file
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


def _head(model_dir: Path, m: Manifest) -> tuple[Path, str]:
    """(graph file, output name) that gives the class probabilities, for a one-file manifest
    (`output_name`) or one listing components (the `head` component)."""
    import onnx

    head = m.component("head") if hasattr(m, "component") else None
    if head is not None:
        path = model_dir / head.file
        outs = [o.name for o in onnx.load(str(path)).graph.output]
        name = head.output_name or ("probabilities" if "probabilities" in outs else outs[-1])
        return path, name
    output = m.output_name
    for p in sorted(model_dir.glob("*.onnx")):
        if output in [o.name for o in onnx.load(str(p), load_external_data=False).graph.output]:
            return p, output
    raise AssertionError(f"no graph in {model_dir} outputs {output!r}")


def _relabel_head(model_dir: Path, m: Manifest, classes: tuple[str, ...]) -> None:
    """Stamp the vocabulary into the head graph's metadata: a new file, hence a new build."""
    import onnx

    path, _ = _head(model_dir, m)
    g = onnx.load(str(path))
    entry = g.metadata_props.add()
    entry.key, entry.value = "vocabulary", ",".join(classes)
    onnx.save(g, str(path))


def _relabel_reference(cal: Path, src_cal: Path, mapping: dict[str, str], name: str,
                       sha256: str) -> None:
    from dataclasses import replace

    from agent.personal.reference import REFERENCE_FILE, Reference

    if not (src_cal / REFERENCE_FILE).is_file():
        return
    r = Reference.load(src_cal / REFERENCE_FILE)
    replace(r, model=name, sha256=sha256,
            classes=tuple(mapping.get(c, c) for c in r.classes)).save(cal / REFERENCE_FILE)


def derive(dst: Path, *, version: str = "9.0.0-test", behaviour: str = "same",
           src: Path | None = None, threshold: float | None = None,
           classes: tuple[str, ...] | list[str] | None = None, name: str | None = None
           ) -> Path:
    """A complete, installable model directory at `dst`; returns `dst`. `threshold` replaces
    the calibrated threshold in calibration/thresholds.json (a build that accepts more or
    less than its calibration says it should). `classes` relabels the known classes (one word
    per digit, in order; `unknown` stays), `name` renames the model."""
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
        path, output = _head(dst, m)
        n_out = len(m.classes)
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shape = [o.shape for o in sess.get_outputs() if o.name == output][0]
        if isinstance(shape[-1], int):
            n_out = shape[-1]  # a head over the known classes only
        _uniform_output(path, output, n_out)
    elif behaviour != "same":
        raise ValueError(behaviour)
    mapping: dict[str, str] = {}
    if classes is not None:
        known = [c for c in m.classes if c != m.unknown_label]
        if len(classes) != len(known):
            raise ValueError(f"{len(classes)} words for {len(known)} classes")
        mapping = dict(zip(known, classes, strict=True))
        _relabel_head(dst, m, tuple(classes))
    text = (dst / MANIFEST).read_text()
    swaps = {}
    for fname, old in before.items():
        new = sha256_file(dst / fname)
        if new != old:
            swaps[old] = new
            text = text.replace(old, new)
    d = json.loads(text)
    d["version"] = version
    if name is not None:
        d["name"] = name
    if mapping:
        d["classes"] = [mapping.get(c, c) for c in d["classes"]]
    if "components" in d:  # the build digest over the components' hashes
        from agent.recognition.model import Component, build_digest

        d["sha256"] = build_digest([Component.from_dict(c) for c in d["components"]])
    (dst / MANIFEST).write_text(json.dumps(d, indent=2))
    swaps[m.sha256] = Manifest.read(dst / MANIFEST).sha256
    for p in cal.glob("*.json"):
        t = p.read_text()
        for old, new in swaps.items():
            t = t.replace(old, new)
        p.write_text(t)
    new = Manifest.read(dst / MANIFEST)
    if mapping:
        t = json.loads((cal / "thresholds.json").read_text())
        t["model"] = new.ref
        t["per_class"] = {mapping.get(k, k): v for k, v in (t.get("per_class") or {}).items()}
        (cal / "thresholds.json").write_text(json.dumps(t, indent=1))
        from agent.personal.reference import REFERENCE_FILE

        own = src / "calibration"
        _relabel_reference(cal, own if (own / REFERENCE_FILE).is_file()
                           else calibration_dir(m.name), mapping, new.ref, new.sha256)
    if threshold is not None:
        t = json.loads((cal / "thresholds.json").read_text())
        t["threshold"] = threshold
        t.pop("per_class", None)  # one threshold for every class, as the build asks
        (cal / "thresholds.json").write_text(json.dumps(t, indent=1))
    return dst
