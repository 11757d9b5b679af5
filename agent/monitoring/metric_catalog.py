"""The monitoring metric catalogue: name, pipeline stage, unit and fixed histogram bin edges.

Bin edges are fixed per metric (never data-dependent) so that histograms from any window, any
roll-up and any device merge exactly by adding counts. The edges are part of stats schema 1:
changing one changes what the published bin indices mean, so it needs a new schema number.

A histogram over `edges` (e_0 < ... < e_{n-1}) has n + 1 bins:

    index 0        underflow  (-inf, e_0)
    index i        [e_{i-1}, e_i)          for 1 <= i <= n-1
    index n        overflow   [e_{n-1}, +inf)

Every metric has at most 23 edges (24 bins) so a stats payload with every metric filled stays
well below 8 KB of JSON (measured in tests/test_privacy_payloads.py).
"""

from __future__ import annotations

from dataclasses import dataclass

STAGES: tuple[str, ...] = ("audio", "vad", "wake", "model", "system")
MAX_BINS = 24


@dataclass(frozen=True)
class MetricSpec:
    """One monitored quantity; `stage` says which pipeline stage a change points at."""

    name: str
    stage: str
    unit: str
    edges: tuple[float, ...]
    help: str

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"metric {self.name}: stage {self.stage!r} not in {STAGES}")
        if not self.edges or any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise ValueError(f"metric {self.name}: edges must be non-empty and strictly increasing")
        if len(self.edges) + 1 > MAX_BINS:
            raise ValueError(f"metric {self.name}: {len(self.edges) + 1} bins > {MAX_BINS}")

    @property
    def bins(self) -> int:
        """Number of bins including underflow and overflow."""
        return len(self.edges) + 1


def _steps(lo: float, hi: float, step: float) -> tuple[float, ...]:
    """Evenly spaced edges lo..hi inclusive, rounded so JSON and equality stay exact."""
    n = round((hi - lo) / step)
    return tuple(round(lo + i * step, 6) for i in range(n + 1))


METRICS: tuple[MetricSpec, ...] = (
    # --- audio: what reaches the microphone -------------------------------------------------
    MetricSpec("input_rms_dbfs", "audio", "dBFS", _steps(-80, 0, 4),
               "RMS level of each utterance; a muffled or unplugged microphone drops it"),
    MetricSpec("input_peak_dbfs", "audio", "dBFS", _steps(-60, 0, 3),
               "peak level of each utterance; the top bins show gain set too high"),
    MetricSpec("clipping_ratio", "audio", "ratio",
               (1e-9, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0),
               "fraction of an utterance's samples at full scale; exact zeros stay in underflow"),
    MetricSpec("snr_db", "audio", "dB", _steps(-10, 50, 3),
               "utterance level over the running noise floor; falls when the room gets noisy"),
    MetricSpec("noise_floor_dbfs", "audio", "dBFS", _steps(-96, -12, 4),
               "level of non-speech frames (many per window, so drift on it is reliable)"),
    MetricSpec("audio_outage_s", "audio", "s",
               (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                7200.0, 21600.0, 86400.0),
               "length of each capture outage (microphone unplugged, busy or failing), recorded "
               "when capture resumes; its audio alarm is raised at the loss, cleared at return"),
    # --- vad: how the segmenter behaves ------------------------------------------------------
    MetricSpec("utterance_length_s", "vad", "s",
               (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5,
                3.0, 4.0, 6.0, 10.0),
               "length of each segmented utterance; a cut-off or stuck VAD shows here"),
    MetricSpec("vad_speech_ratio", "vad", "ratio", _steps(0.05, 0.95, 0.05),
               "speech frames / frames, one value per window (derived when the window closes)"),
    MetricSpec("utterance_rate_per_min", "vad", "1/min",
               (1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0),
               "utterances per minute, one value per window (derived when the window closes)"),
    # --- wake: the wake phrase (addressing.mode = "wake", agent/recognition/wake.py) ---
    # (published only by a device in wake mode, so a device in "always" mode sends the same
    # bytes as before; few bins, so a wake-mode payload stays under the 8 KB limit)
    MetricSpec("wake_score", "wake", "probability",
               (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
               "wake mode: the wake head's best score at the start of each segment; a shift "
               "shows the wake phrase heard worse (or everything heard as it)"),
    MetricSpec("wake_latency_ms", "wake", "ms",
               (100.0, 200.0, 300.0, 400.0, 500.0, 750.0, 1000.0, 1500.0, 2000.0, 3000.0),
               "wake mode: end of the wake phrase (audio clock) to the moment it was detected, "
               "per detection; includes the VAD hangover"),
    # --- model: how sure the recogniser is ---------------------------------------------------
    MetricSpec("confidence", "model", "probability",
               _steps(0.1, 0.95, 0.05) + (0.97, 0.99, 0.995),
               "calibrated top probability of each decision; its mean estimates accuracy"),
    MetricSpec("margin", "model", "probability", _steps(0.05, 0.95, 0.05) + (0.98,),
               "top minus runner-up probability of each decision"),
    MetricSpec("digit_confidence", "model", "probability",
               _steps(0.1, 0.95, 0.05) + (0.97, 0.99, 0.995),
               "calibrated probability of the best word of the vocabulary (the top class, or the "
               "runner-up when the top is unknown; named for the first vocabulary, digits); its "
               "mean is the label-free accuracy estimate"),
    MetricSpec("unknown_ratio", "model", "ratio",
               (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
               "decisions labelled unknown / decisions, one value per window (derived)"),
    # --- system: the software around the model -----------------------------------------------
    MetricSpec("compute_latency_ms", "system", "ms",
               (0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 50.0, 100.0, 200.0,
                300.0, 500.0, 1000.0, 2000.0),
               "features + inference wall time per utterance"),
    MetricSpec("eou_latency_ms", "system", "ms",
               (10.0, 20.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 500.0, 600.0,
                800.0, 1000.0, 1500.0, 2000.0, 3000.0, 5000.0),
               "end of speech (audio clock) to decision; includes the VAD hangover"),
    MetricSpec("queue_depth", "system", "blocks",
               (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0, 128.0,
                256.0, 512.0, 1024.0),
               "capture queue length seen by the pipeline; growth means it cannot keep up"),
    MetricSpec("config_reload_ok", "system", "bool", (0.5, 1.5),
               "1 per applied SIGHUP reload, 0 per refused one (the previous configuration keeps "
               "running); its system alarm stays raised until a reload succeeds"),
    MetricSpec("state_write_errors", "system", "errors",
               (1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0, 10000.0),
               "failed writes to the state directory (decisions file, device baseline, telemetry "
               "outbox) in a window that had any, one value per such window (derived); its "
               "system alarm is raised at the first failure, cleared when every part writes "
               "again"),
    MetricSpec("state_files_quarantined", "system", "files", (0.5, 1.5),
               "1 per corrupt state file moved aside (kept for inspection) and replaced by a "
               "fresh one; its system alarm stays raised for the rest of the boot"),
    MetricSpec("telemetry_restarts", "system", "count", (0.5, 1.5),
               "1 each time the MQTT client's network thread was found dead and restarted "
               "(telemetry was silently stopped until then); its count per window is the number "
               "of restarts"),
    # --- system: acting on decisions (agent/actions) -----------------------------------------
    MetricSpec("action_latency_ms", "system", "ms",
               (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0),
               "decision to the start of its action's program, one value per run; queueing "
               "behind a slow run of the same action shows here"),
    MetricSpec("action_outcome", "system", "code", (0.5, 1.5, 2.5),
               "one value per decision handed to an action: 0 ran and exited 0, 1 failed (exit "
               "status not 0, or could not start), 2 killed at actions.timeout_s, 3 dropped on "
               "a full queue; the histogram counts each"),
    MetricSpec("socket_dropped", "system", "ratio", (0.5, 1.5),
               "one value per decision and connected decision-socket reader: 1 when the reader "
               "was not reading and the decision was dropped for it, else 0; the mean is the "
               "share dropped"),
)

# Alarms the service raises on events rather than on a window statistic, so they have no
# histogram in the stats payload (which keeps its size headroom): an automatic model rollback.
EVENT_ALARMS: tuple[str, ...] = ("model_probation",)

# Drift scored on something that is not a histogram of the catalogue, so it has a `drift` entry
# and alarm rules but no `metrics` entry: the window's class distribution (its counts are only
# published k-suppressed under `outputs`). The edges are unused (one dummy edge).
CLASS_DISTRIBUTION = "class_distribution"
DRIFT_ONLY: tuple[MetricSpec, ...] = (
    MetricSpec(CLASS_DISTRIBUTION, "model", "JS distance", (0.5,),
               "the window's decisions per class (every class of the model's manifest incl. "
               "unknown) against the device baseline's; scored and published only for windows "
               "with >= k decisions, like the class counts"),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in (*METRICS, *DRIFT_ONLY)}

# Metrics the window aggregator computes itself, once per window, when the window closes.
WINDOW_DERIVED: frozenset[str] = frozenset(
    {"vad_speech_ratio", "utterance_rate_per_min", "unknown_ratio", "state_write_errors"})

# One value per utterance. In a window with fewer than k utterances their distributions
# (min, max, quantiles, histogram) would be a list of individual utterances' values, so the
# payload keeps only count and mean there, and only count below MEAN_MIN_VALUES.
PER_UTTERANCE: frozenset[str] = frozenset(
    {"input_rms_dbfs", "input_peak_dbfs", "clipping_ratio", "snr_db", "utterance_length_s",
     "confidence", "margin", "digit_confidence", "compute_latency_ms", "eou_latency_ms",
     "wake_score", "wake_latency_ms"})
MEAN_MIN_VALUES = 3


def spec(name: str) -> MetricSpec:
    """The catalogue entry for `name`; KeyError names the allowed metrics."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown metric {name!r}; allowed: {', '.join(BY_NAME)}") from None
