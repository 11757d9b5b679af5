"""Deterministic synthetic speakers: spoken digits and non-digit words from apt TTS engines.

Five recorded speakers are far too few voices. espeak-ng (8 English accents x its voice
variants, random speed and pitch), flite (6 voices, random duration stretch and F0) and festival
(diphone and HTS voices) add thousands of others. Every clip is converted to 16 kHz mono (full
band: the front end band-limits it like every other input), trimmed tightly and cached in one
.npz per set: the same seed always gives the same list of (engine, voice, parameters, word)
jobs, so the audio is reproducible for the same engine versions. A few voices are never used
for training (HELDOUT_VOICES): they measure accuracy on full-band voices the model never heard.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf

from agent.errors import AgentError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Open-set words: common words, device commands, and near misses of digits (rhymes, shared
# sounds) so the model learns where "not a digit" begins.
NEG_WORDS = """
hello yes no stop go left right up down on off play pause next back
hey okay cancel start open close light music call home help louder quiet
ten eleven twelve twenty thirty hundred thousand first second third
hero zebra ton tree free door floor fork fine hive dive sticks sticky
heaven seventy eighteen weight eighty mine line nice nineteen wonder
once tooth tune treat cat dog water coffee weather timer alarm house car
phone table window what where when why how maybe please thanks sorry
good bad red blue green fire fight sex driver sieve fifty often offer
""".split()
# Near misses of digits (shared sounds, not the same word): where "not a digit" begins.
NEAR_DIGIT_WORDS = """
forty fourteen fourth fort often sixteen sixty seventeen seventy nineteen ninety ninth eighth
eighteen eighty fifteen fifty fifth thirteen third twelve eleven ten zeros none tin sticks nice
heaven weight
""".split()
# Rhymes of each digit (one sound away): the rejector must learn that the onset matters.
RHYMES = """
hero nero cereal query bun fun gun run sun done nun son want do shoe who new blue moo zoo
chew true glue flee thee tea sea agree key more core poor pour store war bore shore jive live
alive wife knife fix mix picks kicks wicks tricks socks sax kevin levin several late gate wait
bait hate date great rate plate wine sign dine pine lime mind
""".split()
# More everyday vocabulary a device hears.
EVERYDAY = """
apple banana table chair garden morning evening yellow purple orange monday tuesday friday
summer winter kitchen bedroom office doctor teacher pencil paper volume channel radio movie
picture camera battery speaker temperature heater curtain garage lock unlock repeat again
goodbye welcome never always because before after under over between about nothing something
""".split()
NEG_WORDS = sorted(set(NEG_WORDS) | set(NEAR_DIGIT_WORDS) | set(RHYMES) | set(EVERYDAY))

# Words that sound exactly like a digit ("for"/"four", "too"/"two", "ate"/"eight", "won"/"one",
# German "nein"/"nine"): no acoustic model can reject them, so they are never training
# negatives; their acceptance rate is reported on its own.
HOMOPHONES = ["for", "too", "to", "ate", "won", "nein"]

# Running speech for TV-like negatives.
SENTENCES = [
    "the weather today is sunny with a light breeze", "please turn the lights off in the kitchen",
    "and now the news at six o clock", "thank you very much for calling",
    "we will be right back after this short break", "the market closed higher on friday",
    "can you hear me now", "this is a test of the broadcast system",
    "let us go to the park this afternoon", "she sells sea shells by the sea shore",
    "good evening and welcome to the show", "the train to london leaves from the main platform"]

# Synthetic voices kept out of every training set (engine:voice).
HELDOUT_VOICES = ("flite:slt", "flite:rms", "festival:voice_cmu_us_slt_arctic_hts",
                  "espeak:en-gb-scotland")

ESPEAK_LANGS = ["en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-us-nyc",
                "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt", "awb_time"]
FESTIVAL_VOICES = ["voice_kal_diphone", "voice_ked_diphone", "voice_cmu_us_slt_arctic_hts"]
NOT_SPEECHLIKE = {"whisper", "whisperf", "croak", "Demonic", "UniRobot", "anikaRobot",
                  "edward2", "Mr serious", "kaukovalta"}
SR = 16000


def espeak_variants() -> list[str]:
    """espeak-ng's voice variants (m1..m8, f1..f5, klatt, ...) from its data folder, minus
    effects that are not speech-like."""
    try:
        out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        names = os.listdir(Path(out.split("Data at:")[1].strip()) / "voices" / "!v")
    except (OSError, IndexError, subprocess.SubprocessError):
        names = [f"m{i}" for i in range(1, 9)] + [f"f{i}" for i in range(1, 6)]
    return sorted(n for n in names if n not in NOT_SPEECHLIKE and " " not in n)


def require_engines() -> None:
    missing = [e for e in ("espeak-ng", "flite", "text2wave", "sox") if shutil.which(e) is None]
    if missing:
        raise AgentError(f"speech synthesis needs {', '.join(missing)}; install with: apt-get "
                         "install espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k "
                         "festvox-us-slt-hts sox")


def trim(x: np.ndarray, db: float = -40.0, margin: int = 160) -> np.ndarray:
    """Tight trim at `db` below the loudest 10 ms frame (like the FSDD recordings)."""
    if len(x) < 320:
        return x
    hop = 160
    n = len(x) // hop
    e = (x[: n * hop].reshape(n, hop) ** 2).mean(1) + 1e-12
    idx = np.flatnonzero(10 * np.log10(e / e.max()) > db)
    if len(idx) == 0:
        return x
    return x[max(0, idx[0] * hop - margin):min(len(x), (idx[-1] + 1) * hop + margin)]


def run_job(job: tuple) -> np.ndarray | None:
    engine, voice, a, b, text = job
    with tempfile.TemporaryDirectory() as td:
        raw, out = os.path.join(td, "raw.wav"), os.path.join(td, "out.wav")
        try:
            if engine == "espeak":
                cmd = ["espeak-ng", "-v", voice, "-s", str(a), "-p", str(b), "-w", raw, text]
            elif engine == "flite":
                cmd = ["flite", "-voice", voice, "-t", text, "-o", raw, "--setf",
                       f"duration_stretch={a:.3f}", "--setf", f"int_f0_target_mean={b:.1f}"]
            else:
                txt = os.path.join(td, "t.txt")
                Path(txt).write_text(text + "\n")
                cmd = ["text2wave", "-eval", f"({voice})", "-eval",
                       f"(Parameter.set 'Duration_Stretch {a:.3f})", txt, "-o", raw]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            # sox without dither (-D): the engines write 16-48 kHz; deterministic 16 kHz out
            subprocess.run(["sox", "-D", raw, "-r", str(SR), "-c", "1", "-b", "16", "-e",
                            "signed-integer", out], check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)
            x, _ = sf.read(out, dtype="float32")
        except (OSError, subprocess.SubprocessError, RuntimeError):
            return None  # a voice missing on this machine: the job is skipped, and counted
    y = trim(x)
    if len(y) < 800 or not np.isfinite(y).all():
        return None
    return y.astype(np.float32)


def make_jobs(words: list[str], n_espeak: int, n_flite: int, n_festival: int,
              seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    variants = [""] + espeak_variants()
    jobs: list[tuple] = []
    for i in range(n_espeak):
        lang = ESPEAK_LANGS[rng.integers(len(ESPEAK_LANGS))]
        var = variants[rng.integers(len(variants))]
        jobs.append(("espeak", lang + ("+" + var if var else ""), int(rng.integers(110, 211)),
                     int(rng.integers(15, 86)), words[i % len(words)]))
    for i in range(n_flite):
        jobs.append(("flite", FLITE_VOICES[rng.integers(len(FLITE_VOICES))],
                     float(rng.uniform(0.75, 1.5)), float(rng.uniform(80, 230)),
                     words[i % len(words)]))
    for i in range(n_festival):
        jobs.append(("festival", FESTIVAL_VOICES[rng.integers(len(FESTIVAL_VOICES))],
                     float(rng.uniform(0.8, 1.5)), 0, words[i % len(words)]))
    return jobs


def voice_id(job: tuple) -> str:
    """engine:voice without the espeak variant, e.g. "espeak:en-us" or "flite:slt"."""
    return f"{job[0]}:{str(job[1]).split('+')[0]}"


@dataclass
class SynthSet:
    audio: list[np.ndarray]
    label: np.ndarray   # index into the word list
    voice: np.ndarray   # voice_id of each clip

    def split(self, heldout: bool) -> SynthSet:
        m = np.isin(self.voice, HELDOUT_VOICES) == heldout
        return SynthSet([a for a, k in zip(self.audio, m, strict=True) if k], self.label[m],
                        self.voice[m])


def synthesize(cache: Path, kind: str, words: list[str], n_espeak: int, n_flite: int,
               n_festival: int, seed: int, workers: int = 2, log=print) -> SynthSet:
    """Clips, word indices and voices for the job list; cached by the jobs' digest."""
    jobs = make_jobs(words, n_espeak, n_flite, n_festival, seed)
    digest = hashlib.sha256(repr((SR, jobs)).encode()).hexdigest()[:12]
    path = cache / f"synth-{kind}-{digest}.npz"
    if path.is_file():
        d = np.load(path, allow_pickle=True)
        return SynthSet(list(d["audio"]), d["label"], d["voice"])
    require_engines()
    log(f"synth: {len(jobs)} {kind} clips with espeak-ng, flite and festival ({workers} "
        "workers)")
    # forkserver, not fork: a caller with threads (the test process, a service) would fork
    # children holding other threads' locks, which then never finish (seen in CI)
    with get_context("forkserver").Pool(workers) as p:
        res = p.map(run_job, jobs, chunksize=16)
    keep = [i for i, r in enumerate(res) if r is not None]
    if len(keep) < 0.9 * len(jobs):
        raise AgentError(f"speech synthesis failed for {len(jobs) - len(keep)} of {len(jobs)} "
                         "clips; check the espeak-ng, flite and festival voices are installed")
    audio = np.empty(len(keep), dtype=object)
    for j, i in enumerate(keep):
        audio[j] = res[i]
    label = np.array([words.index(jobs[i][4]) for i in keep])
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    voice = np.array([voice_id(jobs[i]) for i in keep])
    np.savez(tmp, audio=audio, label=label, voice=voice,
             meta=np.array(["|".join(map(str, jobs[i][:4])) for i in keep]))
    tmp.replace(path)
    return SynthSet(list(audio), label, voice)
