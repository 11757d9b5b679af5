"""Waveform augmentation, evaluation conditions and non-speech negatives; numpy only, 16 kHz.

Augmentation targets what differs between speakers, rooms and microphones: speed (a joint
pitch and vocal-tract-length warp), reverberation (a synthetic decaying room response),
microphone colour (random peaking bands and a spectral tilt), gain, and noise at 3-30 dB SNR
(white, pink, brown, or babble of synthetic voices). The non-speech generators give the open-set
rejector the sounds a device hears between commands: babble, music-like tones, noises, and
TV-like running speech over a music bed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SR = 16000


@dataclass(frozen=True)
class AugmentParams:
    speed: tuple[float, float] = (0.85, 1.15)
    p_room: float = 0.4
    p_eq: float = 0.4
    gain_db: tuple[float, float] = (-20.0, 6.0)
    p_noise: float = 0.8
    snr_db: tuple[float, float] = (3.0, 30.0)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)) + 1e-12)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Band-limited (FFT) resampling: all frequencies scaled by `factor`, duration by 1/factor."""
    n = len(x)
    m = max(16, int(round(n / factor)))
    spec = np.fft.rfft(x)
    k = m // 2 + 1
    spec = spec[:k] if k <= len(spec) else np.concatenate(
        [spec, np.zeros(k - len(spec), spec.dtype)])
    return (np.fft.irfft(spec, m) * (m / n)).astype(np.float32)


def colored_noise(n: int, rng: np.random.Generator, kind: str) -> np.ndarray:
    """Unit-RMS white, pink (1/f power) or brown (1/f^2 power) noise."""
    w = rng.standard_normal(n)
    if kind != "white":
        spec = np.fft.rfft(w)
        k = np.arange(1, len(spec) + 1, dtype=np.float64)
        spec /= np.sqrt(k) if kind == "pink" else k
        w = np.fft.irfft(spec, n)
    return (w / rms(w)).astype(np.float32)


def mix_at_snr(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    if len(noise) < len(x):
        noise = np.tile(noise, -(-len(x) // len(noise)))
    noise = noise[: len(x)]
    return (x + noise * (rms(x) / rms(noise) * 10 ** (-snr_db / 20))).astype(np.float32)


def room(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Reverberation: direct path plus exponentially decaying noise (RT60 0.15-0.7 s)."""
    rt60 = rng.uniform(0.15, 0.7)
    n = int(rt60 * SR)
    t = np.arange(n) / SR
    h = rng.standard_normal(n) * np.exp(-6.9 * t / rt60) * rng.uniform(0.2, 0.6)
    h[: int(0.002 * SR)] = 0.0
    h[0] = 1.0
    n_out = len(x) + len(h) - 1
    nfft = 1 << (n_out - 1).bit_length()
    y = np.fft.irfft(np.fft.rfft(x, nfft) * np.fft.rfft(h, nfft), nfft)[: len(x) + int(0.1 * SR)]
    return (y * rms(x) / rms(y)).astype(np.float32)


def eq(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Microphone/channel colour: 1-3 random peaking bands of ±12 dB and a ±6 dB tilt."""
    n = len(x)
    f = np.fft.rfftfreq(n, 1 / SR)
    g = np.zeros_like(f)
    for _ in range(int(rng.integers(1, 4))):
        fc, bw, db = rng.uniform(150, 3800), rng.uniform(100, 1500), rng.uniform(-12, 12)
        g += db * np.exp(-0.5 * ((f - fc) / bw) ** 2)
    g += rng.uniform(-6, 6) * np.log2(np.maximum(f, 50) / 1000) / 4
    return np.fft.irfft(np.fft.rfft(x) * 10 ** (g / 20), n).astype(np.float32)


def random_augment(x: np.ndarray, rng: np.random.Generator, babble_pool: Sequence[np.ndarray],
                   p: AugmentParams = AugmentParams()) -> np.ndarray:
    y = speed(x, rng.uniform(*p.speed))
    if rng.random() < p.p_room:
        y = room(y, rng)
    if rng.random() < p.p_eq:
        y = eq(y, rng)
    y = y * 10 ** (rng.uniform(*p.gain_db) / 20)
    if rng.random() < p.p_noise:
        kind = ("white", "pink", "brown", "babble", "babble")[int(rng.integers(5))]
        snr = rng.uniform(*p.snr_db)
        if kind == "babble" and len(babble_pool):
            noise = babble_pool[int(rng.integers(len(babble_pool)))]
        else:
            noise = colored_noise(len(y) + 100, rng, "white" if kind == "babble" else kind)
        y = mix_at_snr(y, noise, snr)
    return np.clip(y, -1, 1).astype(np.float32)


# --- evaluation conditions (deterministic per clip) -------------------------------------------
CONDITIONS = ("clean", "white10", "babble10")


def condition(x: np.ndarray, cond: str, i: int, babble_pool: Sequence[np.ndarray]
              ) -> np.ndarray:
    """The evaluation corruption `cond` of clip number i, the same on every run."""
    rng = np.random.default_rng(10_000 + i)
    if cond == "clean":
        return x
    if cond == "white10":
        return np.clip(mix_at_snr(x, colored_noise(len(x), rng, "white"), 10.0), -1, 1)
    if cond == "babble10":
        return np.clip(mix_at_snr(x, babble_pool[i % len(babble_pool)], 10.0), -1, 1)
    raise ValueError(f"unknown condition {cond!r}; allowed: {', '.join(CONDITIONS)}")


# --- non-speech negatives ---------------------------------------------------------------------
def babble(clips: Sequence[np.ndarray], rng: np.random.Generator, dur: float = 1.5,
           voices: int | None = None) -> np.ndarray:
    """3-6 synthetic voices talking over each other."""
    n = int(dur * SR)
    y = np.zeros(n)
    for _ in range(voices or int(rng.integers(3, 7))):
        c = clips[int(rng.integers(len(clips)))]
        c = c / rms(c)
        o = int(rng.integers(-len(c) // 2, n))
        a, b = max(0, o), min(n, o + len(c))
        if b > a:
            y[a:b] += c[a - o:b - o] * rng.uniform(0.5, 1.0)
    return (0.1 * y / rms(y)).astype(np.float32)


def music(rng: np.random.Generator, dur: float | None = None) -> np.ndarray:
    """Music-like: 1-5 notes of 1-3 note chords with harmonics and decays, sometimes drums."""
    n = int((dur or rng.uniform(0.4, 1.5)) * SR)
    t = np.arange(n) / SR
    y = np.zeros(n)
    k = int(rng.integers(1, 6))
    edges = np.concatenate([[0], np.sort(rng.integers(0, n, k - 1)), [n]])
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        if b - a < 10:
            continue
        tt = t[a:b] - t[a]
        for _ in range(int(rng.integers(1, 4))):
            f0 = 110 * 2 ** (int(rng.integers(0, 36)) / 12)
            env = np.exp(-tt * rng.uniform(0.5, 6))
            for h in range(1, int(rng.integers(2, 8))):
                if f0 * h < 7000:
                    y[a:b] += env * np.sin(2 * np.pi * f0 * h * tt + rng.uniform(0, 6)) / \
                        h ** rng.uniform(0.7, 2)
    if rng.random() < 0.5:
        for s in rng.integers(0, n, int(rng.integers(1, 6))):
            m = min(n - int(s), 2000)
            y[s:s + m] += rng.standard_normal(m) * np.exp(-np.arange(m) / rng.uniform(100, 800)) \
                * 0.5
    return (0.1 * y / rms(y)).astype(np.float32)


def noise(rng: np.random.Generator) -> np.ndarray:
    """Steady, bursty or humming noise, 0.2-1.5 s."""
    n = int(rng.uniform(0.2, 1.5) * SR)
    y = colored_noise(n, rng, ("white", "pink", "brown")[int(rng.integers(3))]).astype(np.float64)
    r = rng.random()
    if r < 0.3:
        env = (rng.random(n // 400 + 1) < 0.3).repeat(400)[:n] * 1.0
        y = y * np.convolve(env, np.ones(80) / 80, "same")
    elif r < 0.5:
        t = np.arange(n) / SR
        f = (50, 60)[int(rng.integers(2))]
        y = y * 0.2 + sum(np.sin(2 * np.pi * f * i * t) / i for i in range(1, 6))
    return (0.1 * y / rms(y)).astype(np.float32)


def tv(sentence: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """TV-like: 1.5 s of synthetic running speech, coloured, over a music bed at 5-20 dB."""
    n = int(1.5 * SR)
    s = sentence
    if len(s) > n:
        o = int(rng.integers(0, len(s) - n))
        s = s[o:o + n]
    y = mix_at_snr(eq(s, rng), music(rng, 1.6), rng.uniform(5, 20))
    return (0.1 * y / rms(y)).astype(np.float32)
