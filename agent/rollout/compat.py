"""Can this device run a model it is offered? Checked before a model is installed or used.

A model is refused, with the reason, when its classes (or its "unknown" class) differ from the
running model's — whatever consumes decisions expects the same labels — unless the operator
says the vocabulary changes on purpose (`allow_vocabulary_change`: the rollout's
`vocabulary_change`, `models activate --allow-vocabulary-change`), when its rate cannot be
segmented by the VAD, or when no calibration made for exactly this build comes with it (its
threshold and training baseline belong to one sha256; another model's would be wrong).
"""

from __future__ import annotations

from pathlib import Path

from agent.audio.vad import VAD_RATES
from agent.errors import AgentError
from agent.recognition.decision import Thresholds
from agent.recognition.model import Manifest
from agent.recognition.vocabulary import differs
from agent.resources import calibration_dir

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


def vocabulary_changes(m: Manifest, reference: Manifest | None) -> bool:
    """Whether `m`'s classes (or unknown class) differ from the running model's."""
    return reference is not None and (tuple(m.classes) != tuple(reference.classes)
                                      or m.unknown_label != reference.unknown_label)


def _words(ws: list[str], n: int = 3) -> str:
    return ",".join(ws[:n]) + (f",… ({len(ws)})" if len(ws) > n else "") if ws else "none"


def vocabulary_difference(m: Manifest, reference: Manifest) -> str:
    """"new …; gone …" (or what else differs: order, the unknown class), short: it goes into
    an event's 200-character reason with the fix."""
    new, gone = differs(m.classes, reference.classes)
    if new or gone:
        return f"new {_words(new)}; gone {_words(gone)}"
    if m.unknown_label != reference.unknown_label:
        return (f"its unknown class {m.unknown_label!r}, the running model's "
                f"{reference.unknown_label!r}")
    return "the same words in another order (each output means another word)"


def incompatibility(m: Manifest, model_dir: Path, reference: Manifest | None,
                    allow_vocabulary_change: bool = False) -> str | None:
    """Why `m` cannot replace `reference` on this device, or None when it can."""
    if reference is not None and not allow_vocabulary_change and \
            vocabulary_changes(m, reference):
        # the fix before the details: an event's reason is cut at 200 characters
        return (f"another vocabulary than {reference.ref}; if on purpose: "
                "--allow-vocabulary-change (fleet rollout start, models install/activate); "
                f"{vocabulary_difference(m, reference)}")
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


def check_compatible(m: Manifest, model_dir: Path, reference: Manifest | None,
                     allow_vocabulary_change: bool = False) -> None:
    why = incompatibility(m, model_dir, reference, allow_vocabulary_change)
    if why is not None:
        raise AgentError(f"model {m.ref} refused: {why}")
