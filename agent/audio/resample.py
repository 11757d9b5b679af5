"""Down-mixing and anti-aliased streaming resampling to the model's rate (soxr)."""

from __future__ import annotations

import numpy as np
import soxr


def to_mono(block: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) float audio → (n,) float32, by averaging channels."""
    if block.ndim == 1:
        return block.astype(np.float32, copy=False)
    if block.shape[1] == 1:
        return block[:, 0].astype(np.float32, copy=False)
    return block.mean(axis=1, dtype=np.float32)


class Resampler:
    """Streaming rate conversion that keeps filter state across blocks.

    Block boundaries do not change the output (soxr's stream keeps its history), so a file read
    in any block size gives the same samples; `flush()` returns the filter's tail at the end.
    When the rates are equal it is a pass-through with no cost.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = None if in_rate == out_rate else soxr.ResampleStream(
            in_rate, out_rate, 1, dtype="float32", quality=quality)

    def process(self, mono: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return mono
        return self._stream.resample_chunk(np.ascontiguousarray(mono, dtype=np.float32))

    def flush(self) -> np.ndarray:
        if self._stream is None:
            return np.zeros(0, np.float32)
        return self._stream.resample_chunk(np.zeros(0, np.float32), last=True)
