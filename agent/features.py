"""The one acoustic front end, shared by training, evaluation and the daemon.

log-mel energies → trim silence relative to the loudest frame → one mean/variance normalisation
per utterance (gain-invariant; per-band normalisation was measured to hurt) → resample to a
fixed number of frames (rate-invariant) → DCT along frequency. Pure numpy; the constants are
built once per parameter set. Training imports this module, so there is no second copy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class FeatureParams:
    """Everything that changes the feature vector; stored in each model's manifest."""

    kind: str = "logmel-dct-v1"
    sample_rate: int = 8000
    win_ms: float = 25.0
    hop_ms: float = 10.0
    n_fft: int = 256
    n_mels: int = 40
    fmin: float = 20.0
    fmax: float = 4000.0
    trim_db: float = 25.0
    n_frames: int = 32
    n_ceps: int = 13

    @property
    def dim(self) -> int:
        return self.n_frames * self.n_ceps

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureParams:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=8)
def _constants(p: FeatureParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    win = int(round(p.sample_rate * p.win_ms / 1000))
    hop = int(round(p.sample_rate * p.hop_ms / 1000))
    window = np.hanning(win + 2)[1:-1].astype(np.float32)
    bins = np.fft.rfftfreq(p.n_fft, 1.0 / p.sample_rate)
    mels = _mel_to_hz(np.linspace(_hz_to_mel(np.array(p.fmin)), _hz_to_mel(np.array(p.fmax)),
                                  p.n_mels + 2))
    fb = np.zeros((len(bins), p.n_mels), np.float32)
    for m in range(p.n_mels):
        lo, mid, hi = mels[m], mels[m + 1], mels[m + 2]
        up = (bins - lo) / max(mid - lo, 1e-9)
        down = (hi - bins) / max(hi - mid, 1e-9)
        fb[:, m] = np.maximum(0.0, np.minimum(up, down))
    k = np.arange(p.n_mels)
    dct = np.cos(np.pi / p.n_mels * (k[:, None] + 0.5) * np.arange(p.n_ceps)[None, :])
    dct *= np.sqrt(2.0 / p.n_mels)
    dct[:, 0] /= np.sqrt(2.0)
    return window, fb, dct.astype(np.float32), win, hop


def log_mel(pcm: np.ndarray, p: FeatureParams) -> np.ndarray:
    """(frames, n_mels) log-mel energies in dB; short input is zero-padded to one frame."""
    window, fb, _, win, hop = _constants(p)
    x = np.asarray(pcm, np.float32)
    if len(x) < win:
        x = np.pad(x, (0, win - len(x)))
    n = 1 + (len(x) - win) // hop
    idx = np.arange(win)[None, :] + hop * np.arange(n)[:, None]
    spec = np.fft.rfft(x[idx] * window, n=p.n_fft, axis=1)
    power = (spec.real ** 2 + spec.imag ** 2).astype(np.float32)
    return 10.0 * np.log10(power @ fb + 1e-10)


def extract(pcm: np.ndarray, p: FeatureParams = FeatureParams()) -> np.ndarray:
    """One utterance (float32 mono at p.sample_rate) → fixed-length float32 feature vector."""
    _, _, dct, _, _ = _constants(p)
    lm = log_mel(pcm, p)
    energy = lm.max(axis=1)
    keep = np.flatnonzero(energy >= energy.max() - p.trim_db)
    lm = lm[keep[0]:keep[-1] + 1]
    lm = (lm - lm.mean()) / (lm.std() + 1e-6)
    src = np.linspace(0.0, len(lm) - 1, p.n_frames)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, len(lm) - 1)
    w = (src - lo)[:, None].astype(np.float32)
    lm = lm[lo] * (1.0 - w) + lm[hi] * w
    return (lm @ dct).reshape(-1).astype(np.float32)


def extract_batch(clips: list[np.ndarray], p: FeatureParams = FeatureParams()) -> np.ndarray:
    """(n, dim) features for a list of clips, as training and evaluation need them."""
    out = np.empty((len(clips), p.dim), np.float32)
    for i, c in enumerate(clips):
        out[i] = extract(c, p)
    return out
