"""Labelled clips on disk: the FSDD layout `{digit}_{speaker}_{take}.wav`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.resample import Resampler, to_mono
from agent.errors import AgentError

# Accent metadata of the shared FSDD speakers (from the dataset's README), for slicing results.
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
