"""Segmenter behaviour on real (synthesised) short words, long speech, silence and noise."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf

from agent.audio.vad import Segmenter
from agent.config import VadConfig
from agent.errors import ConfigError
from agent.resources import demo_audio, demo_truth

RATE = 8000


@pytest.fixture(scope="module")
def words() -> list[np.ndarray]:
    """The demo's spoken digits, each cut at its true span (0.2–0.6 s: short commands)."""
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    assert sr == RATE
    truth = json.loads(demo_truth().read_text())["utterances"]
    return [x[int(u["start"] * sr):int(u["end"] * sr)] for u in truth]


def run(seg: Segmenter, x: np.ndarray, block: int = 800):
    out = []
    for i in range(0, len(x), block):
        out += seg.push(x[i:i + block])[0]
    return out + seg.flush()


def floor(n: int, dbfs: float = -60, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 10 ** (dbfs / 20)).astype(np.float32)


def layout(words, gap_s: float = 1.0) -> tuple[np.ndarray, list[tuple[int, int]]]:
    pieces, spans, t = [floor(RATE)], [], RATE
    for w in words:
        spans.append((t, t + len(w)))
        pieces += [w, floor(int(gap_s * RATE), seed=t)]
        t += len(w) + int(gap_s * RATE)
    return np.concatenate(pieces), spans


def test_every_short_word_is_one_utterance(words):
    assert max(len(w) for w in words) / RATE < 0.8
    x, spans = layout(words)
    utts = run(Segmenter(VadConfig(), RATE), x)
    assert len(utts) == len(words)
    for u, (s, e) in zip(utts, spans, strict=True):
        assert u.start < e and u.end > s, "each utterance overlaps its word"
        assert not u.forced_cut


def test_preroll_is_included_before_the_trigger(words):
    x, spans = layout(words[:3])
    cfg = VadConfig(preroll_ms=150)
    utts = run(Segmenter(cfg, RATE), x)
    for u in utts:
        assert u.start - u.audio_start == 150 * RATE // 1000
        assert len(u.audio) >= u.end - u.audio_start
        # the audio really is the stream's samples from audio_start on
        np.testing.assert_array_equal(u.audio[:100], x[u.audio_start:u.audio_start + 100])


def test_silence_and_noise_floor_yield_nothing():
    assert run(Segmenter(VadConfig(), RATE), np.zeros(10 * RATE, np.float32)) == []
    assert run(Segmenter(VadConfig(), RATE), floor(10 * RATE, -55)) == []


def test_long_speech_is_force_cut_at_the_maximum(words):
    speech = np.concatenate(words * 3)  # ~15 s of speech with no pauses
    x = np.concatenate([floor(RATE), speech, floor(RATE)])
    cfg = VadConfig(max_utterance_ms=2000)
    utts = run(Segmenter(cfg, RATE), x)
    forced = [u for u in utts if u.forced_cut]
    assert len(forced) >= 3
    for u in utts:
        assert (u.end - u.start) <= 2000 * RATE // 1000


def test_short_blips_below_min_speech_are_discarded(words):
    blip = words[0][: int(0.06 * RATE)]
    x = np.concatenate([floor(RATE), blip, floor(RATE)])
    seg = Segmenter(VadConfig(min_speech_ms=120), RATE)
    assert run(seg, x) == []


def test_block_size_does_not_change_the_result(words):
    x, _ = layout(words)
    a = run(Segmenter(VadConfig(), RATE), x, block=80)
    b = run(Segmenter(VadConfig(), RATE), x, block=16000)
    assert [(u.start, u.end, u.emitted_at) for u in a] == \
        [(u.start, u.end, u.emitted_at) for u in b]


def test_times_are_sample_positions_on_the_stream_clock(words):
    x, spans = layout(words[:2], gap_s=2.0)
    seg = Segmenter(VadConfig(hangover_ms=240), RATE)
    utts = run(seg, x)
    assert seg.clock == len(x)
    for u, (s, e) in zip(utts, spans, strict=True):
        assert abs(u.start - s) < 0.1 * RATE
        assert abs(u.end - e) < 0.1 * RATE
        assert u.emitted_at - u.end >= 240 * RATE // 1000 - seg.frame


def test_words_in_noise_are_found(words):
    x, spans = layout(words)
    noisy = x + floor(len(x), -40, seed=3)  # about 15-25 dB below the words
    utts = run(Segmenter(VadConfig(), RATE), noisy)
    found = sum(any(u.start < e and u.end > s for u in utts) for s, e in spans)
    assert found >= len(spans) - 1
    assert len(utts) <= len(spans) + 1


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_all_webrtcvad_frame_lengths_work(words, frame_ms):
    x, _ = layout(words[:4])
    utts = run(Segmenter(replace(VadConfig(), frame_ms=frame_ms), RATE), x)
    assert len(utts) == 4


def test_unsupported_rate_is_refused():
    with pytest.raises(ConfigError, match="22050"):
        Segmenter(VadConfig(), 22050)


def test_quiet_before_measures_the_pause_since_the_previous_segment(words):
    """What the addressing rule reads: nothing before the first word (None), the pause before
    each later one (a word after 0.3 s of quiet is inside running speech, after 1.5 s on its
    own), and a force-cut continuation follows its first part with no quiet at all."""
    a, b, c = words[:3]
    x = np.concatenate([floor(RATE), a, floor(int(0.3 * RATE), seed=1), b,
                        floor(int(1.5 * RATE), seed=2), c, floor(RATE, seed=3)])
    us = run(Segmenter(VadConfig(), RATE), x)
    assert len(us) == 3
    assert us[0].quiet_before is None
    q1, q2 = us[1].quiet_before / RATE, us[2].quiet_before / RATE
    assert 0.2 <= q1 <= 0.45 and 1.3 <= q2 <= 1.7, (q1, q2)
    assert all(u.length_s == (u.end - u.start) / RATE for u in us)
    speech = np.concatenate([words[i % len(words)] for i in range(12)])
    cut = run(Segmenter(VadConfig(max_utterance_ms=1000, hangover_ms=600), RATE),
              np.concatenate([floor(RATE), speech, floor(RATE, seed=4)]))
    forced = [u for u in cut if u.forced_cut]
    assert forced and cut[cut.index(forced[0]) + 1].quiet_before == 0
    seg = Segmenter(VadConfig(), RATE)
    run(seg, np.concatenate([floor(RATE), a, floor(RATE)]))
    seg.skip(RATE)  # after a hole nothing is known about what came before
    assert run(seg, np.concatenate([floor(RATE), b, floor(RATE)]))[0].quiet_before is None


def test_a_word_followed_by_more_speech_is_marked_speech_after(words):
    """Held for vad.quiet_after_ms after its last speech: released as `speech_after` when the
    next word starts sooner (a piece of running speech), as a word on its own otherwise, and
    released at most quiet_after_ms after its end either way."""
    a, b, c = words[:3]
    x = np.concatenate([floor(RATE), a, floor(int(0.3 * RATE), seed=1), b,
                        floor(int(1.5 * RATE), seed=2), c, floor(RATE, seed=3)])
    cfg = VadConfig(quiet_after_ms=350)  # off by default
    us = run(Segmenter(cfg, RATE), x)
    assert [u.speech_after for u in us] == [True, False, False]
    assert us[0].emitted_at <= us[1].start + 3 * cfg.frame_ms * RATE // 1000
    for u in us[1:]:
        assert (u.emitted_at - u.end) / RATE >= cfg.quiet_after_ms / 1000
        assert (u.emitted_at - u.end) / RATE <= cfg.quiet_after_ms / 1000 + 0.05
    # without the hold, the segmenter releases after the hangover, as before
    us0 = run(Segmenter(replace(cfg, quiet_after_ms=0), RATE), x)
    assert [u.speech_after for u in us0] == [False] * 3
    assert [(u.start, u.end) for u in us0] == [(u.start, u.end) for u in us]


def test_training_streams_cut_and_address_exactly_as_the_daemon():
    """No skew in the addressing rule: evaluation's segments (agent/training/streams.py) are the
    daemon pipeline's utterances on the same audio, and its default rule is the config's."""
    from agent.audio.sources import AudioBlock
    from agent.config import DecisionConfig
    from agent.recognition.decision import Addressing, Policy
    from agent.recognition.pipeline import Pipeline
    from agent.training.streams import segment

    x, sr = sf.read(str(demo_audio()), dtype="float32")
    x = np.concatenate([x, x[: sr * 3] * 0.5])  # words following each other closely, too
    assert DecisionConfig().addressing() == Addressing()
    pipeline = Pipeline(VadConfig(), None, Policy("off", 1.0), rate=RATE)
    got = []
    pipeline.observers.append(type("O", (), {"on_block": lambda *a: None,
                                             "on_outcome": lambda s, o: got.append(o)})())
    for i in range(0, len(x), 800):
        pipeline.feed(AudioBlock(x[i:i + 800, None], RATE))
    pipeline.finish()
    ours = segment(x, VadConfig(), RATE)
    key = [(u.start, u.end, u.quiet_before, u.speech_after, u.forced_cut) for u in ours]
    assert key == [(o.utterance.start, o.utterance.end, o.utterance.quiet_before,
                    o.utterance.speech_after, o.utterance.forced_cut) for o in got]
    assert len(key) >= 14
