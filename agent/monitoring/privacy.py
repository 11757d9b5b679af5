"""What may leave the device: k-threshold suppression of outputs and a payload privacy check.

The class distribution of a window is published only when the window holds at least `k`
decided utterances (default 20): with fewer, a count such as "one 7, one 3" can be read back as
what someone said (a PIN in a quiet minute). Everything else in a stats payload is an aggregate
over fixed bins with no labels, times or text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_K = 20

# Keys that would carry per-utterance results, content or raw signal. The stats payload uses
# `start_s`/`end_s` (window bounds) and `counts.utterances` (a count), never these.
FORBIDDEN_KEYS: frozenset[str] = frozenset({
    "label", "labels", "digit", "digits", "start", "end", "decided_at", "text", "transcript",
    "audio", "samples", "pcm", "wav", "waveform", "features", "probabilities", "utterance",
    "decision", "decisions", "file",
})
MAX_LIST_LEN = 64  # longer lists look like raw series (audio, per-utterance values)
MAX_STR_LEN = 200  # longer strings look like free text


def class_outputs(classes: Mapping[str, int], utterances: int, k: int = DEFAULT_K
                  ) -> dict[str, Any]:
    """`outputs` of a stats payload: the class counts, or None and suppressed=True below k.

    The anonymity set is the smaller of the window's utterances and the decisions the counts
    are made of, so neither a short window nor a mostly-undecided one can expose a few labels.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    n = min(int(utterances), sum(int(v) for v in classes.values()))
    if n < k:
        return {"classes": None, "suppressed": True}
    return {"classes": {str(c): int(v) for c, v in sorted(classes.items())}, "suppressed": False}


def find_violations(payload: Any, *, k: int | None = DEFAULT_K,
                    forbidden: frozenset[str] = FORBIDDEN_KEYS) -> list[str]:
    """Everything in `payload` that could reveal what was said; [] means it looks clean.

    Checks: forbidden keys anywhere (except class names under outputs.classes), lists longer
    than MAX_LIST_LEN, strings longer than MAX_STR_LEN, and -- when `k` is given and the payload
    has `outputs` -- classes published for a window with fewer than k utterances.
    """
    problems: list[str] = []

    def walk(x: Any, path: str, in_classes: bool) -> None:
        if isinstance(x, Mapping):
            for key, v in x.items():
                p = f"{path}.{key}" if path else str(key)
                if not in_classes and str(key).lower() in forbidden:
                    problems.append(f"{p}: forbidden key")
                walk(v, p, p == "outputs.classes")
        elif isinstance(x, list | tuple):
            if len(x) > MAX_LIST_LEN:
                problems.append(f"{path}: list of {len(x)} items (> {MAX_LIST_LEN})")
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]", False)
        elif isinstance(x, str) and len(x) > MAX_STR_LEN:
            problems.append(f"{path}: string of {len(x)} characters (> {MAX_STR_LEN})")

    walk(payload, "", False)
    out = payload.get("outputs") if isinstance(payload, Mapping) else None
    if k is not None and isinstance(out, Mapping):
        classes = out.get("classes")
        utt = payload.get("counts", {}).get("utterances", 0)
        if classes is not None:
            n = min(int(utt), sum(int(v) for v in classes.values()))
            if n < k:
                problems.append(f"outputs.classes: published for {n} utterances (< k={k})")
            if out.get("suppressed") is not False:
                problems.append("outputs.suppressed: must be false when classes are published")
        elif out.get("suppressed") is not True:
            problems.append("outputs.suppressed: must be true when classes are withheld")
    return problems


def assert_private(payload: Any, *, k: int | None = DEFAULT_K) -> None:
    """Raise ValueError listing every violation found by `find_violations`."""
    problems = find_violations(payload, k=k)
    if problems:
        raise ValueError("payload may reveal private data: " + "; ".join(problems))
