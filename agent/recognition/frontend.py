"""The one acoustic front end, shared by training, evaluation and the daemon.

A frozen speech embedding (Google's `speech_embedding`, Lin et al. 2020, as two ONNX graphs:
melspectrogram → 76-frame windows → 96-d embedding every 80 ms) turns one utterance into nine
embedding frames; a small trained head decides. Whatever a head is trained on must be exactly
what the daemon computes, so every step from samples to head input is in this module and
nowhere else (training and evaluation import it; tests prove the two paths agree).

From an utterance (mono float32 at 16 kHz, ±1 full scale) to the head input, `features`:

1. **Band limit** to the 4 kHz telephone band (soxr 16 k → 8 k → 16 k): the recorded training
   speakers are 8 kHz, microphones 16-48 kHz; both then look the same to the model.
2. **Centre** a 1.5 s window (24,000 samples) on the energetic span: the 10 ms frames within
   `span_db` of the loudest. The VAD's pre-roll and release, or a clip's own margins, do not
   move the word. Longer utterances are centre-cropped.
3. **Pad** what the utterance does not fill with background noise, never digital zero (the
   graphs were trained on real audio; zeros give embeddings no microphone ever produces):
   a fixed-seed band-limited noise sequence scaled to the RMS of the utterance's quietest
   10 ms frames (the quietest `quiet_fraction`), joined with 10 ms raised-cosine seams.
   Computed from the utterance alone, so training and serving pad identically.
4. **Level**: the loudest 10 ms frame is brought to `level_dbfs` (gain at most `max_gain_db`),
   so a quiet talker and a loud one give the same embeddings; then int16 scale for the graph.
5. **Embed**: melspectrogram graph (1, 24000) → (147, 32), `x / 10 + 2` (the openWakeWord
   transform that matches Google's TF-Hub front end), windows of 76 frames stepped by 8 →
   embedding graph → (9, 96). The embedding network is convolutional in time with a total
   stride of 8 frames, so its windows share most of their work: the graph the front end runs
   (`embedding_stream.onnx`, derived from the pinned `embedding_model.onnx` at training time by
   declaring the time axis dynamic, weights untouched) takes the whole 147-frame sequence in
   one call and returns the same nine embeddings (bit-identical, tested) at a fifth of the cost.
6. **Head input**: the 9 frames flattened, their mean and their max → 1,056 floats.

A head can also slide over a longer segment (`sliding_head_inputs`, the wake phrase in
agent/recognition/wake.py): the segment goes through steps 1, 3-5 as a whole, with half a window of
the same padding on each side, and every run of nine consecutive embedding frames (1.5 s, stepped by
80 ms) is one head input, exactly as the open wake-word engines slide their heads over the streaming
embedding. One embedding pass serves every position.

Steps 1-4 and 6 are pure numpy/soxr; step 5 needs the two graph files (`SpeechEmbedding`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import soxr

from agent.errors import AgentError

MEL_FILE = "melspectrogram.onnx"
EMBEDDING_FILE = "embedding_model.onnx"          # as pinned: one 76-frame window per row
STREAM_FILE = "embedding_stream.onnx"            # derived: any number of frames in one call
INT16_SCALE = 32768.0


@dataclass(frozen=True)
class FrontendParams:
    """Everything that changes the head input; stored in each model's manifest."""

    kind: str = "speech-embedding-v1"
    sample_rate: int = 16000
    window: int = 24000          # samples: 1.5 s, the utterance centred
    band_rate: int = 8000        # band limit = band_rate / 2 (4 kHz, like FSDD)
    frame: int = 160             # 10 ms analysis frames for span, noise level and gain
    span_db: float = 30.0        # frames this close to the loudest make the span to centre
    quiet_fraction: float = 0.1  # the quietest frames whose RMS sets the padding level
    floor_dbfs: float = -90.0    # padding level never below this (digital silence in)
    seam: int = 160              # raised-cosine join between the utterance and the padding
    noise_seed: int = 0
    level_dbfs: float = -20.0    # RMS of the loudest 10 ms frame after levelling
    max_gain_db: float = 40.0
    mel_window: int = 76         # mel frames per embedding
    mel_step: int = 8            # mel frames between embeddings (80 ms)
    n_embeddings: int = 9        # per 1.5 s window
    embedding_dim: int = 96

    @property
    def dim(self) -> int:
        """Head input size: the frames flattened, plus their mean and their max."""
        return (self.n_embeddings + 2) * self.embedding_dim

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrontendParams:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        p = cls(**known)
        if p.kind != cls.kind:
            raise ValueError(f"front end kind {p.kind!r} is not implemented here ({cls.kind!r})")
        return p


DEFAULT = FrontendParams()


# --- 1. band limit ------------------------------------------------------------------------------
def band_limit(x: np.ndarray, p: FrontendParams = DEFAULT) -> np.ndarray:
    """Same length, nothing above band_rate / 2: a round trip through the band rate."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) == 0:
        return x
    low = soxr.resample(x, p.sample_rate, p.band_rate, quality="HQ")
    y = soxr.resample(low, p.band_rate, p.sample_rate, quality="HQ")
    if len(y) < len(x):
        y = np.pad(y, (0, len(x) - len(y)))
    return y[: len(x)].astype(np.float32, copy=False)


# --- 2-4. window ----------------------------------------------------------------------------
def _frame_rms(x: np.ndarray, frame: int) -> np.ndarray:
    n = max(1, len(x) // frame)
    f = np.zeros(n * frame, np.float64)
    f[: min(len(x), n * frame)] = x[: n * frame]
    f = f.reshape(n, frame)
    return np.sqrt(np.einsum("ij,ij->i", f, f) / frame)


@lru_cache(maxsize=4)
def _padding_noise(p: FrontendParams) -> np.ndarray:
    """Unit-RMS band-limited noise, the same for every utterance (fixed seed)."""
    n = np.random.default_rng(p.noise_seed).standard_normal(p.window).astype(np.float32)
    n = band_limit(n, p)
    return (n / np.sqrt(np.mean(n.astype(np.float64) ** 2))).astype(np.float32)


@lru_cache(maxsize=4)
def _ramp(seam: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(seam) + 0.5) / seam)).astype(np.float32)


def speech_centre(x: np.ndarray, p: FrontendParams = DEFAULT) -> int:
    """Sample index of the centre of the energetic span (frames within span_db of the
    loudest)."""
    rms = _frame_rms(x, p.frame)
    db = 20.0 * np.log10(rms + 1e-12)
    keep = np.flatnonzero(db >= db.max() - p.span_db)
    return int((keep[0] + keep[-1] + 1) * p.frame // 2)


def fit_window(audio: np.ndarray, p: FrontendParams = DEFAULT) -> np.ndarray:
    """One utterance (16 kHz float32, ±1) → the graph's input: (window,) float32, int16 scale,
    band-limited, centred, padded with background noise and levelled (steps 1-4 above)."""
    x = band_limit(audio, p)
    w, half = p.window, p.window // 2
    if len(x) == 0:
        x = np.zeros(p.frame, np.float32)
    rms = _frame_rms(x, p.frame)
    q = np.sort(rms)[: max(1, int(len(rms) * p.quiet_fraction))]
    level = max(float(np.sqrt(np.mean(q ** 2))), 10.0 ** (p.floor_dbfs / 20.0))
    c = speech_centre(x, p)
    a0, a1 = max(0, c - half), min(len(x), c + half)   # audio span kept
    b0 = a0 - (c - half)                              # where it lands in the window
    b1 = b0 + (a1 - a0)
    out = _padding_noise(p) * np.float32(level)
    weight = np.zeros(w, np.float32)
    weight[b0:b1] = 1.0
    r = _ramp(p.seam)
    if b0 > 0 and b1 - b0 > 2 * p.seam:
        weight[b0:b0 + p.seam] = r
    if b1 < w and b1 - b0 > 2 * p.seam:
        weight[b1 - p.seam:b1] = r[::-1]
    seg = np.zeros(w, np.float32)
    seg[b0:b1] = x[a0:a1]
    out = out * (1.0 - weight) + seg * weight
    loud = float(_frame_rms(out, p.frame).max())
    gain_db = min(p.max_gain_db, p.level_dbfs - 20.0 * np.log10(loud + 1e-12))
    return (out * np.float32(INT16_SCALE * 10.0 ** (gain_db / 20.0))).astype(np.float32)


# --- 5. embed -------------------------------------------------------------------------------
class SpeechEmbedding:
    """The pretrained graphs in ONNX Runtime sessions: window → (n_embeddings, 96).

    `embedding_path` is the streaming form of the embedding graph (STREAM_FILE). Construct it
    from verified files only (ModelRunner checks the model directory's hashes, training fetches
    and checks the pinned wheel); this class trusts its paths.
    """

    def __init__(self, mel_path: str | Path, embedding_path: str | Path, threads: int = 1,
                 p: FrontendParams = DEFAULT) -> None:
        import onnxruntime as ort

        self.p = p
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._mel = _session(ort, Path(mel_path), opts)
        self._emb = _session(ort, Path(embedding_path), opts)
        self._mel_in = self._mel.get_inputs()[0].name
        self._emb_in = self._emb.get_inputs()[0].name

    def mel(self, window: np.ndarray) -> np.ndarray:
        """(window,) int16-scale float32 → (frames, 32) transformed melspectrogram."""
        x = np.ascontiguousarray(window, dtype=np.float32).reshape(1, -1)
        spec = self._mel.run(None, {self._mel_in: x})[0]
        return (spec.reshape(-1, spec.shape[-1]) / 10.0 + 2.0).astype(np.float32)

    def embed_mel(self, spec: np.ndarray) -> np.ndarray:
        """(frames, 32) → (k, 96): one embedding per 76-frame window stepped by 8, all windows
        in one call of the streaming graph."""
        x = np.ascontiguousarray(spec, dtype=np.float32)[None, :, :, None]
        out = self._emb.run(None, {self._emb_in: x})[0]
        return out.reshape(-1, self.p.embedding_dim).astype(np.float32, copy=False)

    def frames(self, window: np.ndarray) -> np.ndarray:
        """(window,) → (n_embeddings, embedding_dim) float32."""
        f = self.embed_mel(self.mel(window))
        if f.shape != (self.p.n_embeddings, self.p.embedding_dim):
            raise AgentError(f"speech embedding gave shape {f.shape}, expected "
                             f"({self.p.n_embeddings}, {self.p.embedding_dim}); the graphs do "
                             "not match the manifest's front end — reinstall the model")
        return f


def _session(ort, path: Path, opts):
    if not path.is_file():
        raise AgentError(f"front-end graph {path} is missing; reinstall the model directory")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise AgentError(f"front-end graph {path} cannot be loaded by ONNX Runtime "
                         f"({' '.join(str(e).split())[:200]}); reinstall the model") from None


# --- 6. head input --------------------------------------------------------------------------
def head_input(frames: np.ndarray) -> np.ndarray:
    """(n_embeddings, 96) → (dim,): frames flattened, then their mean, then their max."""
    f = np.asarray(frames, np.float32)
    return np.concatenate([f.ravel(), f.mean(0), f.max(0)]).astype(np.float32)


def features(audio: np.ndarray, embedder: SpeechEmbedding) -> np.ndarray:
    """One utterance (16 kHz float32, ±1) → the head input. THE path: training, evaluation
    and the daemon all call this."""
    return head_input(embedder.frames(fit_window(audio, embedder.p)))


def sliding_head_inputs(audio: np.ndarray, embedder: SpeechEmbedding
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(head inputs (n, dim), window centres (n,) as sample indices into `audio`): every 1.5 s
    window stepped by 80 ms over the segment, padded with half a window of background noise on
    each side (as `fit_window` pads a short word) and levelled by its loudest 10 ms frame."""
    p = embedder.p
    x = band_limit(audio, p)
    half, hop = p.window // 2, p.mel_step * p.frame
    if len(x) == 0:
        x = np.zeros(p.frame, np.float32)
    rms = _frame_rms(x, p.frame)
    q = np.sort(rms)[: max(1, int(len(rms) * p.quiet_fraction))]
    level = max(float(np.sqrt(np.mean(q ** 2))), 10.0 ** (p.floor_dbfs / 20.0))
    noise = _padding_noise(p) * np.float32(level)
    seg = x.copy()
    if len(seg) > 2 * p.seam:
        r = _ramp(p.seam)
        seg[:p.seam] = seg[:p.seam] * r + noise[half - p.seam:half] * (1.0 - r)
        seg[-p.seam:] = seg[-p.seam:] * r[::-1] + noise[half:half + p.seam] * (1.0 - r[::-1])
    y = np.concatenate([noise[:half], seg, noise[half:]])
    loud = float(_frame_rms(y, p.frame).max())
    gain_db = min(p.max_gain_db, p.level_dbfs - 20.0 * np.log10(loud + 1e-12))
    y = (y * np.float32(INT16_SCALE * 10.0 ** (gain_db / 20.0))).astype(np.float32)
    f = embedder.embed_mel(embedder.mel(y))
    n = len(f) - p.n_embeddings + 1
    if n < 1:
        raise AgentError(f"sliding front end: {len(f)} embedding frames for {len(y)} samples, "
                         f"fewer than the {p.n_embeddings} of one window")
    heads = np.stack([head_input(f[i:i + p.n_embeddings]) for i in range(n)])
    # window i spans y[i*hop, i*hop + window): its centre is y[i*hop + half], audio[i*hop]
    return heads, np.arange(n) * hop


def features_batch(clips: list[np.ndarray], embedder: SpeechEmbedding) -> np.ndarray:
    """(n, dim) head inputs for a list of clips."""
    out = np.empty((len(clips), embedder.p.dim), np.float32)
    for i, c in enumerate(clips):
        out[i] = features(c, embedder)
    return out
