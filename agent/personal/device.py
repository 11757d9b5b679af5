"""One device's personalisation of one model: adaptation and enrollment applied to every
decision, built from the state directory and the model's reference.

    head input x ─▶ x − shift (adaptation) ─▶ model ─▶ probabilities ─▶ rescored (enrollment)

`Personalizer.predict` is what the pipeline calls instead of `model.predict`; `observe` feeds
the adaptation afterwards (label-free) and saves it every `SAVE_EVERY` utterances and on close.
Telemetry sees `section()` only: whether the device is enrolled, whether adaptation is active
and how many utterances it has learned from — never the state itself.

A shadow candidate is scored with the same state through `scorer_for` when it shares the front
end and ships its own reference; otherwise there is no like-for-like comparison and the caller
compares both models without personalisation (agent.rollout.shadow).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from agent.audio.sources import stable_device_name
from agent.daemon.state_health import StateHealth
from agent.errors import AgentError, one_line
from agent.personal.adaptation import AdaptationParams, AdaptationState, Adapter
from agent.personal.enrollment import Enrollment, Rescorer, missing_classes
from agent.personal.reference import REFERENCE_FILE, Reference
from agent.personal.store import AdaptationKey, PersonalStore, frontend_id
from agent.recognition.model import ModelRunner
from agent.resources import calibration_dir

log = logging.getLogger("edge-voice-agent")

SAVE_EVERY = 20          # adaptation updates between saves (and one on close)
CALIBRATION = "calibration"
FILE_MICROPHONE = "file"  # a replayed file: adapts in memory from a fresh state, never saved


def reference_path(model_dir: Path, name: str) -> Path:
    """The model's own calibration/<REFERENCE_FILE>, else the bundled one for its name."""
    own = Path(model_dir) / CALIBRATION / REFERENCE_FILE
    if own.is_file():
        return own
    try:
        return calibration_dir(name) / REFERENCE_FILE
    except AgentError:
        return own


def reference_for(model: ModelRunner) -> tuple[Reference | None, str]:
    """(reference, "") for the model's build, or (None, why not)."""
    m = model.manifest
    path = reference_path(model.directory, m.name)
    if not path.is_file():
        return None, (f"no head-input reference for {m.ref} ({path}); run 'edge-voice-agent "
                      "calibrate --reference-only --data DIR'")
    try:
        r = Reference.load(path)
    except AgentError as e:
        return None, one_line(e)
    if r.sha256 != m.sha256 or r.dim != m.frontend.dim:
        return None, (f"head-input reference {path} was made for {r.model} (sha256 "
                      f"{r.sha256[:12]}…), not {m.ref}; recalibrate")
    return r, ""


def microphone_identity(description: str) -> str:
    """A live source's device name ("mic:NAME"); every file source is FILE_MICROPHONE."""
    prefix = "microphone '"
    if description.startswith(prefix):
        return "mic:" + stable_device_name(description[len(prefix):].rsplit("'", 1)[0])
    return FILE_MICROPHONE


def personal_scores(model: ModelRunner, rescorer: Rescorer | None, shift: np.ndarray | None,
                    x: np.ndarray) -> np.ndarray:
    """The model on the shifted head input, then the enrollment's rescoring (on the unshifted
    one: the shift moves the utterance and the enrolled examples alike)."""
    p = model.predict((x if shift is None else x - shift)[None, :])[0]
    return rescorer.rescore(p, x) if rescorer is not None else p


class Personalizer:
    def __init__(self, model: ModelRunner, reference: Reference | None, *,
                 adapter: Adapter | None, enrollment: Enrollment | None,
                 store: PersonalStore | None, key: AdaptationKey | None,
                 enrollment_weight: float, learn: bool = True) -> None:
        m = model.manifest
        self.manifest = m
        self.reference = reference
        self.adapter = adapter if reference is not None else None
        self.enrollment = enrollment if reference is not None else None
        self.weight = enrollment_weight
        self.rescorer = Rescorer(self.enrollment, reference, m.classes, m.unknown_label,
                                 enrollment_weight) if self.enrollment is not None else None
        self.store, self.key, self.learn = store, key, learn
        self._unknown = m.classes.index(m.unknown_label) if m.unknown_label in m.classes else -1
        self._shift: np.ndarray | None = None
        self._stale = True
        self._unsaved = False  # the last save was refused by the disk

    # --- what telemetry and rollouts may know -------------------------------------------
    @property
    def enrolled(self) -> bool:
        return self.rescorer is not None

    @property
    def adapting(self) -> bool:
        return self.adapter is not None and self.adapter.active

    @property
    def active(self) -> bool:
        """Does this change any decision right now?"""
        return self.enrolled or self.adapting

    def section(self) -> dict[str, Any]:
        a = self.adapter
        return {"personal": {"enrolled": self.enrolled,
                             "adaptation": {"active": self.adapting,
                                            "utterances": a.utterances if a else 0}}}

    def signature(self) -> str:
        """Which personalisation decisions were made with: plain, adapted, enrolled or both."""
        return "+".join(p for p, on in (("enrolled", self.enrolled),
                                        ("adapted", self.adapting)) if on) or "plain"

    # --- scoring ------------------------------------------------------------------------
    def shift(self) -> np.ndarray | None:
        if self.adapter is None or self.reference is None:
            return None
        if self._stale:
            self._shift = self.adapter.shift(self.reference.mean, self.reference.scale)
            self._stale = False
        return self._shift

    def predict(self, model: ModelRunner, x: np.ndarray) -> np.ndarray:
        """The personalised probabilities of one head input (dim,)."""
        return personal_scores(model, self.rescorer, self.shift(), x)

    def scorer_for(self, model: ModelRunner) -> Callable[[np.ndarray], np.ndarray] | None:
        """Score another model (a shadow candidate) with this device's state, or None when it
        cannot be done like for like (another front end, no reference for its build, or an
        enrollment that lacks some of its words: another vocabulary)."""
        if model is None or frontend_id(model.manifest) != frontend_id(self.manifest):
            return None
        ref, _ = reference_for(model)
        if ref is None:
            return None
        cm = model.manifest
        if self.enrollment is not None and missing_classes(
                self.enrollment.labels, [c for c in cm.classes if c != cm.unknown_label]):
            return None
        rescorer = Rescorer(self.enrollment, ref, cm.classes, cm.unknown_label, self.weight) \
            if self.enrollment is not None else None

        def score(x: np.ndarray) -> np.ndarray:
            shift = self.adapter.shift(ref.mean, ref.scale) if self.adapter is not None \
                else None
            return personal_scores(model, rescorer, shift, x)
        return score

    # --- learning -----------------------------------------------------------------------
    def observe(self, x: np.ndarray, probs: np.ndarray) -> None:
        """After a decision: the utterance teaches the adaptation, unless the model called it
        "unknown" (noise, talk, other words would pull the mean away from the speech it
        adapts for)."""
        a = self.adapter
        if a is None or not self.learn or int(np.argmax(probs)) == self._unknown:
            return
        a.observe(x)
        self._stale = True
        if a.updates >= SAVE_EVERY:
            self.save()

    def save(self) -> None:
        """Save the adaptation state; a refused write is counted (StateHealth) and tried again
        after the next SAVE_EVERY utterances or at the stop, never at every utterance."""
        a = self.adapter
        if a is None or not self.learn or self.store is None or self.key is None or \
                (a.updates == 0 and not self._unsaved):
            return
        self._unsaved = not self.store.save_adaptation(a.state, self.key)
        a.updates = 0

    def new_microphone(self, microphone: str) -> None:
        """The source came back as another device: what was learned was for the old one."""
        if self.key is None or self.adapter is None or microphone == self.key.microphone:
            return
        log.info("device adaptation starts afresh: another microphone (%s → %s)",
                 self.key.microphone, microphone)
        self.key = AdaptationKey(self.key.model, self.key.frontend, microphone)
        self.adapter = Adapter(self.adapter.params,
                               AdaptationState.fresh(self.manifest.frontend.dim))
        self._stale = True
        self.adapter.updates = 1  # the fresh state replaces the old file on disk
        self.save()

    def close(self) -> None:
        self.save()


def build_personalizer(*, model: ModelRunner, state_dir: Path, microphone: str,
                       adaptation: bool, params: AdaptationParams, enrollment: bool,
                       enrollment_weight: float, health: StateHealth | None = None,
                       learn: bool = True, persist: bool = True) -> Personalizer | None:
    """Load what the state directory holds for this model; None when nothing is switched on.
    Every reason something is not used is logged in one line.

    `learn`: utterances feed the adaptation (classify only reads); `persist`: what it learns
    is saved — a live microphone's, not a replayed file's, so a file replays exactly and a demo
    or test recording never becomes part of the device's state."""
    if not adaptation and not enrollment:
        return None
    m = model.manifest
    reference, why = reference_for(model)
    if reference is None:
        log.warning("device adaptation and enrollment are off: %s", why)
        return None
    store = PersonalStore(state_dir, health)
    fid = frontend_id(m)
    enrolled = store.load_enrollment() if enrollment else None
    if enrolled is not None:
        lacking = missing_classes(enrolled.labels, [c for c in m.classes
                                                    if c != m.unknown_label])
        if enrolled.frontend != fid:
            log.warning("enrollment in %s was made with another front end (model %s) and is "
                        "not used with %s; enroll again", store.enrollment_path, enrolled.model,
                        m.ref)
            enrolled = None
        elif lacking:
            log.warning("enrollment in %s lacks %s, a class of %s, and is not used; enroll "
                        "again", store.enrollment_path, ", ".join(lacking), m.ref)
            enrolled = None
    adapter = key = None
    note = "adaptation off"
    if adaptation:
        key = AdaptationKey(f"{m.ref} {m.sha256}", fid, microphone)
        state, note = store.load_adaptation(key, m.frontend.dim)
        adapter = Adapter(params, state)
        if learn and persist and note.startswith("adaptation starts afresh"):
            store.save_adaptation(state, key)  # the old model's or microphone's state is gone
    p = Personalizer(model, reference, adapter=adapter, enrollment=enrolled,
                     store=store if persist else None, key=key,
                     enrollment_weight=enrollment_weight, learn=learn)
    log.info("personalisation of %s: %s; %s", m.ref,
             f"enrolled ({len(enrolled.labels)} examples)" if enrolled is not None
             else "not enrolled", note)
    return p
