"""MODEL_CARD.md from the evaluation report: what the model is, how it was made, how good it is
on voices it never heard, how far to trust its confidence, and where it fails."""

from __future__ import annotations

from typing import Any

from agent.training.synth import HELDOUT_VOICES, HOMOPHONES


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


# Model selection, measured with speaker-grouped folds on this machine (see the card).
SELECTION_NOTES = [
    "Measured on this machine with a scratch copy of the front end (same graphs and head "
    "input; cached embeddings), before the recipe was ported; speaker-grouped folds only.",
    "Head, FSDD only, LogisticRegression(C=0.01): LOSO 0.964 (worst speaker 0.890) — the "
    "issue's 0.97 / 0.91. + Speech Commands digits: 0.970 / 0.904. + synthetic digits: "
    "0.977 / 0.950, full-band held-out synthetic voices 0.976-0.985.",
    "MLP heads instead of LR (256 units alpha 0.01: 0.974 / 0.926; 128 units alpha 0.1: "
    "0.976 / 0.940): no better and ten times slower to train, so the head is linear.",
    "Without augmentation: white noise 10 dB 0.936, babble 10 dB 0.908; augmentation (speed, "
    "room, EQ, gain, white/pink/brown/babble noise) is in the shipped recipe for that reason.",
    "Rejector, judged by the share of real Speech Commands digits of held-out speakers that "
    "pass when 1 % of their real non-digit words pass (3 speaker groups): binary "
    "digit-vs-not MLP(128) 0.608; with weights balancing digits and words within each source "
    "0.634; binary LogisticRegression 0.346; MLP + augmented Speech Commands copies 0.627; "
    "**12-way MLP (ten digits, word, sound; p_in = the digits' share) 0.732**, shipped.",
    "Held-out synthetic words that are one sound from a digit (hero, sticks, free, eighth, "
    "heaven, dive, fight, nice) passed that rejector 45-90 % of the time: rhymes of every "
    "digit were then added to the training vocabulary (a third of all words stays held out).",
    "Homophones (for, too, to, ate, won, nein) are not negatives: the issue saw a real \"four\" "
    "go to `unknown` when such words were; they are reported on their own.",
]


STREAMS = {
    "talk": "real people talking (speechocean762 read sentences, 0.5-2 s between sentences)",
    "words": "real non-digit words (Speech Commands, 1-3 s apart)",
    "music": "made-up music (chords, notes, drums)",
    "noise": "made-up noise (steady, bursty, humming)",
}


# Model 3 (issue 16), measured out of fold on this machine with the Speech Commands and talk
# speaker groups (SC digits covered / non-digit words accepted / talk false activations per
# hour with the addressing rule, at one threshold across variants).
MODEL3_NOTES = [
    "Thresholds: model 2's single threshold for 0.99 precision on the pooled out-of-fold data "
    "(0.852 on model 3's data) left Speech Commands speaker groups at 0.93-0.96 precision over "
    "their digits and words: their non-digit words pass at high confidence. Chosen so that "
    "precision over digits and words reaches 0.99 in every group, the thresholds rose to "
    "0.995 (FSDD coverage 0.828, Speech Commands digits 0.584) and still let 0.7-1.0 % of an "
    "unseen group's words through (nested). Shipped instead: the digits' precision ≥ 0.99 and "
    "≤ 0.2 % of the words acted on in every group, the issue's own two figures (FSDD "
    "coverage 0.856, Speech Commands digits 0.617; nested: digits' precision ≥ 0.997 in every "
    "group, words 0.85-1.3 %). Allowing 0.5 % of the words in-sample gave coverage 0.880 but "
    "1.7 % of an unseen group's words. One threshold per class where a class is safe (6, 2) "
    "comes down, where it errs it stays up.",
    "Addressing, on the 60 talk speakers cut by the agent's VAD (1,980 segments in 1.65 h, 29 % "
    "force-cut), out of fold at the shipped thresholds: the model alone accepts 35 segments "
    "(21.3 per hour), most of them pieces of sentences right after a force-cut one (no quiet "
    "before); speech span ≤ 1.6 s, not force-cut and ≥ 0.5 s of quiet before leave 7 (4.3 per "
    "hour); ≥ 0.7 s leaves 3 (1.8 per hour), shipped (the calm demo's shortest pause is "
    "0.84 s; chosen on these same streams, so the talk figure is optimistic). Speech span "
    "1.2-2.0 s changed nothing there (real digits here last at most 1.14 s). The quiet-after "
    "hold (vad.quiet_after_ms = 350: a next segment within it marks running speech; measured "
    "with it on) removed none of the accepted talk segments at these thresholds but a "
    "quarter of the sentence pieces the rule lets through; it is off by default (every "
    "decision waits for it, and a 500 ms hold puts the end-of-utterance latency p95 over "
    "the 0.5 s the end-to-end test holds: 0.61 s).",
    "Real digits, the real words and the talk segments are all in the rejector's training; "
    "tried and not kept (Speech Commands digits covered at matched word acceptance, 3 speaker "
    "groups): one class per real non-digit word in the rejector (no better; more words "
    "accepted at high thresholds), four more augmented copies of every real Speech Commands "
    "digit (closed-set 0.938 → 0.945, coverage within noise), a larger rejector (256 units, "
    "40 epochs; see below).",
    "Time-shifted second windows that must agree were not tried: the head input is computed "
    "once per utterance in the model's predict path, which issue 16's device half changes.",
]


def render(manifest: dict[str, Any], report: dict[str, Any], recipe: dict[str, Any],
           size_bytes: int, latency_ms: float, train_seconds: float,
           targets: dict[str, Any]) -> str:
    c = report["conditions"]
    spk = report["speakers"]
    tr = manifest.get("training", {})
    counts = tr.get("counts", {})
    cal, th, neg = report["calibration"], report["threshold"], report["negatives"]
    fa = report.get("false_activations", {})
    fa_rule = fa.get("rule", {})
    sc = report.get("speech_commands")
    ho = report["heldout_voices"]
    lines = [
        f"# Model card: {manifest['name']} {manifest['version']}",
        "",
        "Recognises the spoken English digits zero to nine, and says `unknown` for anything "
        "else, from one utterance cut out by the agent's VAD (16 kHz mono; any input rate is "
        "resampled). Runs in ONNX Runtime on a CPU; calibrated probabilities come straight out "
        "of the graphs.",
        "",
        "## Components",
        "",
        "| component | what | provenance / licence |",
        "| --- | --- | --- |",
        "| `melspectrogram.onnx`, `embedding_model.onnx` (and `embedding_stream.onnx`, the "
        "same weights with a dynamic time axis, derived at training time) | frozen speech "
        "embedding: 16 kHz → mel → 96-d embedding every 80 ms | Google `speech_embedding` "
        "(Lin et al. 2020, "
        "\"Training keyword spotters with limited and synthesized speech data\"; Apache-2.0 on "
        "TF Hub), as distributed in the wheel `openwakeword==0.4.0` (whose metadata states "
        "CC BY-NC-SA 4.0 for its included pre-trained models; the question is open upstream). "
        "Taken unchanged by the training pipeline, sha256-verified; see `NOTICE` |",
        "| `head.onnx` | closed-set digit head, temperature inside | trained here |",
        "| `rejector.onnx` | digit-vs-not rejector, Platt scaling inside | trained here |",
        "",
        "The daemon multiplies them: P(digit k) = p_in · P_head(k), P(unknown) = 1 − p_in, and "
        "acts when the top digit's probability reaches the threshold.",
        "",
        "## Data",
        "",
        "* **Free Spoken Digit Dataset** (FSDD), Jakobovski et al., "
        "https://github.com/Jakobovski/free-spoken-digit-dataset, licensed **CC BY-SA 4.0** "
        "(https://creativecommons.org/licenses/by-sa/4.0/): "
        f"{len(spk)} speakers ({', '.join(spk)}), 8 kHz, "
        f"{counts.get('fsdd_recordings', '?')} recordings. All male; accents USA, Belgian "
        "French, German. Not redistributed here.",
        "* **Speech Commands** (P. Warden, \"Speech Commands: A Dataset for Limited-Vocabulary "
        "Speech Recognition\", 2018), licensed **CC BY 4.0** "
        "(https://creativecommons.org/licenses/by/4.0/): "
        f"{counts.get('speech_commands_digits', 0)} real digits and "
        f"{counts.get('speech_commands_words', 0)} real non-digit words (yes, no, up, down, "
        f"left, right, on, off, stop, go, tree, …) from "
        f"{counts.get('speech_commands_speakers', 0)} speakers, 16 kHz, crowd-sourced "
        "microphones. Not redistributed here.",
        "* **speechocean762** (Speechocean and Xiaomi, 2021; CC BY 4.0 on OpenSLR, Apache-2.0 "
        "on its model hub card): real read English sentences by "
        f"{counts.get('talk_speakers', 0)} non-native speakers (Mandarin first language; "
        f"children and adults), sentences with a digit word removed; laid out as "
        f"{counts.get('talk_hours', 0)} h of people talking, never addressed to a device, cut "
        f"by the agent's own VAD into {counts.get('talk_segments', 0)} segments: negatives for "
        "the rejector (speakers held out by group) and the false activations per hour of talk. "
        "Not redistributed here.",
        "* **CMU AN4** (Carnegie Mellon University, 1991; BSD-style licence) is in the shared "
        "data but not used by this model: its digits are strings spoken without pauses, and "
        "cutting them out by alignment was not cheap enough here (see Known limits).",
        f"* **Synthetic voices** made on the training machine (espeak-ng accents × variants, "
        f"flite, festival; random speed and pitch): {counts.get('synthetic_digits', '?')} "
        f"digits, {counts.get('synthetic_words', '?')} non-digit words (commands, common "
        "words, near-digit words such as forty, fourteen, often, seventy), running sentences "
        f"for TV-like sound. Voices {', '.join(HELDOUT_VOICES)} are never trained on "
        f"({counts.get('heldout_voice_digits', '?')} digits): they measure full-band voices "
        "the model never heard.",
        f"* **Non-speech** made here ({counts.get('sounds', '?')}): babble of 3-6 synthetic "
        "voices, music-like chords/notes/drums, steady/bursty/humming noise, TV-like speech "
        "over a music bed.",
        "",
        "## Method",
        "",
        "Front end (`agent/recognition/frontend.py`, the same code in training, evaluation and "
        "the daemon): "
        "band-limit to the 4 kHz telephone band FSDD has, a 1.5 s window centred on the "
        "utterance and padded with background noise, the two embedding graphs → 9 frames × 96; "
        "head input = the 9 frames flattened + their mean + their max (1,056 values).",
        f"Augmentation ({recipe['aug_copies']} augmented copy per real clip, "
        f"{recipe['synth_aug_copies']} per synthetic clip and sound): speed 0.85-1.15, "
        "room reverberation (40 %), microphone EQ (40 %), gain -20..+6 dB, noise at 3-30 dB SNR "
        "(80 %: white, pink, brown or babble).",
        f"Head: StandardScaler → LogisticRegression (C={recipe['head_c']}) on digits only "
        "(FSDD, Speech Commands digits, synthetic digits) → temperature softmax. Rejector: "
        f"StandardScaler → MLP ({', '.join(map(str, recipe['rejector_hidden']))} ReLU, alpha "
        f"{recipe['rejector_alpha']}, {recipe['rejector_max_iter']} epochs), digits against "
        "real Speech Commands words, every VAD segment of real people talking, two thirds of "
        "the synthetic word vocabulary and the non-speech sounds → Platt sigmoid. Both "
        "exported with skl2onnx (checked equal to scikit-learn within "
        f"{tr.get('onnx_max_abs_diff', 0):.1e}).",
        "",
        "Addressing (`agent/recognition/decision.py`, the same rule in `evaluate` and in the "
        "daemon): a "
        "VAD segment acts only when it looks like a command said on its own: speech span at "
        f"most {fa_rule.get('max_length_s', '?')} s, at least "
        f"{fa_rule.get('min_quiet_before_s', '?')} s of quiet before it, no other segment "
        "starting within `vad.quiet_after_ms` after it, and not force-cut at "
        "`vad.max_utterance_ms`. A segment that fails it is decided (label and confidence "
        "in the decisions file, `\"addressed\": false`) but never acted on.",
        "",
        "Every figure below is out of fold, never a random split: **leave-one-speaker-out** over "
        "the FSDD speakers (trained on the others + all Speech Commands and talk speakers + "
        "synthetic voices), and **speaker-grouped folds** over the Speech Commands and talk "
        f"speakers ({recipe.get('sc_folds', 3)} groups each; trained on FSDD + the other "
        "groups).",
        "",
        "## Results (leave-one-speaker-out)",
        "",
        "| speaker | accent | clean | white 10 dB | babble 10 dB |",
        "| --- | --- | --- | --- | --- |",
    ]
    from agent.training.dataset import ACCENTS

    for s in spk:
        lines.append(f"| {s} | {ACCENTS.get(s, '?')} | " + " | ".join(
            pct(c[k]["per_speaker"][s]) for k in ("clean", "white10", "babble10"))
            + " |")
    lines.append("| **mean** | | " + " | ".join(
        f"**{pct(c[k]['mean'])}**" for k in ("clean", "white10", "babble10")) + " |")
    lines += [
        "",
        "Per class (clean): " + ", ".join(f"{d}: {pct(v)}" for d, v in
                                          report["per_class"].items()) + ".",
        "",
        f"Full-band synthetic voices never trained on: accuracy **{pct(ho['accuracy'])}**, "
        f"coverage {pct(ho['coverage'])} ({ho['n']} clips).",
        "",
    ]
    if sc:
        lines += [
            f"Speech Commands, {sc['speakers']} real speakers held out by group: closed-set "
            f"accuracy {pct(sc['closed_set_accuracy'])}; at the shipped threshold "
            f"**{pct(sc['digits_covered'])}** of real digits are acted on correctly (precision "
            f"{pct(sc['precision'])}) and **{pct(sc['words_accepted'])}** of real non-digit "
            "words are accepted as digits (" + ", ".join(
                f"{w[4:]}: {pct(v)}" for w, v in sc["words_accepted_by_word"].items() if v > 0)
            + ").",
            "",
        ]
    lines += [
        "Confusion matrix (rows: spoken digit, columns: decided class; clean, all folds):",
        "",
        "| | " + " | ".join(report["confusion"]["columns"]) + " |",
        "| --- " * (len(report["confusion"]["columns"]) + 1) + "|",
    ]
    for d, row in zip(report["confusion"]["rows"], report["confusion"]["counts"], strict=True):
        lines.append(f"| **{d}** | " + " | ".join(str(v) for v in row) + " |")
    cost = report["open_set_cost"]
    lines += [
        "",
        "## Calibration, open set and automation",
        "",
        f"Head temperature {cal['temperature']:.3f}; rejector Platt a={cal['platt'][0]:.3f}, "
        f"b={cal['platt'][1]:.3f}; both fitted on out-of-fold scores of real voices. Expected "
        f"calibration error of the 11-way output (15 bins, calibration fitted without the "
        f"tested speaker or group): **{cal['ece']:.3f}** (uncalibrated "
        f"{cal['ece_uncalibrated']:.3f}; FSDD digits alone {cal['ece_fsdd_digits']:.3f}).",
        "",
        f"Acceptance thresholds (`calibration/{manifest['name']}/thresholds.json`, one per "
        "class) chosen out of fold so that in **every** held-out group (each FSDD speaker; each "
        "group of Speech Commands speakers with its digits and its non-digit words), not on "
        "the pool, the decisions acted on for spoken digits reach a precision of "
        f"{pct(th['target_precision'])} and at most {pct(th.get('max_word_rate'))} of the "
        "non-digit words are acted on (`agent/training/thresholds.py`): "
        f"{th['value']:.3f} for all classes, then "
        "per class " + ", ".join(f"{d}: {v:.3f}" for d, v in th["per_class"].items()) +
        f". On the FSDD speakers precision **{pct(th['precision'])}** at coverage "
        f"**{pct(th['coverage'])}**; worst group **{pct(th.get('worst_group'))}**. "
        "In the default `partial` mode the agent acts at or above its class's threshold and "
        "abstains (asks again) below it. The pooled choice of model 2 would have been "
        f"{th.get('pooled_threshold', 0):.3f}.",
        "",
        "Precision of accepted decisions by held-out group: at the shipped thresholds (chosen "
        "with every group) and, the honest figure for a new voice, at thresholds chosen "
        "without that group (nested):",
        "",
        "| group | source | precision | acted on | digits covered | words acted on | "
        "precision, nested | digits covered, nested | words acted on, nested |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[f"| {g} | {v['source']} | {pct(v['precision'])} | {v['accepted']} | "
          f"{pct(v['coverage'])} | {pct(v.get('words_accepted'))} | "
          f"{pct(th['nested'][g]['precision'])} | {pct(th['nested'][g]['coverage'])} | "
          f"{pct(th['nested'][g].get('words_accepted'))} |" for g, v in th["by_group"].items()],
        "",
        "By source: " + "; ".join(
            f"{k} precision {pct(v['precision'])} ({v['accepted']} acted on, digits covered "
            f"{pct(v['coverage'])}, words acted on {pct(v.get('words_accepted'))})"
            for k, v in th["by_source"].items()) +
        f". Worst group at thresholds chosen without it: precision "
        f"**{pct(th.get('nested_worst'))}**, words acted on "
        f"**{pct(th.get('nested_words_worst'))}**.",
        "",
        "False activations per hour, out of fold (each stream scored by models that never "
        "heard its speakers; the stream laid out as a device hears it and cut by the agent's "
        "VAD):",
        "",
        "| stream | hours | VAD segments | addressed | per hour, model alone | **per hour** |",
        "| --- | --- | --- | --- | --- | --- |",
        *[f"| {STREAMS.get(k, k)} | {v['hours']:.2f} | {v['segments']} | "
          f"{pct(v['addressed'])} | {v['per_hour_model']:.2f} | **{v['per_hour']:.2f}** |"
          for k, v in fa.items() if k != "rule"],
        "",
        "What the open-set rule costs and buys, out of fold, at one common threshold (the "
        "pooled choice above, so the rejector's part can be seen):",
        "",
        f"* closed-set head alone, its own threshold for 99 % precision on FSDD: coverage "
        f"{pct(cost['head_only_fsdd']['coverage'])}; with the rejector at that "
        f"threshold: {pct(cost['with_rejector_fsdd']['coverage'])}.",
    ]
    if "head_only_speech_commands" in cost:
        h, w = cost["head_only_speech_commands"], cost["with_rejector_speech_commands"]
        lines.append(f"* Speech Commands held-out speakers: head alone covers "
                     f"{pct(h['digits_covered'])} of digits but accepts "
                     f"{pct(h['words_accepted'])} of words; with the rejector "
                     f"{pct(w['digits_covered'])} / {pct(w['words_accepted'])}.")
    lines += [
        f"* False accepts on {neg['n']} held-out negatives (never trained on): "
        f"**{pct(neg['false_accepts'])}** (" + ", ".join(
            f"{k}: {pct(v)}" for k, v in neg["by_kind"].items() if k != "homophones") + ").",
        f"* Homophones ({', '.join(HOMOPHONES)}) sound exactly like digits; they are not "
        "negatives in training and are accepted at "
        f"{pct(neg['by_kind'].get('homophones'))}: only context could tell them apart.",
        "",
        "## Targets",
        "",
        "| measure | target | reached |",
        "| --- | --- | --- |",
    ]
    for name, (target, value, ok) in targets.items():
        lines.append(f"| {name} | {target} | {value} {'✓' if ok else '✗'} |")
    lines += [
        "",
        f"Head + rejector + front-end graphs {size_bytes / 1e6:.2f} MB; front end + inference "
        f"{latency_ms:.2f} ms per utterance (median, one core, measured by `train` while other "
        "work shared the machine; see `benchmarks/bench_pipeline.py` for the pipeline figures). "
        f"Training {train_seconds / 60:.1f} min on a shared 2-core machine (`edge-voice-agent "
        "train --data ../shared/data/fsdd/recordings --speech-commands "
        "../shared/data/speech-commands --talk ../shared/data/talk`, seed "
        f"{tr.get('seed', 0)}; embeddings and "
        "synthesised speech are cached, a first run computes them).",
        "",
        "## Where the targets are not reached",
        "",
        "* Non-digit words of unseen speakers: at thresholds chosen without their group, up "
        f"to {pct(th.get('nested_words_worst'))} of a group's real words are acted on (target "
        "0.5 %), at 0.9-0.99 confidence (\"tree\" as three, \"down\"/\"no\" as nine or "
        "five); the shipped thresholds hold every group at "
        f"{pct(th.get('max_word_rate'))} only because every group took part in choosing "
        "them. The digits' precision does hold on unseen groups (worst "
        f"{pct(th.get('nested_worst'))}); the words are what a threshold chosen on other "
        "speakers does not see coming, and coverage is what a stricter word rate costs "
        f"(FSDD {pct(th['coverage'])}, Speech Commands digits "
        f"{pct(th['by_source'].get('speech-commands', {}).get('coverage'))}).",
        "* Real Speech Commands digits: 274 clips of 455 speakers; the rejector is what costs "
        "coverage (the closed-set head is right on "
        f"{pct(sc['closed_set_accuracy']) if sc else 'n/a'} of them): it cannot yet tell a "
        "real digit of an unseen crowd-sourced voice from that voice's other words as well as "
        "it does for FSDD voices. More real digits of many voices are the lever (AN4's "
        "digit strings cut by alignment, enrollment on the device).",
        "* False activations per hour: see the table above; the addressing rule removes most "
        "of what people talking would trigger (pieces of sentences), the rest are short "
        "phrases said on their own that sound like a digit.",
        "* Babble and noise at 10 dB, and LOSO accuracy: the head is model 2's design; the "
        "figures are in the table.",
        "* Training time: on a 2-core machine shared with four other jobs (load 9-11 "
        "throughout); embeddings are cached, so re-runs only refit.",
        "",
        "## Known limits",
        "",
        "* Real training voices: five male FSDD speakers, 455 Speech Commands speakers with "
        "few digits each (274 digits in all), 60 talk speakers (negatives only); women's and "
        "children's voices come mostly from Speech Commands, talk and the synthetic voices.",
        "* Homophones (\"for\", \"to\", \"ate\", \"won\") are accepted as digits when said "
        "on their own; inside a sentence the addressing rule stops them. Sequences of digits "
        "spoken without pauses are one utterance for the VAD and are not supported; digits "
        "said less than `decision.min_quiet_before_ms` apart are not acted on.",
        "* Music and noise are made-up streams here (chords, notes, drums; steady, bursty, "
        "humming noise), not recordings of rooms; talk is read sentences of non-native "
        "speakers, not conversation or TV.",
        "* The confidence is calibrated on these voices; under drift (a new microphone, a new "
        "population of voices) the estimated accuracy published in telemetry is optimistic.",
        "* The embedding front end's licence: see Components and `NOTICE`.",
        "",
        "## Model selection (speaker-grouped folds)",
        "",
        "Model 3:",
        "",
        *[f"* {n}" for n in MODEL3_NOTES],
        "",
        "Model 2 (kept: the same front end, head and rejector design):",
        "",
        *[f"* {n}" for n in SELECTION_NOTES],
        "",
    ]
    return "\n".join(lines)
