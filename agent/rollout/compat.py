"""Can this device run a model it is offered? Checked before a model is installed or used.

A model is refused, with the reason, when its classes (or its "unknown" class) differ from the
running model's — whatever consumes decisions expects the same labels —, when its rate cannot
be segmented by the VAD, or when no calibration made for exactly this build comes with it (its
threshold and training baseline belong to one sha256; another model's would be wrong).
"""

from __future__ import annotations

from pathlib import Path

from agent.decision import Thresholds
from agent.errors import AgentError
from agent.model import Manifest
from agent.resources import calibration_dir
from agent.vad import VAD_RATES

CALIBRATION = "calibration"


def thresholds_path(model_dir: Path, m: Manifest) -> Path:
    """The model's own calibration/thresholds.json, else the bundled one for its name."""
    own = Path(model_dir) / CALIBRATION / "thresholds.json"
    if own.is_file():
        return own
    try:
        return calibration_dir(m.name) / "thresholds.json"
    except AgentError:
        return own


def baseline_path(model_dir: Path) -> Path | None:
    own = Path(model_dir) / CALIBRATION / "baseline.json"
    return own if own.is_file() else None


def incompatibility(m: Manifest, model_dir: Path, reference: Manifest | None) -> str | None:
    """Why `m` cannot replace `reference` on this device, or None when it can."""
    if reference is not None:
        if tuple(m.classes) != tuple(reference.classes):
            return (f"its classes {','.join(m.classes)} differ from the running model's "
                    f"{','.join(reference.classes)}")
        if m.unknown_label != reference.unknown_label:
            return (f"its unknown class {m.unknown_label!r} differs from the running model's "
                    f"{reference.unknown_label!r}")
    if m.sample_rate not in VAD_RATES:
        return (f"its rate {m.sample_rate} Hz is not one the VAD can segment "
                f"({', '.join(map(str, VAD_RATES))})")
    path = thresholds_path(model_dir, m)
    try:
        t = Thresholds.read(path)
    except AgentError:
        return (f"it has no calibration (thresholds.json) for this build; ship it in "
                f"{CALIBRATION}/ inside the model directory")
    if t.sha256 != m.sha256:
        return (f"its calibration {path} was made for another build (sha256 {t.sha256[:12]}…, "
                f"model {m.sha256[:12]}…); ship the matching {CALIBRATION}/ with it")
    return None


def check_compatible(m: Manifest, model_dir: Path, reference: Manifest | None) -> None:
    why = incompatibility(m, model_dir, reference)
    if why is not None:
        raise AgentError(f"model {m.ref} refused: {why}")
