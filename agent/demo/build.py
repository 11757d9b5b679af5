"""Rebuild the bundled demo recording: digits spoken by espeak-ng voices, with pauses.

    python -m agent.demo.build            # needs the espeak-ng program (apt install espeak-ng)

Synthetic voices keep the demo free of anyone's recorded speech. The output is 8 kHz mono
FLAC plus a truth file in the format of the shared stream tools, so the demo can be scored.
"""

from __future__ import annotations

import json
import random
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.audio.resample import Resampler

RATE = 8000
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOICES = ["en-us", "en", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-scotland"]


def speak(text: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "w.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w",
                        str(wav), text], check=True)
        x, sr = sf.read(str(wav), dtype="float32")
    r = Resampler(sr, RATE)
    y = np.concatenate([r.process(x), r.flush()])
    keep = np.flatnonzero(np.abs(y) > 0.01)
    return y[keep[0]:keep[-1] + 1] if len(keep) else y


def build(out_dir: Path, count: int = 14, seed: int = 7) -> None:
    rnd = random.Random(seed)
    rng = np.random.default_rng(seed)
    digits = [str(i % 10) for i in range(count)]
    rnd.shuffle(digits)
    pieces, truth, t = [np.zeros(int(1.0 * RATE), np.float32)], [], 1.0
    for i, d in enumerate(digits):
        clip = speak(WORDS[int(d)], VOICES[i % len(VOICES)], rnd.randint(130, 180),
                     rnd.randint(30, 70)) * 10 ** (rnd.uniform(-8, 0) / 20)
        truth.append({"start": round(t, 3), "end": round(t + len(clip) / RATE, 3), "digit": d})
        gap = rnd.uniform(0.8, 1.4)
        pieces += [clip, np.zeros(int(gap * RATE), np.float32)]
        t += len(clip) / RATE + gap
    x = np.concatenate(pieces)
    x += rng.standard_normal(len(x)).astype(np.float32) * 10 ** (-62 / 20)
    out_dir.mkdir(parents=True, exist_ok=True)
    sf.write(str(out_dir / "demo-digits.flac"), np.clip(x, -1, 1), RATE, subtype="PCM_16")
    (out_dir / "demo-digits.truth.json").write_text(json.dumps(
        {"rate": RATE, "seconds": round(len(x) / RATE, 3), "utterances": truth,
         "source": "espeak-ng voices " + ", ".join(VOICES)}, indent=1) + "\n")


if __name__ == "__main__":
    build(Path(__file__).resolve().parent)
