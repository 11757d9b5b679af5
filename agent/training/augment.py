"""Waveform augmentation and open-set negatives, numpy only, at the front end's 16 kHz.

Augmentation targets what differs between speakers and rooms: speed (a joint pitch and
vocal-tract-length warp once the front end normalises time), gain, white noise at 5-30 dB SNR,
and the low-level padding a real VAD leaves around a word. Negatives teach the model an explicit
"not one of my words": reversed and time-shuffled speech (speech-like, but no digit), tones and
noise bursts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SR = 16000


@dataclass(frozen=True)
class AugmentParams:
    p_noise: float = 0.7
    snr_db: tuple[float, float] = (5.0, 30.0)
    gain_db: tuple[float, float] = (-20.0, 6.0)
    p_pad: float = 0.5
    pad_s: float = 0.3
    pad_dbfs: tuple[float, float] = (-70.0, -50.0)
    speed: tuple[float, float] = (0.9, 1.1)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)) + 1e-12)


def gain(x: np.ndarray, db: float) -> np.ndarray:
    return (x * 10.0 ** (db / 20.0)).astype(np.float32)


def add_white_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    n = rng.standard_normal(len(x))
    n *= rms(x) / rms(n) * 10.0 ** (-snr_db / 20.0)
    return (x + n).astype(np.float32)


def pad_noise(x: np.ndarray, rng: np.random.Generator, max_s: float = 0.3,
              dbfs: tuple[float, float] = (-70.0, -50.0)) -> np.ndarray:
    """VAD-like padding: 0..max_s s of low-level white noise before and after."""
    pre = int(rng.uniform(0, max_s) * SR)
    post = int(rng.uniform(0, max_s) * SR)
    level = 10.0 ** (rng.uniform(*dbfs) / 20.0)
    y = rng.standard_normal(len(x) + pre + post) * level
    y[pre:pre + len(x)] += x
    return y.astype(np.float32)


def speed(x: np.ndarray, factor: float) -> np.ndarray:
    """Band-limited (FFT) resampling: all frequencies scaled by `factor`, duration by 1/factor."""
    n = len(x)
    m = max(16, int(round(n / factor)))
    spec = np.fft.rfft(x)
    k = m // 2 + 1
    spec = spec[:k] if k <= len(spec) else np.concatenate(
        [spec, np.zeros(k - len(spec), spec.dtype)])
    return (np.fft.irfft(spec, m) * (m / n)).astype(np.float32)


def random_augment(x: np.ndarray, rng: np.random.Generator,
                   p: AugmentParams = AugmentParams()) -> np.ndarray:
    y = speed(x, rng.uniform(*p.speed)) if p.speed != (1.0, 1.0) else x
    y = gain(y, rng.uniform(*p.gain_db))
    if rng.random() < p.p_pad:
        y = pad_noise(y, rng, p.pad_s, p.pad_dbfs)
    if rng.random() < p.p_noise:
        y = add_white_noise(y, rng.uniform(*p.snr_db), rng)
    return np.clip(y, -1.0, 1.0).astype(np.float32)


# --- test conditions (deterministic per clip) ------------------------------------------------
CONDITIONS = ("clean", "snr10", "quiet20", "padded")


def condition(x: np.ndarray, cond: str, i: int) -> np.ndarray:
    """The evaluation corruption `cond` of clip number i, the same on every run."""
    rng = np.random.default_rng(10_000 + i)
    if cond == "clean":
        return x
    if cond == "snr10":
        return np.clip(add_white_noise(x, 10.0, rng), -1, 1)
    if cond == "quiet20":
        return gain(x, -20.0)
    if cond == "padded":
        return pad_noise(x, rng, 0.3, (-70.0, -50.0))
    raise ValueError(f"unknown condition {cond!r}; allowed: {', '.join(CONDITIONS)}")


# --- negatives (open set) --------------------------------------------------------------------
def reverse(x: np.ndarray) -> np.ndarray:
    return x[::-1].copy()


def time_shuffle(x: np.ndarray, rng: np.random.Generator, seg_ms: float = 60.0) -> np.ndarray:
    seg = int(SR * seg_ms / 1000)
    n = max(1, len(x) // seg)
    parts = [x[i * seg:(i + 1) * seg] for i in range(n)]
    return np.concatenate([parts[i] for i in rng.permutation(n)]).astype(np.float32)


def tone(rng: np.random.Generator) -> np.ndarray:
    dur = rng.uniform(0.2, 1.0)
    t = np.arange(int(dur * SR)) / SR
    f = rng.uniform(100, 3500)
    y = np.sin(2 * np.pi * f * t)
    if rng.random() < 0.5:  # chirp or two tones
        y += np.sin(2 * np.pi * (f * 0.5 + rng.uniform(50, 500) * t) * t)
    env = np.minimum(1, np.minimum(t, t[::-1]) / 0.02)
    return (0.3 * y * env / np.abs(y).max()).astype(np.float32)


def noise_burst(rng: np.random.Generator) -> np.ndarray:
    n = int(rng.uniform(0.15, 1.0) * SR)
    w = rng.standard_normal(n)
    kind = rng.integers(3)
    if kind == 1:  # brown-ish
        w = np.cumsum(w)
        w -= np.linspace(w[0], w[-1], n)
    elif kind == 2:  # pink-ish
        spec = np.fft.rfft(w) / np.sqrt(np.arange(1, n // 2 + 2))
        w = np.fft.irfft(spec, n)
    env = np.abs(np.convolve(rng.standard_normal(n), np.ones(400) / 400, "same"))
    y = w * (env if rng.random() < 0.5 else 1.0)
    return (0.3 * y / (np.abs(y).max() + 1e-9)).astype(np.float32)
