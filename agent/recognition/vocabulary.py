"""What a vocabulary word may be: one rule for training, the manifest, payloads and the fleet.

A model's classes are its vocabulary: words plus its `unknown` class. A class name travels
further than anything else the model has: into the decisions file, the `[actions]` table, the
stats payload's `outputs.classes` (docs/stats.schema.json, agent.fleet.schema), the fleet's
views, review-sample and enrollment file names (`{word}_{speaker}_{take}.wav`). So a word
is 1 to 24 characters of lower-case ASCII letters and digits, with single inner spaces, hyphens
or dots ("lights", "turn on", "wi-fi", "7"): no `_` (it separates the parts of a file name), no
upper case (the same word twice, spelled differently), no other characters (a topic, a shell
or a file system would read them). Checked when a vocabulary is given to training and whenever
a manifest is read, with one line naming the word and the rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# A stats payload with every bin of every metric filled is ~7.4 KB; 24 words of 24 characters
# plus unknown keep it within its 8 KB (8,021 bytes, tests/test_vocabulary.py). The fleet's
# contract (agent.fleet.schema: 64 classes of 32 characters) is looser, never stricter.
MAX_WORD = 24
MAX_WORDS = 24
MAX_CLASSES = MAX_WORDS + 1   # the words plus unknown
UNKNOWN = "unknown"           # the open-set class training gives every model
# always .fullmatch (`$` also matches before a trailing newline)
WORD = re.compile(r"[a-z0-9](?:[a-z0-9.-]| [a-z0-9.-])*")
RULE = (f"1-{MAX_WORD} characters of a-z 0-9, single inner spaces, '-' or '.', starting with "
        "a letter or digit")


def word_problem(word: object) -> str | None:
    """Why `word` cannot be a class name, or None when it can."""
    if not isinstance(word, str):
        return f"{word!r} is not a string"
    if not word or len(word) > MAX_WORD or not WORD.fullmatch(word):
        return f"{word!r} is not a vocabulary word ({RULE})"
    return None


def vocabulary_problem(classes: Iterable[object], unknown_label: object = None) -> str | None:
    """Why `classes` (with `unknown_label` among them, when given) cannot be a model's
    vocabulary, or None. Every class — the unknown one too — obeys the word rule."""
    cs = list(classes)
    if not cs:
        return "it has no classes"
    if len(cs) > MAX_CLASSES:
        return (f"it has {len(cs)} classes, at most {MAX_CLASSES} ({MAX_WORDS} words plus "
                "unknown) fit a stats payload")
    for c in cs:
        why = word_problem(c)
        if why:
            return f"class {why}"
    twice = sorted({c for c in cs if cs.count(c) > 1})
    if twice:
        return f"class {twice[0]!r} is listed twice"
    if unknown_label is not None and unknown_label not in cs:
        return f"its unknown class {unknown_label!r} is not one of its classes"
    return None


def parse_words(text: str) -> list[str]:
    """`--vocabulary yes,no,turn on` → ["yes", "no", "turn on"] (spaces around commas
    dropped); ValueError names the first word that breaks the rule (`unknown` is the
    open-set class every model has, never a word of its vocabulary)."""
    words = [w.strip() for w in text.split(",")]
    if len(words) > MAX_WORDS:
        raise ValueError(f"{len(words)} words, at most {MAX_WORDS} fit a stats payload")
    for w in words:
        why = word_problem(w) or (f"{w!r} is the open-set class, not a word"
                                  if w == UNKNOWN else None)
        if why:
            raise ValueError(why)
    twice = sorted({w for w in words if words.count(w) > 1})
    if twice:
        raise ValueError(f"{twice[0]!r} is listed twice")
    return words


def differs(a: Iterable[str], b: Iterable[str]) -> tuple[list[str], list[str]]:
    """(words only in `a`, words only in `b`), each in its own order."""
    la, lb = list(a), list(b)
    return [w for w in la if w not in lb], [w for w in lb if w not in la]
