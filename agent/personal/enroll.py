"""`edge-voice-agent enroll`: the person teaches the device their voice.

From files named `{label}_{anything}.wav` (any format the agent reads), or from the microphone
with one prompt per class. The model's manifest says which labels exist (every class but its
"unknown" one); at least one recording of each is needed. Only head inputs are kept
(agent.personal.store: 0600, never published), never audio; `--forget` removes them.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from agent.audio.sources import AudioBlock
from agent.config import Config
from agent.errors import AgentError
from agent.personal.device import reference_for
from agent.personal.enrollment import Enrollment, label_of, missing_classes
from agent.personal.store import PersonalStore, frontend_id
from agent.recognition.decision import Policy
from agent.recognition.model import ModelRunner
from agent.recognition.pipeline import Outcome, Pipeline

PROMPT_TIMEOUT_S = 10.0  # audio seconds waited for each prompted word
MAX_PER_CLASS = 20       # the state stays small (about 4 KB per recording)


def known_classes(model: ModelRunner) -> list[str]:
    m = model.manifest
    return [c for c in m.classes if c != m.unknown_label]


def from_files(model: ModelRunner, files: Iterable[Path]) -> Enrollment:
    """Each file is one utterance of the label its name starts with."""
    from agent.training.dataset import load_audio  # the reader classify uses (no training deps)

    classes = known_classes(model)
    files = list(files)
    labels = [label_of(f, classes) for f in files]
    lacking = missing_classes(labels, classes)
    if lacking:
        raise AgentError(f"enrollment needs at least one recording of every class of "
                         f"{model.manifest.ref}; none for {', '.join(lacking)} (name them "
                         f"{lacking[0]}_1.wav, ...)")
    crowded = sorted({c for c in labels if labels.count(c) > MAX_PER_CLASS})
    if crowded:
        raise AgentError(f"enrollment takes at most {MAX_PER_CLASS} recordings per class; "
                         f"{', '.join(crowded)} has more: pick the best {MAX_PER_CLASS}")
    x = []
    for f in files:
        audio = load_audio(f, model.manifest.sample_rate)
        if len(audio) == 0:
            raise AgentError(f"enrollment recording {f} is empty; record it again")
        x.append(model.features(audio))
    return Enrollment(np.stack(x).astype(np.float32), tuple(labels),
                      frontend_id(model.manifest), model.manifest.ref)


class _Catch:
    """Pipeline observer keeping the released utterances' head inputs."""

    def __init__(self) -> None:
        self.got: list[Outcome] = []

    def on_block(self, *args: object) -> None:
        pass

    def on_outcome(self, o: Outcome) -> None:
        if o.features is not None and not o.utterance.forced_cut:
            self.got.append(o)


def from_blocks(model: ModelRunner, cfg: Config, blocks: Iterator[AudioBlock],
                say: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
                ) -> Enrollment:
    """Prompt for each class in turn and take the next utterance the VAD releases (the
    daemon's own segmentation and front end)."""
    m = model.manifest
    pipeline = Pipeline(cfg.vad, model, Policy("shadow", 1.0, m.unknown_label))
    catch = _Catch()
    pipeline.observers.append(catch)
    x, labels = [], []
    for label in known_classes(model):
        say(f'say "{label}" (then wait)')
        catch.got.clear()
        start = pipeline.clock_s
        while not catch.got:
            block = next(blocks, None)
            if block is None:
                pipeline.finish()
                if catch.got:
                    break
                raise AgentError(f'the microphone ended before "{label}" was heard; run '
                                 "'edge-voice-agent enroll' again")
            pipeline.feed(block)
            if not catch.got and pipeline.clock_s - start > PROMPT_TIMEOUT_S:
                raise AgentError(f'nothing was heard for "{label}" within '
                                 f"{PROMPT_TIMEOUT_S:g} s; check the microphone "
                                 "('edge-voice-agent doctor') and run enroll again")
        o = catch.got[0]
        x.append(o.features)
        labels.append(label)
        say(f'  heard {o.utterance.end / pipeline.rate - o.utterance.start / pipeline.rate:.2f} s '
            f'for "{label}"')
    return Enrollment(np.stack(x).astype(np.float32), tuple(labels), frontend_id(m), m.ref)


def from_microphone(model: ModelRunner, cfg: Config) -> Enrollment:
    from agent.audio.sources import MicOpener

    a = cfg.audio
    source = a.source[4:] if a.source.startswith("mic:") else None
    stop = threading.Event()
    mic = MicOpener(source, a.mic_rate, a.mic_channels, a.block_ms, stop)()
    it = iter(mic)
    try:
        return from_blocks(model, cfg, it)
    finally:
        stop.set()
        close = getattr(it, "close", None)
        if close is not None:
            close()


def enroll(cfg: Config, files: list[Path], model: ModelRunner) -> str:
    """Enroll from files (or the microphone when there are none); the line to print."""
    e = from_files(model, files) if files else from_microphone(model, cfg)
    store = PersonalStore(cfg.state_path())
    try:
        path = store.save_enrollment(e)
    except OSError as err:
        raise AgentError(f"enrollment cannot be saved in {store.root} ({err.strerror}); fix the "
                         "state directory (--state-dir) and enroll again") from None
    _, why = reference_for(model)
    note = f"; NOT USED until the model has a head-input reference: {why}" if why else \
        "; 'run' and 'classify --state-dir' use it (a running agent after a reload)"
    return (f"enrolled {len(e.labels)} recordings of {len(set(e.labels))} classes for "
            f"{model.manifest.ref} in {path} (0600, never published){note}")


def forget(cfg: Config) -> str:
    gone = PersonalStore(cfg.state_path()).forget()
    if not gone:
        return f"nothing enrolled in {cfg.state_path()}"
    return f"removed {', '.join(str(p) for p in gone)}"
