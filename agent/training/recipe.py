"""The model recipe: which data, how much augmentation, which head and rejector; and their
building blocks (fit, raw scores, temperature and Platt calibration, calibration error,
threshold for a precision).

The model is two scikit-learn parts on the same head input (the front end's 9 embedding frames
flattened + mean + max): a closed-set digit head that never sees a non-digit, and a separate
digit-vs-not rejector in front of it. The daemon multiplies them, P(digit k) = p_in * P_head(k),
P(unknown) = 1 - p_in, and acts when the top digit's probability reaches one threshold. Every
choice here was selected by speaker-grouped cross-validation; the model card lists what was
tried and did not help.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from agent.training.augment import AugmentParams

DIGITS = tuple(str(d) for d in range(10))
UNKNOWN = "unknown"
CLASSES = (*DIGITS, UNKNOWN)
UNKNOWN_INDEX = len(DIGITS)


@dataclass(frozen=True)
class Recipe:
    aug_copies: int = 1              # augmented copies of each real clip
    real_digit_copies: int = 0       # more augmented copies of each real Speech Commands digit
    synth_aug_copies: int = 0        # augmented copies of each synthetic clip (CPU time)
    augment: AugmentParams = field(default_factory=AugmentParams)
    n_espeak: int = 1500             # synthetic digits per engine
    n_flite: int = 450
    n_festival: int = 60
    n_neg_words_espeak: int = 1800   # synthetic non-digit words per engine
    n_neg_words_flite: int = 500
    n_neg_words_festival: int = 40
    n_homophones: int = 160
    n_sentences: int = 200
    n_babble: int = 400
    n_music: int = 400
    n_noise: int = 200
    n_tv: int = 400
    head_c: float = 0.05             # StandardScaler → LogisticRegression(C) → temperature
    rejector_hidden: tuple[int, ...] = (128,)  # StandardScaler → MLP → Platt scaling
    rejector_alpha: float = 0.01
    rejector_max_iter: int = 25
    sc_folds: int = 3                # speaker groups of the Speech Commands evaluation
    target_precision: float = 0.99   # on the worst held-out group (agent/training/thresholds)
    max_word_rate: float = 0.002     # real non-digit words acted on, at most, in every group
    per_class_thresholds: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def small(self) -> Recipe:
        """A fast variant for tests: a few hundred synthetic clips."""
        return replace(self, n_espeak=100, n_flite=30, n_festival=0, n_neg_words_espeak=100,
                       n_neg_words_flite=30, n_neg_words_festival=0, n_homophones=12,
                       n_sentences=12, n_babble=20, n_music=20, n_noise=10, n_tv=20,
                       aug_copies=1, synth_aug_copies=1, rejector_hidden=(32,),
                       rejector_max_iter=20)


def _quiet_fit(model, x: np.ndarray, y: np.ndarray, **fit_params):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y, **fit_params)


def fit_head(x: np.ndarray, y: np.ndarray, r: Recipe, seed: int):
    """Closed-set digit head: digits only, so the open set never costs it accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return _quiet_fit(make_pipeline(StandardScaler(), LogisticRegression(
        C=r.head_c, max_iter=300, random_state=seed)), x, y)


WORD, SOUND = 10, 11  # the rejector's two non-digit classes


def fit_rejector(x: np.ndarray, y12: np.ndarray, r: Recipe, seed: int,
                 weight: np.ndarray | None = None):
    """Digit-vs-not, trained 12-way (the ten digits, "word", "sound"); p_in is the digits'
    total probability. Out of fold on real Speech Commands speakers this covered 0.73 of digits
    at 1 % words accepted against 0.63 for a binary digit-vs-not MLP: learning each digit
    keeps a rare voice's digit from looking like "not the usual digit voice"."""
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), MLPClassifier(
        hidden_layer_sizes=tuple(r.rejector_hidden), alpha=r.rejector_alpha,
        max_iter=r.rejector_max_iter, batch_size=256, learning_rate_init=1e-3,
        random_state=seed))
    weighted = {} if weight is None else {"mlpclassifier__sample_weight": weight}
    return _quiet_fit(model, x, y12.astype(int), **weighted)


def head_scores(model, x: np.ndarray) -> np.ndarray:
    """Log-probabilities (logits up to a per-row constant): what temperature scaling divides."""
    return np.log(np.clip(model.predict_proba(x), 1e-30, None))


P_LO = 1e-7  # the smallest share either side of the rejector's logit is given


def rejector_logit(model, x: np.ndarray, n_known: int = 10) -> np.ndarray:
    """log(p_in / (1 - p_in)), p_in = the known classes' share of the rejector's output (the
    digits' share of the 12-way output; the first `n_known` columns). 1 - p_in is the sum of
    the other columns, not a difference: near p_in = 1 a float32 difference (what the
    exported graph would compute) loses the logit (2e-3 apart from scikit-learn here)."""
    p = model.predict_proba(x)
    p_in = np.maximum(p[:, :n_known].sum(1), P_LO)
    p_out = np.maximum(p[:, n_known:].sum(1), P_LO)
    return np.log(p_in) - np.log(p_out)


def softmax(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = z / t
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of held-out predictions."""
    ts = np.exp(np.linspace(np.log(0.05), np.log(5.0), 300))
    nll = [-np.mean(np.log(softmax(z, t)[np.arange(len(y)), y] + 1e-12)) for t in ts]
    return float(ts[int(np.argmin(nll))])


def fit_platt(logit: np.ndarray, y: np.ndarray, balanced: bool = False
              ) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a * logit + b) minimising held-out log-loss (Platt scaling);
    `balanced`: as if both classes were equally frequent in the held-out pool."""
    from sklearn.linear_model import LogisticRegression

    lr = LogisticRegression(C=1e4, class_weight="balanced" if balanced else None).fit(
        logit[:, None], y.astype(int))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def combine(p_head: np.ndarray, p_in: np.ndarray) -> np.ndarray:
    """What the daemon computes: (n, 11) = p_in * P_head for the digits, 1 - p_in unknown."""
    return np.concatenate([p_head * p_in[:, None], (1 - p_in)[:, None]], 1)


def ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top probability, equal-width bins."""
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    e = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            e += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return float(e)


def threshold_for_precision(p: np.ndarray, y: np.ndarray, target: float
                            ) -> tuple[float, float, float]:
    """Lowest confidence threshold whose accepted digit decisions reach `target` precision.

    Acting means: the top class is a digit and its probability reaches the threshold; y is
    UNKNOWN_INDEX for non-digits, so accepting one counts against precision. Scans from the most
    confident down and keeps the largest accepted set still meeting the target. Returns
    (threshold, coverage of the digits, precision).
    """
    conf, pred = p.max(1), p.argmax(1)
    digit = pred != UNKNOWN_INDEX
    order = np.argsort(-np.where(digit, conf, -1.0), kind="stable")
    correct = (pred == y) & digit
    hits = np.cumsum(correct[order])
    n = np.arange(1, len(y) + 1)
    ok = np.flatnonzero((hits / n >= target) & digit[order])
    if len(ok) == 0:
        return 1.0, 0.0, float("nan")
    thr = float(conf[order[ok[-1]]])
    acc = digit & (conf >= thr)
    is_digit = y != UNKNOWN_INDEX
    return thr, float((acc & is_digit).sum() / max(1, is_digit.sum())), \
        float(correct[acc].mean())
