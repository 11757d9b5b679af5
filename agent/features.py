"""The one acoustic front end, shared by training, evaluation and the daemon.

Built for voices the model has never heard, and for what a VAD hands over (a word with some
quiet before and after):

1. DC removal, pre-emphasis, 25 ms Hamming frames every 10 ms, power spectrum;
2. 40 mel bands with per-band minimum-statistics noise subtraction (steady noise and the VAD's
   padding fall away), log with a floor 60 dB below the loudest band (gain invariant);
3. trim to the frames within `trim_db` of the loudest and above the noise floor;
4. one mean/variance normalisation over the whole word (per-band normalisation was measured to
   hurt: it removes the spectral shape that tells "six" from "five");
5. time alignment to a fixed number of frames twice: linearly, and along the arc length of
   spectral change (a cheap DTW-like alignment that stretches the steady parts and keeps the
   transitions: speakers differ most in how long they hold a vowel);
6. DCT along frequency.

Pure numpy; constants are built once per parameter set. Training imports this module, so there
is no second copy to drift apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class FeatureParams:
    """Everything that changes the feature vector; stored in each model's manifest."""

    kind: str = "logmel-align-v2"
    sample_rate: int = 8000
    win: int = 200
    hop: int = 80
    n_fft: int = 256
    n_mels: int = 40
    fmin: float = 60.0
    fmax: float = 3800.0
    preemphasis: float = 0.97
    floor_db: float = 60.0
    trim_db: float = 30.0
    noise_margin_db: float = 10.0
    spec_sub: float = 1.0
    sub_floor: float = 0.05
    n_frames: int = 32
    n_ceps: int = 13
    arc_alpha: float = 0.5
    views: tuple[str, ...] = ("lin", "arc")

    @property
    def dim(self) -> int:
        return len(self.views) * self.n_frames * self.n_ceps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["views"] = list(self.views)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FeatureParams:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        if "views" in known:
            known["views"] = tuple(known["views"])
        p = cls(**known)
        if p.kind != cls.kind:
            raise ValueError(f"feature kind {p.kind!r} is not implemented here ({cls.kind!r})")
        return p


@lru_cache(maxsize=8)
def _constants(p: FeatureParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    def hz2mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    def mel2hz(m):
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)

    pts = mel2hz(np.linspace(hz2mel(p.fmin), hz2mel(p.fmax), p.n_mels + 2))
    bins = np.fft.rfftfreq(p.n_fft, 1.0 / p.sample_rate)
    fb = np.zeros((p.n_mels, len(bins)))
    for i in range(p.n_mels):
        lo, c, hi = pts[i], pts[i + 1], pts[i + 2]
        fb[i] = np.maximum(0.0, np.minimum((bins - lo) / (c - lo), (hi - bins) / (hi - c)))
    fb /= np.maximum(fb.sum(1, keepdims=True), 1e-10)
    k = np.arange(p.n_ceps)[:, None]
    n = np.arange(p.n_mels)[None, :]
    dct = np.cos(np.pi * k * (2 * n + 1) / (2 * p.n_mels)) * np.sqrt(2.0 / p.n_mels)
    dct[0] /= np.sqrt(2.0)
    return fb.T.copy(), dct.T.copy(), np.hamming(p.win)


def log_mel(pcm: np.ndarray, p: FeatureParams) -> tuple[np.ndarray, np.ndarray]:
    """(log-mel dB (frames, n_mels), frame energy dB (frames,)); short input is zero-padded."""
    fb, _, window = _constants(p)
    x = np.asarray(pcm, dtype=np.float64).ravel()
    min_len = p.win + 3 * p.hop
    if len(x) < min_len:
        x = np.pad(x, (0, min_len - len(x)))
    x = x - x.mean()
    frames = np.lib.stride_tricks.sliding_window_view(x, p.win)[::p.hop]  # views, no copies
    energy = 10.0 * np.log10(np.einsum("ij,ij->i", frames, frames) + 1e-12)
    x = np.append(x[0], x[1:] - p.preemphasis * x[:-1])
    spec = np.fft.rfft(np.lib.stride_tricks.sliding_window_view(x, p.win)[::p.hop] * window,
                       p.n_fft)
    mel = (spec.real ** 2 + spec.imag ** 2) @ fb
    if p.spec_sub > 0:  # minimum statistics over a 3-frame moving average, per band
        k = min(3, len(mel))
        cs = np.cumsum(np.vstack([np.zeros((1, mel.shape[1])), mel]), 0)
        noise = ((cs[k:] - cs[:-k]) / k).min(axis=0)
        mel = np.maximum(mel - p.spec_sub * noise, p.sub_floor * mel)
    floor = mel.max() * 10.0 ** (-p.floor_db / 10.0) + 1e-20
    return 10.0 * np.log10(mel + floor), energy


def trim_frames(lm: np.ndarray, energy: np.ndarray, p: FeatureParams) -> np.ndarray:
    top = energy.max()
    thr = max(top - p.trim_db, min(energy.min() + p.noise_margin_db, top - 6.0))
    keep = np.flatnonzero(energy >= thr)
    a, b = keep[0], keep[-1] + 1
    if b - a < 3:
        a, b = max(0, a - 1), min(len(lm), b + 1)
    return lm[a:b]


def align(lm: np.ndarray, view: str, p: FeatureParams) -> np.ndarray:
    """`n_frames` frames by linear interpolation at positions chosen by `view`."""
    n = len(lm)
    if view == "lin":
        pos = np.linspace(0.0, n - 1.0, p.n_frames)
    else:  # arc length over spectral change
        d = np.sqrt(np.mean(np.diff(lm, axis=0) ** 2, axis=1))
        d = d / (d.mean() + 1e-9)
        s = np.concatenate([[0.0], np.cumsum(p.arc_alpha + (1 - p.arc_alpha) * d)])
        pos = np.interp(np.linspace(0.0, s[-1], p.n_frames), s, np.arange(n, dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(int), 0, n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (pos - i0)[:, None]
    return lm[i0] * (1.0 - w) + lm[i1] * w


def extract(pcm: np.ndarray, p: FeatureParams = FeatureParams()) -> np.ndarray:
    """One utterance (float32 mono at p.sample_rate) → fixed-length float32 feature vector."""
    _, dct, _ = _constants(p)
    lm = trim_frames(*log_mel(pcm, p), p)
    lm = (lm - lm.mean()) / (lm.std() + 1e-6)
    return np.concatenate([(align(lm, v, p) @ dct).ravel() for v in p.views]).astype(np.float32)


def extract_batch(clips: list[np.ndarray], p: FeatureParams = FeatureParams()) -> np.ndarray:
    """(n, dim) features for a list of clips, as training and evaluation need them."""
    out = np.empty((len(clips), p.dim), np.float32)
    for i, c in enumerate(clips):
        out[i] = extract(c, p)
    return out
