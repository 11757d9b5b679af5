"""A vocabulary as the integrator writes it: validation, what each word is called in the
recordings and how it is spoken, and its near-words (one sound away) from its text alone.

A word obeys agent.recognition.vocabulary's rule (a phrase is words with single spaces, `hey
jarvis`), and a digit is its own word as in the digit model: `3` and `three` both mean the
recordings labelled 3 (the class keeps the name that was written). Pure functions except `phonemes`,
which asks espeak-ng.
"""

from __future__ import annotations

import re
import subprocess
import zlib

import numpy as np

from agent.errors import ConfigError
from agent.recognition.vocabulary import UNKNOWN, parse_words
from agent.training.synth import DIGIT_WORDS


def parse_vocabulary(text: str) -> tuple[str, ...]:
    """`yes,no,turn on` → ("yes", "no", "turn on"); a bad list raises ONE ConfigError line.
    agent.recognition.vocabulary.parse_words applies the rule every manifest is read with;
    here upper case is lowered and a digit and its name (`3`, `three`) are one word."""
    words = [w.strip().lower() for w in text.split(",")]
    if not text.strip() or any(not w for w in words):
        raise ConfigError(f"--vocabulary {text!r}: an empty word; give words separated by "
                          "commas, e.g. --vocabulary yes,no,stop")
    if UNKNOWN in words:
        raise ConfigError(f"--vocabulary: {UNKNOWN!r} is the model's own class for everything "
                          "else; remove it from the list")
    seen: dict[str, str] = {}
    for w in words:
        key = recording_label(w)
        if key in seen:
            raise ConfigError(f"--vocabulary: {w!r} repeats {seen[key]!r}; list every word once")
        seen[key] = w
    try:
        return tuple(parse_words(",".join(words)))
    except ValueError as e:
        raise ConfigError(f"--vocabulary: {e} (a phrase is words with single spaces, e.g. "
                          "--vocabulary 'turn on,lights')") from None


def recording_label(word: str) -> str:
    """The label recordings of `word` carry in their file names: a digit's number."""
    return str(DIGIT_WORDS.index(word)) if word in DIGIT_WORDS else word


def spoken(word: str) -> str:
    """The text a synthetic voice reads: "3" → "three", "12" → "one two", a phrase as written."""
    if word.isdigit():
        return " ".join(DIGIT_WORDS[int(c)] for c in word)
    return word


# --- near-words from the text -----------------------------------------------------------------
# espeak-ng's English phoneme mnemonics (`espeak-ng -q -x`), longest first when tokenising.
CONSONANTS = ["tS", "dZ", "t2", "d2", "p", "b", "t", "d", "k", "g", "f", "v", "T", "D", "s",
              "z", "S", "Z", "h", "m", "n", "N", "l", "r", "j", "w"]
# Vowels by coarse place: a substitution goes to another place, never to a vowel an accent
# would say for the same word ("off" with 0 or O: is still "off").
VOWEL_PLACES = {
    "front-high": ["i:", "i@", "I2", "i", "I"],
    "front-mid": ["eI", "e@", "E", "e"],
    "front-low": ["a#", "a"],
    "back-low": ["A@", "A:", "O2", "O:", "O@", "A", "O", "0", "V"],
    "back-high": ["U@", "u:", "u", "U"],
    "rising": ["aI", "aU", "oU", "OI"],
    "central": ["3:", "@L", "@2", "3", "@"],
}
VOWELS = [v for vs in VOWEL_PLACES.values() for v in vs]
_PLACE = {v: p for p, vs in VOWEL_PLACES.items() for v in vs}
_TOKEN = re.compile("|".join(re.escape(t) for t in sorted(CONSONANTS + VOWELS, key=len,
                                                            reverse=True)) + "|.", re.S)
# Consonants substituted in and put in front of a vowel-initial word (common, clearly distinct).
SUBSTITUTES_C = ["p", "b", "t", "d", "k", "g", "f", "v", "s", "z", "S", "m", "n", "l", "r", "w",
                 "h", "dZ", "tS", "T"]
SUBSTITUTES_V = ["i:", "I", "eI", "E", "a", "A:", "0", "V", "u:", "aI", "aU", "oU", "3:"]


def phonemes(text: str, voice: str = "en-us") -> str:
    """espeak-ng's phoneme mnemonics for `text`, e.g. "happy" → "h'api"."""
    out = subprocess.run(["espeak-ng", "-q", "-x", "-v", voice, text], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return " ".join(out.split())


def tokens(ph: str) -> list[str]:
    return _TOKEN.findall(ph)


def near_variants(ph: str) -> list[str]:
    """Every phoneme string one sound away from `ph`: each consonant swapped for another, each
    vowel for one of another place, a consonant added before a leading vowel, an initial
    consonant of a cluster dropped. Deterministic order."""
    t = tokens(ph)
    out: list[str] = []
    for i, tok in enumerate(t):
        if tok in CONSONANTS:
            out += ["".join(t[:i] + [c] + t[i + 1:]) for c in SUBSTITUTES_C
                    if c != tok.rstrip("2")]
        elif tok in VOWELS:
            out += ["".join(t[:i] + [v] + t[i + 1:]) for v in SUBSTITUTES_V
                    if _PLACE[v] != _PLACE[tok]]
    sounds = [i for i, tok in enumerate(t) if tok in CONSONANTS or tok in VOWELS]
    if sounds and t[sounds[0]] in VOWELS:   # "up" → "pup", "cup"
        i = sounds[0]
        out += ["".join(t[:i] + [c] + t[i:]) for c in SUBSTITUTES_C]
    if len(sounds) > 1 and t[sounds[0]] in CONSONANTS and t[sounds[1]] in CONSONANTS:
        out.append("".join(t[:sounds[0]] + t[sounds[0] + 1:]))   # "stop" → "top"
    return list(dict.fromkeys(o for o in out if o != ph))


def near_words(vocabulary: tuple[str, ...], per_word: int, seed: int = 0
               ) -> dict[str, list[str]]:
    """word → up to `per_word` near-words as espeak-ng phoneme input (`[[...]]`), never the
    sound of any vocabulary word (not "off" as a near-word of "on" when both are words)."""
    own = {phonemes(spoken(w)).replace(" ", "") for w in vocabulary}
    out: dict[str, list[str]] = {}
    for w in vocabulary:
        cand = [v for v in near_variants(phonemes(spoken(w))) if v.replace(" ", "") not in own]
        rng = np.random.default_rng(seed + zlib.crc32(w.encode()))
        pick = rng.permutation(len(cand))[:per_word]
        out[w] = [f"[[{cand[i]}]]" for i in sorted(pick)]
    return out


def heldout_half(text: str) -> bool:
    """A stable half of the near-words is never trained on (they measure the open set)."""
    return zlib.crc32(text.encode()) % 2 == 0
