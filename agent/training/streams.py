"""Streams for false activations per hour: recordings laid end to end the way a device hears
them, cut by the daemon's own VAD segmenter, so every segment carries what the VAD knows
(length, force-cut, quiet before) and the addressing rule is judged exactly as it runs live.

Three kinds: real people talking (`talk`: read sentences, never addressed to a device; one stream
per speaker), real non-digit words (Speech Commands, one stream per speaker group) and made-up
music and household-like noise. A stream's length is its hours for the per-hour figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.audio.vad import Segmenter, Utterance
from agent.config import VadConfig
from agent.errors import AgentError
from agent.training.calibrate import lay_out

SR = 16000
TALK_GAP_S = (0.5, 2.0)   # pauses between the sentences of one speaker
WORD_GAP_S = (1.0, 3.0)   # pauses between words spoken near the device (make_stream's)


@dataclass(frozen=True)
class Segment:
    """One VAD segment of a stream: its audio and what the VAD knew about it."""

    audio: np.ndarray
    length_s: float
    forced_cut: bool
    quiet_before_s: float | None
    speech_after: bool
    group: str            # speaker or speaker group (grouped folds)


def talk_files(root: Path) -> dict[str, list[Path]]:
    """`talk_{speaker}_{utterance}.flac` → files by speaker, sorted."""
    if not root.is_dir():
        raise AgentError(f"talk directory {root} does not exist; point --talk at the folder of "
                         "talk_{speaker}_{utterance}.flac recordings")
    out: dict[str, list[Path]] = {}
    for p in sorted(root.glob("talk_*.flac")):
        parts = p.stem.split("_")
        if len(parts) == 3:
            out.setdefault(parts[1], []).append(p)
    if not out:
        raise AgentError(f"no recordings named like talk_so0006_000060015.flac in {root}")
    return out


def segment(audio: np.ndarray, vad: VadConfig, rate: int = SR) -> list[Utterance]:
    """The daemon's segmenter over a whole stream (block size does not change the result)."""
    seg = Segmenter(vad, rate)
    out: list[Utterance] = []
    step = rate * 2
    for i in range(0, len(audio), step):
        out += seg.push(audio[i:i + step])[0]
    return out + seg.flush()


def stream_segments(clips: list[np.ndarray], group: str, vad: VadConfig, seed: int,
                    gap_s: tuple[float, float]) -> tuple[list[Segment], float]:
    """Lay `clips` out as one stream, segment it; (segments, stream seconds)."""
    audio = lay_out(clips, SR, seed, gap_s=gap_s)
    segs = [Segment(u.audio, u.length_s, u.forced_cut,
                    None if u.quiet_before is None else u.quiet_before / SR, u.speech_after,
                    group)
            for u in segment(audio, vad)]
    return segs, len(audio) / SR
