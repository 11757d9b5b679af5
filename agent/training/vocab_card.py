"""MODEL_CARD.md of a vocabulary model: its words and where each one's examples came from
(real recordings, synthetic voices), the issue-18 figures on real speakers it never heard, the
thresholds and how they were chosen, and what the figures do not cover."""

from __future__ import annotations

from typing import Any

from agent.training.synth import HELDOUT_VOICES


def targets(report: dict[str, Any], seconds: float) -> list[tuple[str, str, str]]:
    """(figure, goal, measured) rows of issue 18's targets that this report can speak to."""
    real, th = report["real"], report["threshold"]
    rows = [("per-speaker accuracy (closed set, held-out real speakers)", "≥ 0.95 (commands)",
             _f(report["per_speaker_accuracy"]["mean"])),
            ("coverage of the words at the thresholds (held-out real speakers)",
             "≥ 0.85 commands / ≥ 0.80 few recordings", _f(real["coverage"])),
            ("coverage, each real group with words at thresholds chosen without it (mean)", "",
             _f(th["nested_mean_coverage"])),
            ("precision of accepted decisions on the words (held-out real speakers)",
             "≥ 0.99 commands / ≥ 0.98 few recordings", _f(real["precision"], 4)),
            ("precision of all accepted decisions, other speech included", "",
             _f(real["precision_all"], 4)),
            ("precision, worst real speaker group at thresholds chosen without it", "",
             _f(th["nested_worst_precision"], 4)),
            ("other real words and digits accepted as a word", "≤ 1 % (≤ 0.5 % text only)",
             _pct(real["other_accepted"])),
            ("other real speech accepted, worst real speaker group at thresholds chosen "
             "without it", "",
             _pct(th["nested_worst_other"]))]
    to = report.get("text_only_words")
    if to:
        rows += [(f"text-only words ({', '.join(report['text_only'])}): recall on their real "
                  "recordings", "≥ 0.90", _f(to["coverage"])),
                 ("text-only words: precision of accepted", "≥ 0.99", _f(to["precision"], 4))]
    rows.append(("held-out synthetic voices: words covered", "", _f(
        report["synthetic_voices"]["coverage"])))
    rows.append(("training time, 2 cores", "≤ 20 min (10 words, cached)",
                 f"{seconds / 60:.1f} min"))
    return rows


def _f(v: float | None, n: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{n}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def render(manifest: dict[str, Any], report: dict[str, Any], recipe: dict[str, Any],
           size: int, latency_ms: float, seconds: float, command: str) -> str:
    words = report["vocabulary"]
    out = [f"# Model card: {manifest['name']} {manifest['version']}", "",
           f"Classes: {', '.join(f'`{w}`' for w in words)} and `unknown` (everything else). "
           f"Trained by `edge-voice-agent train --vocabulary` "
           f"(agent/training/train_vocabulary.py){'' if not command else ' with'}:", ""]
    if command:
        out += ["```", command, "```", ""]
    out += [f"Data: {manifest['training']['data']}. Front end: the frozen speech embedding of "
            "the digit model (see NOTICE); head and rejector trained here. "
            f"{len(manifest['components'])} components, {size / 1e3:.0f} kB of trained graphs "
            f"with the front end, {latency_ms:.2f} ms per utterance (front end + head, one "
            "thread); trained in {:.1f} min on 2 cores.".format(seconds / 60), "",
            "## Targets (issue 18), out of fold on real speakers never trained on", "",
            "| figure | goal | measured |", "| --- | --- | --- |"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in targets(report, seconds)]
    out += ["", f"Method: {report['method']}. {report['speakers']} real speakers. Thresholds: "
            f"precision ≥ {report['threshold']['target_precision']} on the words and at most "
            f"{100 * report['threshold']['max_other_rate']:.1f} % of other speech acted on, "
            "in every held-out group (each real speaker group, the held-out synthetic voices), "
            f"and at most {100 * recipe['max_synthetic_other_rate']:.0f} % of the held-out "
            f"synthetic other words and sounds, {100 * recipe['max_near_word_rate']:.0f} % of "
            "the held-out near-words where real other speech is held out too (without it they "
            "count with the synthetic open set); \"thresholds chosen without it\" rows are each "
            "group scored at thresholds chosen on the others (what a new group of voices gets).",
            "", "## Per word", "",
            "| word | real recordings trained on | real held back (text only) | synthetic "
            "trained on | near-words | real clips scored | coverage | precision | held-out "
            "synthetic voices recall | threshold |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for w, v in report["per_word"].items():
        out.append(f"| `{w}`{' (text only)' if v['text_only'] else ''} | {v['real']} | "
                   f"{v['real_held_back']} | {v['synthetic']} | {v['near_words']} | "
                   f"{v['real_scored']} | {_f(v['coverage'])} | {_f(v['precision'], 4)} | "
                   f"{_f(v['heldout_voices_recall'])} | {v['threshold']:.3f} |")
    out += ["", "Synthetic: espeak-ng (8 English accents × its voice variants, speed and "
            "pitch), flite and festival voices, each clip also augmented (speed, room, "
            "microphone colour, gain, noise; the head learns from both, the rejector of words "
            "with few real clips from the clean ones only); voices never trained on: "
            f"{', '.join(HELDOUT_VOICES)}.", "", "## By source (real, held out)", "",
            "| source | word clips | coverage | precision | other clips | other accepted |",
            "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for s, v in report["by_source"].items():
        out.append(f"| {s} | {v['clips']} | {_f(v['coverage'])} | {_f(v['precision'], 4)} | "
                   f"{v['other']} | {_pct(v['other_accepted'])} |")
    oth = sorted(report["other_accepted_by_word"].items(), key=lambda kv: -(kv[1] or 0))
    out += ["", "Other real speech accepted as a word, worst first: " + ", ".join(
        f"{k} {_pct(v)}" for k, v in oth[:12]) + ".", ""]
    so = report["synthetic_open_set"]
    out.append(f"Held-out synthetic open set (words never trained on, near-words one sound "
               f"away, babble/music/noise/TV): {_pct(so['accepted'])} accepted (" + ", ".join(
                   f"{k} {_pct(v)}" for k, v in so["by_kind"].items()) + ").")
    fa = report.get("false_activations") or {}
    if fa:
        out += ["", "False activations per hour with the daemon's addressing rule: " + ", ".join(
            f"{k} {v['per_hour']:.2f} ({v['hours']:.2f} h)" for k, v in fa.items()) + "."]
    cal = report["calibration"]
    balanced = " (fitted as if words and other speech were equally frequent)" \
        if cal.get("platt_balanced") else ""
    out += ["", f"Calibration: temperature {cal['temperature']:.3f}, Platt "
            f"a={cal['platt'][0]:.3f} b={cal['platt'][1]:.3f}{balanced}; ECE on real held-out "
            f"clips {_f(cal['ece'], 4)}.", "", "## Limits", "",
            "- The real speakers are crowd-sourced Speech Commands and FSDD voices; a word's "
            "coverage on a new accent, a far microphone or a child can be lower.",
            "- A word learned from text alone is only as good as the synthetic voices' "
            "pronunciation of it; check its held-out synthetic recall and, where recordings "
            "exist, its real recall in the table above.",
            "- Words that sound alike (homophones) cannot be told apart by sound.",
            "", f"Recipe: `{recipe}`", ""]
    return "\n".join(out)
