"""Labelled clips on disk: the FSDD layout `{digit}_{speaker}_{take}.wav`, and the Speech
Commands part `{digit}_{speaker}_{n}.wav` / `neg_{word}_{speaker}_{n}.wav` (real non-digit
words, label "neg:<word>")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.resample import Resampler, to_mono
from agent.errors import AgentError

# Accent metadata of the shared FSDD speakers (from the dataset's README), for slicing results.
DIGIT_LABELS = tuple(str(d) for d in range(10))
ACCENTS = {"jackson": "USA", "nicolas": "BEL/French", "theo": "USA", "yweweler": "DEU/German",
           "lucas": "DEU/German", "george": "GRC/Greek"}


@dataclass(frozen=True)
class Clip:
    path: Path
    label: str
    speaker: str
    take: int


def discover(data_dir: str | Path, speakers: set[str] | None = None) -> list[Clip]:
    """All clips named like the FSDD layout below `data_dir`, sorted for reproducibility."""
    root = Path(data_dir)
    if not root.is_dir():
        raise AgentError(f"data directory {root} does not exist; point --data at the FSDD "
                         "recordings folder")
    clips = []
    for p in sorted(root.glob("*.wav")):
        parts = p.stem.split("_")
        if len(parts) != 3 or not parts[2].isdigit():
            continue
        if speakers and parts[1] not in speakers:
            continue
        clips.append(Clip(p, parts[0], parts[1], int(parts[2])))
    if not clips:
        raise AgentError(f"no clips named like 7_speaker_12.wav in {root}; point --data at the "
                         "FSDD recordings folder")
    return clips


def is_negative(label: str) -> bool:
    return label.startswith("neg:")


def discover_speech_commands(data_dir: str | Path) -> list[Clip]:
    """Real digits and real non-digit words of many speakers; the speaker id is in the name."""
    root = Path(data_dir)
    clips_dir = root / "clips" if (root / "clips").is_dir() else root
    if not clips_dir.is_dir():
        raise AgentError(f"Speech Commands directory {root} does not exist; point "
                         "--speech-commands at the folder holding clips/")
    clips = []
    for p in sorted(clips_dir.glob("*.wav")):
        parts = p.stem.split("_")
        if len(parts) == 4 and parts[0] == "neg" and parts[3].isdigit():
            clips.append(Clip(p, "neg:" + parts[1], parts[2], int(parts[3])))
        elif len(parts) == 3 and parts[0] in DIGIT_LABELS and parts[2].isdigit():
            clips.append(Clip(p, parts[0], parts[1], int(parts[2])))
    if not clips:
        raise AgentError(f"no clips named like 7_sc0b57a6ed_0.wav or neg_yes_sc0b57a6ed_0.wav "
                         f"in {clips_dir}; point --speech-commands at the Speech Commands part")
    return clips


def load_audio(path: Path, rate: int) -> np.ndarray:
    """Mono float32 at `rate`, resampled with the same code the daemon uses."""
    import soundfile as sf

    from agent.audio.sources import check_audio_file

    check_audio_file(Path(path))
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AgentError(f"audio file {path} cannot be read ({e})") from None
    r = Resampler(int(sr), rate)
    mono = to_mono(x)
    return np.concatenate([r.process(mono), r.flush()]) if sr != rate else mono
