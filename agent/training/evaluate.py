"""Data assembly and speaker-grouped evaluation of the recipe.

Two kinds of fold, never a random split:
- leave-one-speaker-out over the FSDD speakers: the head and rejector are trained on the other
  speakers (plus every Speech Commands speaker and the synthetic voices) and tested on that
  speaker's recordings, clean, in white noise and in babble at 10 dB SNR;
- grouped folds over the Speech Commands speakers: trained on FSDD and the other folds' speakers,
  tested on the held-out speakers' real digits and real non-digit words.
Held-out synthetic words (a third of the vocabulary, never trained on), held-out non-speech
(babble, music, noise, TV-like speech), homophones and held-out synthetic voices are scored by
every LOSO model. Out-of-fold scores give the temperature, the Platt scaling of the rejector,
the calibration error (with a nested fit, so no speaker calibrates itself) and the threshold.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import VadConfig
from agent.recognition import frontend as F
from agent.recognition.decision import Addressing
from agent.training import augment as A
from agent.training import streams as T
from agent.training import synth as S
from agent.training.dataset import (
    ACCENTS,
    Clip,
    discover,
    discover_speech_commands,
    is_negative,
    load_audio,
)
from agent.training.recipe import (
    CLASSES,
    DIGITS,
    SOUND,
    UNKNOWN_INDEX,
    WORD,
    Recipe,
    combine,
    ece,
    fit_head,
    fit_platt,
    fit_rejector,
    fit_temperature,
    head_scores,
    rejector_logit,
    sigmoid,
    softmax,
    threshold_for_precision,
)
from agent.training.thresholds import accepted as accepted_at
from agent.training.thresholds import choose_thresholds, group_precision, nested_thresholds

SR = 16000
FSDD_CONDITIONS = A.CONDITIONS
_POOLS: dict[str, list[np.ndarray]] = {}


def init_worker(pools: dict[str, list[np.ndarray]]) -> None:
    _POOLS.update(pools)


def _feature_job(args: tuple) -> np.ndarray:
    """One clip → head input, after an optional augmentation or test condition."""
    from agent.training.pretrained import training_embedder

    x, op, i = args
    if op == "aug":
        x = A.random_augment(x, np.random.default_rng(i), _POOLS["babble_train"])
    elif op != "clean":
        x = A.condition(x, op, i, _POOLS["babble_test"])
    return F.features(x, training_embedder())


def word_group(word: str) -> str:
    """A stable third of the synthetic vocabulary ("B") is never trained on."""
    return "B" if zlib.crc32(word.encode()) % 3 == 0 else "A"


@dataclass
class Part:
    """Head inputs of one set of clips, clean and as augmented copies, with their metadata."""

    x: np.ndarray                          # (n, 1056) clean
    aug: list[np.ndarray]                  # augmented copies, each (n, 1056)
    label: np.ndarray                      # digit index, or UNKNOWN_INDEX for a non-digit
    group: np.ndarray                      # speaker / voice / A-B group
    kind: np.ndarray                       # word or sound kind, for slicing
    cond: dict[str, np.ndarray] = field(default_factory=dict)  # test conditions (FSDD)

    def all(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xs = [self.x[m], *[a[m] for a in self.aug]]
        return np.concatenate(xs), np.concatenate([self.label[m]] * len(xs))


@dataclass
class StreamPart:
    """Head inputs of VAD segments of streams (agent/training/streams.py), with what the VAD
    knew about each segment and each group's stream length in hours."""

    x: np.ndarray
    length_s: np.ndarray
    forced: np.ndarray
    quiet_before_s: np.ndarray   # nan: nothing heard before
    speech_after: np.ndarray     # the next segment started within vad.quiet_after_ms
    group: np.ndarray            # speaker, speaker group or kind of sound
    hours: dict[str, float]

    def addressed(self, rule: Addressing) -> np.ndarray:
        return np.array([rule.allows(float(n), bool(f), None if np.isnan(q) else float(q),
                                     bool(a))
                         for n, f, q, a in zip(self.length_s, self.forced, self.quiet_before_s,
                                               self.speech_after, strict=True)], bool)


@dataclass
class DataSet:
    fsdd: Part
    sc: Part | None
    synth: Part            # synthetic digits of the training voices
    heldout_voices: Part   # synthetic digits of voices never trained on (full band)
    words: Part            # synthetic non-digit words, group A trained, B held out
    homophones: Part
    sounds: Part           # babble, music, noise, tv; group A trained, B held out
    clips: list[Clip] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    talk: StreamPart | None = None          # real people talking, by speaker
    word_stream: StreamPart | None = None   # real Speech Commands words, by speaker group
    sound_stream: StreamPart | None = None  # made-up music and noise, by kind
    sc_extra: Part | None = None            # more augmented copies of the real SC digits

    @property
    def speakers(self) -> list[str]:
        return sorted({str(s) for s in self.fsdd.group})

    def train_sets(self, fsdd_speakers: list[str], sc_speakers: list[str],
                   talk_speakers: list[str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_head, y_head, x_rejector, y_rejector) for the given training speakers; the
        rejector's labels are the digit, WORD or SOUND; every VAD segment of the talk speakers
        is a WORD (running speech is never a command)."""
        xs, ys = [], []
        x, y = self.fsdd.all(np.isin(self.fsdd.group, fsdd_speakers))
        xs.append(x), ys.append(y)
        words = []
        if self.sc is not None:
            tr = np.isin(self.sc.group, sc_speakers)
            x, y = self.sc.all(tr & (self.sc.label != UNKNOWN_INDEX))
            xs.append(x), ys.append(y)
            if self.sc_extra is not None:
                m = np.isin(self.sc_extra.group, sc_speakers)
                xs.append(self.sc_extra.x[m]), ys.append(self.sc_extra.label[m])
            words.append(self.sc.all(tr & (self.sc.label == UNKNOWN_INDEX))[0])
        x, y = self.synth.all(np.ones(len(self.synth.label), bool))
        xs.append(x), ys.append(y)
        xh, yh = np.concatenate(xs), np.concatenate(ys)
        words.append(self.words.all(self.words.group == "A")[0])
        if self.talk is not None and talk_speakers:
            words.append(self.talk.x[np.isin(self.talk.group, talk_speakers)])
        xw = np.concatenate(words)
        xs_ = self.sounds.all(self.sounds.group == "A")[0]
        return xh, yh, np.concatenate([xh, xw, xs_]), np.concatenate(
            [yh, np.full(len(xw), WORD), np.full(len(xs_), SOUND)])


# --- data ---------------------------------------------------------------------------------------
def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:16]


def featurize(pool, cache: Path, name: str, key: Any, audio: list[np.ndarray], op: str,
              seed: int, log=print) -> np.ndarray:
    """Head inputs for `audio` after `op`; cached by the front end, the data and the op."""
    path = cache / f"feat-{name}-{op}-{_digest(key, op, seed, F.DEFAULT.to_dict())}.npy"
    if path.is_file():
        return np.load(path)
    t0 = time.perf_counter()
    out = np.stack(pool.map(_feature_job, [(x, op, seed * 1_000_003 + i)
                                           for i, x in enumerate(audio)], chunksize=32))
    out = out.astype(np.float32)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    log(f"features: {len(audio)} {name} clips ({op}) in {time.perf_counter() - t0:.0f} s")
    return out


def _files_key(clips: list[Clip]) -> list:
    return [(c.path.name, c.path.stat().st_size) for c in clips]


def _limit(clips: list[Clip], limit: int | None, per_speaker: bool = True) -> list[Clip]:
    """At most `limit` clips per speaker and label (per label only: Speech Commands has one or
    two clips per speaker and label)."""
    if not limit:
        return clips
    seen: dict[tuple, int] = {}
    keep = []
    for c in clips:
        k = (c.speaker, c.label) if per_speaker else (c.label,)
        if seen.get(k, 0) < limit:
            seen[k] = seen.get(k, 0) + 1
            keep.append(c)
    return keep


def build_dataset(data_dir: Path, cache: Path, r: Recipe, seed: int = 0,
                  speakers: set[str] | None = None, limit_per_class: int | None = None,
                  workers: int = 2, log=print, speech_commands: Path | None = None,
                  talk: Path | None = None) -> DataSet:
    from agent.training.pretrained import fetch

    t0 = time.perf_counter()
    fetch(log=log)  # once, here: the workers then find the verified graphs in the cache
    every = _limit(discover(data_dir), limit_per_class)  # featurised once for any --speakers
    clips = [c for c in every if not speakers or c.speaker in speakers]
    if not clips:
        raise SystemExit(f"train: none of the speakers {sorted(speakers or [])} is in {data_dir}")
    sc_clips = _limit(discover_speech_commands(speech_commands),
                      limit_per_class and 2 * limit_per_class, per_speaker=False) \
        if speech_commands else []
    real = [load_audio(c.path, SR) for c in every]
    keep = np.array([c in clips for c in every])
    sc_audio = [load_audio(c.path, SR) for c in sc_clips]
    digits = S.synthesize(cache, "digits", S.DIGIT_WORDS, r.n_espeak, r.n_flite, r.n_festival,
                          0, workers, log)
    words = S.synthesize(cache, "negatives", S.NEG_WORDS, r.n_neg_words_espeak,
                         r.n_neg_words_flite, r.n_neg_words_festival, 1, workers, log)
    homo = S.synthesize(cache, "homophones", S.HOMOPHONES, r.n_homophones * 3 // 4,
                        r.n_homophones // 4, 0, 2, workers, log)
    sent = S.synthesize(cache, "sentences", S.SENTENCES, r.n_sentences * 3 // 4,
                        r.n_sentences // 4, 0, 3, workers, log)
    dig_tr, dig_ho = digits.split(heldout=False), digits.split(heldout=True)
    w_tr = words.split(heldout=False)
    rng = np.random.default_rng(seed)
    half = len(sent.audio) // 2
    pool_train = dig_tr.audio + w_tr.audio + sent.audio[:half]
    pool_test = dig_ho.audio + words.split(heldout=True).audio + sent.audio[half:]
    babble_train = [A.babble(pool_train, rng) for _ in range(300)]
    babble_test = [A.babble(pool_test, rng) for _ in range(100)]
    sounds, kinds, groups = [], [], []
    for g, pool_, sents, scale in (("A", pool_train, sent.audio[:half], 1.0),
                                   ("B", pool_test, sent.audio[half:], 0.375)):
        for kind, n in (("babble", r.n_babble), ("music", r.n_music), ("noise", r.n_noise),
                        ("tv", r.n_tv)):
            for _ in range(max(2, int(n * scale / 1.375))):
                if kind == "babble":
                    x = A.babble(pool_, rng, dur=rng.uniform(0.5, 1.5))
                elif kind == "music":
                    x = A.music(rng)
                elif kind == "noise":
                    x = A.noise(rng)
                else:
                    x = A.tv(sents[int(rng.integers(len(sents)))], rng)
                sounds.append(x), kinds.append(kind), groups.append(g)
    # only what changes the synthetic audio or its augmentation: refitting a head or rejector
    # with other settings reuses the cached features
    synth_key = [len(x) for x in digits.audio[:50]] + [
        {k: v for k, v in r.to_dict().items() if k.startswith("n_") or "aug" in k}, seed]
    with Pool(workers, init_worker, ({"babble_train": babble_train,
                                       "babble_test": babble_test},)) as pool:
        def feats(name: str, key: Any, audio: list[np.ndarray], copies: int,
                  ops: tuple[str, ...] = ()) -> tuple[np.ndarray, list[np.ndarray], dict]:
            clean = featurize(pool, cache, name, key, audio, "clean", seed, log)
            aug = [featurize(pool, cache, name, key, audio, "aug", seed + 101 * (k + 1), log)
                   for k in range(copies)]
            conds = {c: featurize(pool, cache, name, key, audio, c, seed, log) for c in ops}
            return clean, aug, conds

        fx, fa, fc = feats("fsdd", _files_key(every), real, r.aug_copies,
                           tuple(c for c in FSDD_CONDITIONS if c != "clean"))
        fc = {"clean": fx[keep], **{k: v[keep] for k, v in fc.items()}}
        fsdd = Part(fx[keep], [a[keep] for a in fa], np.array([int(c.label) for c in clips]),
                    np.array([c.speaker for c in clips]), np.array([c.label for c in clips]), fc)
        sc = sc_extra = None
        if sc_clips:
            sx, sa, _ = feats("speech-commands", _files_key(sc_clips), sc_audio, 1)
            sc = Part(sx, sa, np.array([UNKNOWN_INDEX if is_negative(c.label) else int(c.label)
                                        for c in sc_clips]),
                      np.array([c.speaker for c in sc_clips]),
                      np.array([c.label for c in sc_clips]))
            # real digits of many voices are the scarcest data: more augmented copies of them
            dig_i = [i for i, c in enumerate(sc_clips) if not is_negative(c.label)]
            extra = [featurize(pool, cache, "speech-commands-digits",
                               _files_key([sc_clips[i] for i in dig_i]),
                               [sc_audio[i] for i in dig_i], "aug", seed + 101 * (k + 10), log)
                     for k in range(r.real_digit_copies)]
            if extra:
                sc_extra = Part(np.concatenate(extra), [], np.tile(sc.label[dig_i], len(extra)),
                                np.tile(sc.group[dig_i], len(extra)),
                                np.tile(sc.kind[dig_i], len(extra)))
        dx, da, _ = feats("synth-digits", synth_key, dig_tr.audio, r.synth_aug_copies)
        synth = Part(dx, da, dig_tr.label, dig_tr.voice, dig_tr.voice)
        hx, _, _ = feats("heldout-voices", synth_key, dig_ho.audio, 0)
        heldout = Part(hx, [], dig_ho.label, dig_ho.voice, dig_ho.voice)
        wx, wa, _ = feats("synth-words", synth_key, words.audio, r.synth_aug_copies)
        wnames = np.array([S.NEG_WORDS[i] for i in words.label])
        wgroup = np.array([word_group(w) for w in wnames])
        wpart = Part(wx, wa, np.full(len(wx), UNKNOWN_INDEX), wgroup, wnames)
        ox, _, _ = feats("homophones", synth_key, homo.audio, 0)
        hpart = Part(ox, [], np.full(len(ox), UNKNOWN_INDEX), homo.voice,
                     np.array([S.HOMOPHONES[i] for i in homo.label]))
        nx, na, _ = feats("sounds", synth_key, sounds, r.synth_aug_copies)
        npart = Part(nx, na, np.full(len(nx), UNKNOWN_INDEX), np.array(groups), np.array(kinds))
        vad = VadConfig()

        def stream_part(name: str, key: Any, streams: list[tuple[str, list[np.ndarray]]],
                        gap: tuple[float, float]) -> StreamPart:
            segs, hours = [], {}
            for i, (g, audio) in enumerate(streams):
                sg, secs = T.stream_segments(audio, g, vad, seed + i, gap)
                segs += sg
                hours[g] = hours.get(g, 0.0) + secs / 3600
            x = featurize(pool, cache, name, [key, gap, vad.__dict__],
                          [sg.audio for sg in segs], "clean", seed, log)
            return StreamPart(x, np.array([sg.length_s for sg in segs]),
                              np.array([sg.forced_cut for sg in segs]),
                              np.array([np.nan if sg.quiet_before_s is None else sg.quiet_before_s
                                        for sg in segs]),
                              np.array([sg.speech_after for sg in segs]),
                              np.array([sg.group for sg in segs]), hours)

        talk_part = word_stream = None
        if talk is not None:
            by_spk = T.talk_files(talk)
            if limit_per_class:  # quick runs: a few sentences of a few speakers
                by_spk = {k: v[:2 * limit_per_class] for k, v in list(by_spk.items())[:9]}
            talk_part = stream_part(
                "talk", [(p.name, p.stat().st_size) for ps in by_spk.values() for p in ps],
                [(spk, [load_audio(p, SR) for p in ps]) for spk, ps in by_spk.items()],
                T.TALK_GAP_S)
        if sc_clips:
            by_group: dict[str, list[np.ndarray]] = {}
            order = {s: i for i, g in enumerate(sc_speaker_groups(
                sorted({c.speaker for c in sc_clips}), r.sc_folds)) for s in g}
            for c, a in zip(sc_clips, sc_audio, strict=True):
                if is_negative(c.label):
                    by_group.setdefault(f"sc{order[c.speaker]}", []).append(a)
            word_stream = stream_part("word-stream", [_files_key(sc_clips), r.sc_folds],
                                      sorted(by_group.items()), T.WORD_GAP_S)
        srng = np.random.default_rng(seed + 7)
        pieces = 400 if r.n_music >= 100 else 30   # about 10 minutes of each (1.5 s a piece)
        sound_streams = [(k, [gen(srng) for _ in range(pieces)])
                         for k, gen in (("music", A.music), ("noise", A.noise))]
        sound_stream = stream_part("sound-stream", [synth_key, pieces], sound_streams,
                                   (0.0, 1.0))
    ds = DataSet(fsdd, sc, synth, heldout, wpart, hpart, npart, talk=talk_part,
                 sc_extra=sc_extra,
                 word_stream=word_stream, sound_stream=sound_stream, clips=clips, counts={
        "fsdd_recordings": len(clips), "fsdd_speakers": len(set(fsdd.group)),
        "speech_commands_digits": int(sum(not is_negative(c.label) for c in sc_clips)),
        "speech_commands_words": int(sum(is_negative(c.label) for c in sc_clips)),
        "speech_commands_speakers": len({c.speaker for c in sc_clips}),
        "synthetic_digits": len(dig_tr.audio), "heldout_voice_digits": len(dig_ho.audio),
        "synthetic_words": len(words.audio), "homophones": len(homo.audio),
        "sounds": len(sounds),
        **({"talk_speakers": len(talk_part.hours), "talk_segments": len(talk_part.x),
            "talk_hours": round(sum(talk_part.hours.values()), 2)} if talk_part else {})})
    log(f"data: {len(clips)} FSDD recordings of {len(set(fsdd.group))} speakers, "
        f"{len(sc_clips)} Speech Commands clips, {len(dig_tr.audio)} synthetic digits "
        f"(+{len(dig_ho.audio)} of held-out voices), {len(words.audio)} synthetic words, "
        f"{len(sounds)} sounds; in {time.perf_counter() - t0:.0f} s")
    return ds


# --- folds --------------------------------------------------------------------------------------
def _fit_fold(args: tuple) -> tuple:
    ds, fsdd_tr, sc_tr, talk_tr, r, seed = args
    xh, yh, xr, yr = ds.train_sets(fsdd_tr, sc_tr, talk_tr)
    return fit_head(xh, yh, r, seed), fit_rejector(xr, yr, r, seed)


def sc_speaker_groups(speakers: list[str], k: int) -> list[list[str]]:
    """Speakers in k groups (seeded permutation of the sorted ids)."""
    spk = np.array(sorted(speakers))
    perm = np.random.default_rng(0).permutation(len(spk))
    return [sorted(spk[perm[i::k]]) for i in range(min(k, len(spk)))]


def sc_folds(ds: DataSet, k: int = 5) -> list[list[str]]:
    """Speech Commands speakers in k groups (seeded permutation of the sorted ids)."""
    if ds.sc is None:
        return []
    return sc_speaker_groups(sorted({str(s) for s in ds.sc.group}), k)


def _scores(models: tuple, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return head_scores(models[0], x), rejector_logit(models[1], x)


def loso(ds: DataSet, r: Recipe, seed: int = 0, workers: int = 2, log=print) -> dict[str, Any]:
    """The full report; numbers are fractions in 0..1."""
    t0 = time.perf_counter()
    speakers = ds.speakers
    if len(speakers) < 2:
        raise SystemExit("evaluate: leave-one-speaker-out needs at least two speakers")
    sc_all = sorted({str(s) for s in ds.sc.group}) if ds.sc is not None else []
    groups = sc_folds(ds, r.sc_folds)
    talk_all = sorted(ds.talk.hours) if ds.talk is not None else []
    talk_groups = sc_speaker_groups(talk_all, len(groups)) if groups and talk_all else []
    jobs = [(ds, [o for o in speakers if o != s], sc_all, talk_all, r, seed) for s in speakers]
    jobs += [(ds, speakers, [s for s in sc_all if s not in g],
              [s for s in talk_all if not talk_groups or s not in talk_groups[i]], r, seed)
             for i, g in enumerate(groups)]
    with Pool(max(1, min(workers, len(jobs)))) as p:
        models = p.map(_fit_fold, jobs)
    # out of fold: FSDD by speaker (every condition), Speech Commands by speaker group
    f = ds.fsdd
    oof_z = {c: np.zeros((len(f.label), 10)) for c in f.cond}
    oof_l = {c: np.zeros(len(f.label)) for c in f.cond}
    for s, m in zip(speakers, models, strict=False):
        te = f.group == s
        for c in f.cond:
            oof_z[c][te], oof_l[c][te] = _scores(m, f.cond[c][te])
    sc_z, sc_l = np.zeros((0, 10)), np.zeros(0)
    sc_y, sc_g = np.zeros(0, int), np.zeros(0, str)
    if ds.sc is not None:
        sc_z = np.zeros((len(ds.sc.label), 10))
        sc_l = np.zeros(len(ds.sc.label))
        for g, m in zip(groups, models[len(speakers):], strict=True):
            te = np.isin(ds.sc.group, g)
            sc_z[te], sc_l[te] = _scores(m, ds.sc.x[te])
        sc_y, sc_g = ds.sc.label, ds.sc.group
    loso_models = models[:len(speakers)]
    negs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, x in held_out_negatives(ds).items():
        zs = [_scores(m, x) for m in loso_models]
        negs[name] = (np.concatenate([z for z, _ in zs]), np.concatenate([lg for _, lg in zs]))
    ho = [_scores(m, ds.heldout_voices.x) for m in loso_models]
    sc_models = models[len(speakers):]
    # streams, out of fold: talk by held-out talk group, Speech Commands words by held-out
    # speaker group, music and noise by every speaker-group model (averaged)
    stream_scores: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    if ds.talk is not None and talk_groups:
        for g, m in zip(talk_groups, sc_models, strict=True):
            te = np.isin(ds.talk.group, g)
            stream_scores.setdefault("talk", []).append((te, *_scores(m, ds.talk.x[te])))
    if ds.word_stream is not None:
        for i, m in enumerate(sc_models):
            te = ds.word_stream.group == f"sc{i}"
            stream_scores.setdefault("words", []).append((te, *_scores(m, ds.word_stream.x[te])))
    if ds.sound_stream is not None and sc_models:
        for m in sc_models:
            every = np.ones(len(ds.sound_stream.x), bool)
            stream_scores.setdefault("sounds", []).append((every, *_scores(m, ds.sound_stream.x)))

    # calibration on the real out-of-fold scores: head temperature on digits; Platt on all
    y_f = f.label
    is_dig_sc = sc_y != UNKNOWN_INDEX
    z_dig = np.concatenate([oof_z["clean"], sc_z[is_dig_sc]])
    y_dig = np.concatenate([y_f, sc_y[is_dig_sc]])
    t = fit_temperature(z_dig, y_dig)
    lg_all = np.concatenate([oof_l["clean"], sc_l])
    in_all = np.concatenate([np.ones(len(y_f)), is_dig_sc])
    platt = fit_platt(lg_all, in_all)

    def prob(z: np.ndarray, lg: np.ndarray, tt: float = t, pl: tuple = platt) -> np.ndarray:
        return combine(softmax(z, tt), sigmoid(pl[0] * lg + pl[1]))

    p_f = prob(oof_z["clean"], oof_l["clean"])
    p_sc = prob(sc_z, sc_l)
    y_sc = np.where(is_dig_sc, sc_y, UNKNOWN_INDEX)
    # one threshold, out of fold, on FSDD + Speech Commands pooled (real voices, real words)
    p_pool, y_pool = np.concatenate([p_f, p_sc]), np.concatenate([y_f, y_sc])
    thr_pooled, cov_pool, prec_pool = threshold_for_precision(p_pool, y_pool,
                                                              r.target_precision)
    # thresholds that hold for the worst held-out group (an FSDD speaker, a Speech Commands
    # speaker group with its digits and words)
    g_pool = np.concatenate([f.group.astype(str), np.array(
        [next(f"sc{i}" for i, gg in enumerate(groups) if g in gg) for g in sc_g], dtype=str)])
    p_pool = p_pool.astype(np.float32)  # as stored in oof.npz: the choice replays exactly
    thr, th_vec = choose_thresholds(p_pool, y_pool, g_pool, r.target_precision,
                                    per_class=r.per_class_thresholds,
                                    max_words=r.max_word_rate)
    nested_th = nested_thresholds(p_pool, y_pool, g_pool, r.target_precision,
                                  r.per_class_thresholds, r.max_word_rate)

    # nested calibration for an honest ECE: each FSDD speaker / SC group calibrated on the rest
    src = np.r_[f.group, np.array([f"sc{i}" for g in sc_g for i, gg in enumerate(groups)
                                   if g in gg])] if len(sc_g) else f.group.copy()
    z_pool = np.concatenate([oof_z["clean"], sc_z])
    l_pool = np.concatenate([oof_l["clean"], sc_l])
    nested = np.zeros_like(p_pool)
    for s in np.unique(src):
        o = src != s
        od = o & (y_pool != UNKNOWN_INDEX)
        nested[~o] = prob(z_pool[~o], l_pool[~o], fit_temperature(z_pool[od], y_pool[od]),
                          fit_platt(l_pool[o], (y_pool[o] != UNKNOWN_INDEX).astype(int)))
    head_only = softmax(oof_z["clean"], t)

    def accepted(p: np.ndarray) -> np.ndarray:
        return accepted_at(p, th_vec)

    conditions = {}
    for c in f.cond:
        per = {s: float((oof_z[c][f.group == s].argmax(1) == y_f[f.group == s]).mean())
               for s in speakers}
        pc = prob(oof_z[c], oof_l[c])
        a = accepted(pc)
        conditions[c] = {"mean": float(np.mean(list(per.values()))),
                         "worst": float(min(per.values())), "per_speaker": per,
                         "coverage": float(a.mean()),
                         "precision": float((pc.argmax(1) == y_f)[a].mean()) if a.any()
                         else None}
    a_f = accepted(p_f)
    correct_f = p_f.argmax(1) == y_f
    pred = p_f.argmax(1)
    confusion = np.zeros((len(DIGITS), len(CLASSES)), int)
    np.add.at(confusion, (y_f, pred), 1)
    per_class = {d: float(confusion[i, i] / max(1, confusion[i].sum()))
                 for i, d in enumerate(DIGITS)}
    accents: dict[str, list[float]] = {}
    for s in speakers:
        accents.setdefault(ACCENTS.get(s, "unknown"), []).append(
            conditions["clean"]["per_speaker"][s])
    fa_by_kind = {k: float(accepted(prob(z, lg)).mean()) for k, (z, lg) in negs.items()}
    n_neg = {k: int(len(z) // max(1, len(loso_models))) for k, (z, _) in negs.items()}
    main_kinds = [k for k in fa_by_kind if k != "homophones"]
    fa_all = float(np.sum([fa_by_kind[k] * n_neg[k] for k in main_kinds]) /
                   max(1, sum(n_neg[k] for k in main_kinds)))
    by_group = {g: {"precision": pr, "accepted": n, "coverage": cov, "words_accepted": w,
                    "source": "fsdd" if g in speakers else "speech-commands"}
                for g, (pr, n, cov, w) in group_precision(p_pool, y_pool, g_pool,
                                                          th_vec).items()}
    worst = min((v["precision"] for v in by_group.values() if v["precision"] is not None),
                default=None)
    nested_worst = min((v["precision"] for v in nested_th.values()
                        if v["precision"] is not None), default=None)
    src_pool = np.where(np.isin(g_pool, speakers), "fsdd", "speech-commands")
    by_source = {k: {"precision": v[0], "accepted": v[1], "coverage": v[2],
                     "words_accepted": v[3]}
                 for k, v in group_precision(p_pool, y_pool, src_pool, th_vec).items()}
    nested_words = max((v["words_accepted"] for v in nested_th.values()
                        if v["words_accepted"] is not None), default=None)
    false_activations = stream_report(ds, stream_scores, prob, th_vec)
    streams_oof = {name: [(te, prob(z, lg)) for te, z, lg in folds]
                   for name, folds in stream_scores.items()}  # for offline study (not saved)
    p_ho = [prob(z, lg) for z, lg in ho]
    ho_acc = float(np.mean([(softmax(z, t).argmax(1) == ds.heldout_voices.label).mean()
                            for z, _ in ho])) if len(ds.heldout_voices.label) else None
    report: dict[str, Any] = {
        "method": "leave-one-speaker-out",
        "speakers": speakers,
        "accuracy": conditions["clean"]["mean"],
        "worst_speaker": conditions["clean"]["worst"],
        "conditions": conditions,
        "per_class": per_class,
        "per_accent": {a: float(np.mean(v)) for a, v in accents.items()},
        "confusion": {"rows": list(DIGITS), "columns": list(CLASSES),
                      "counts": confusion.tolist()},
        "calibration": {"temperature": t, "platt": list(platt),
                        "ece_uncalibrated": ece(combine(softmax(z_pool), sigmoid(l_pool)),
                                                y_pool),
                        "ece": ece(nested, y_pool),
                        "ece_fsdd_digits": ece(nested[:len(y_f)], y_f),
                        "method": "head: temperature scaling; rejector: Platt scaling; both "
                        "on out-of-fold scores of real voices (FSDD + Speech Commands); ECE "
                        "of the 11-way output with a nested fit"},
        "threshold": {"value": thr, "target_precision": r.target_precision,
                      "per_class": {d: float(v) for d, v in zip(DIGITS, th_vec, strict=True)},
                      "precision": float(correct_f[a_f].mean()) if a_f.any() else None,
                      "coverage": float(a_f.mean()),
                      "by_group": by_group, "worst_group": worst,
                      "by_source": by_source, "nested": nested_th,
                      "nested_worst": nested_worst, "nested_words_worst": nested_words,
                      "max_word_rate": r.max_word_rate,
                      "pooled_threshold": thr_pooled,
                      "pooled_precision": prec_pool, "pooled_digit_coverage": cov_pool,
                      "chosen_on": "out-of-fold FSDD (each speaker a group) + Speech Commands "
                      "(each held-out speaker group, digits and words): in every group the "
                      "decisions acted on for spoken digits reach the target precision and at "
                      "most max_word_rate of the non-digit words are acted on; nested: each "
                      "group scored at thresholds chosen without it"},
        "false_activations": false_activations,
        "rejected_as_unknown": float((pred == UNKNOWN_INDEX).mean()),
        "negatives": {"n": int(sum(n_neg[k] for k in main_kinds)), "false_accepts": fa_all,
                      "by_kind": fa_by_kind, "counts": n_neg,
                      "note": "held out: synthetic words never trained on (incl. near-digit "
                      "words), babble/music/noise/TV made from held-out voices; homophones "
                      "(for, too, to, ate, won, nein) sound like digits and are not counted"},
        "heldout_voices": {"n": int(len(ds.heldout_voices.label)), "accuracy": ho_acc,
                           "coverage": float(np.mean([accepted(p).mean() for p in p_ho]))
                           if p_ho and len(ds.heldout_voices.label) else None,
                           "voices": list(S.HELDOUT_VOICES)},
        "open_set_cost": open_set_cost(head_only, p_f, y_f, p_sc, y_sc, sc_z, t, thr_pooled,
                                       r.target_precision),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if ds.sc is not None:
        a_sc = accepted(p_sc)
        dig = y_sc != UNKNOWN_INDEX
        ok = a_sc & (p_sc.argmax(1) == y_sc)
        words_acc = {str(w): float(a_sc[ds.sc.kind == w].mean())
                     for w in np.unique(ds.sc.kind[~dig])}
        report["speech_commands"] = {
            "speakers": len(sc_all), "folds": len(groups), "digits": int(dig.sum()),
            "words": int((~dig).sum()),
            "closed_set_accuracy": float((sc_z[dig].argmax(1) == sc_y[dig]).mean()),
            "digits_covered": float(ok[dig].mean()),
            "precision": float(ok[a_sc].sum() / max(1, a_sc.sum())),
            "words_accepted": float(a_sc[~dig].mean()), "words_accepted_by_word": words_acc}
    report["_streams"] = streams_oof
    report["_oof"] = {"probabilities": p_f.astype(np.float32), "labels": y_f,
                      "pool_probabilities": p_pool.astype(np.float32), "pool_labels": y_pool,
                      "pool_groups": g_pool}
    sc_rep = report.get("speech_commands", {})
    log(f"evaluate: LOSO clean {report['accuracy']:.3f} (worst {report['worst_speaker']:.3f}), "
        f"white 10 dB {conditions['white10']['mean']:.3f}, babble 10 dB "
        f"{conditions['babble10']['mean']:.3f}; held-out voices {ho_acc or 0:.3f}; ECE "
        f"{report['calibration']['ece']:.3f}; threshold {thr:.3f}: precision "
        f"{report['threshold']['precision'] or 0:.3f} coverage "
        f"{report['threshold']['coverage']:.3f}; false accepts {fa_all:.3f}; Speech Commands "
        "digits covered "
        f"{sc_rep.get('digits_covered', float('nan')):.3f}, words accepted "
        f"{sc_rep.get('words_accepted', float('nan')):.3f}")
    return report


def stream_report(ds: DataSet, scores: dict[str, list[tuple]], prob, th: np.ndarray
                  ) -> dict[str, Any]:
    """False activations per hour of each stream, out of fold: by the model alone (threshold)
    and with the addressing rule the daemon applies (agent/recognition/decision.py)."""
    rule = Addressing()
    out: dict[str, Any] = {}
    parts = {"talk": ds.talk, "words": ds.word_stream, "sounds": ds.sound_stream}
    for name, folds in scores.items():
        part = parts[name]
        addressed = part.addressed(rule)
        kinds = ["music", "noise"] if name == "sounds" else [name]
        for kind in kinds:
            acc_model = acc_rule = n_seg = 0.0
            for te, z, lg in folds:
                a = accepted_at(prob(z, lg), th)
                k = part.group[te] == kind if name == "sounds" else np.ones(len(a), bool)
                acc_model += float((a & k).sum())
                acc_rule += float((a & k & addressed[te]).sum())
                n_seg += float(k.sum())
            reps = len(folds) if name == "sounds" else 1   # every model saw the sound streams
            hours = part.hours[kind] if name == "sounds" else sum(part.hours.values())
            seg_mask = part.group == kind if name == "sounds" else np.ones(len(part.x), bool)
            out[kind] = {
                "hours": hours, "segments": int(n_seg / reps),
                "forced_cut": float(part.forced[seg_mask].mean()) if seg_mask.any() else 0.0,
                "addressed": float(addressed[seg_mask].mean()) if seg_mask.any() else 0.0,
                "per_hour_model": acc_model / reps / hours,
                "per_hour": acc_rule / reps / hours}
    out["rule"] = {"max_length_s": rule.max_length_s,
                   "min_quiet_before_s": rule.min_quiet_before_s,
                   "act_on_forced_cut": rule.act_on_forced_cut}
    return out


def held_out_negatives(ds: DataSet) -> dict[str, np.ndarray]:
    out = {"synthetic words": ds.words.x[ds.words.group == "B"]}
    near = np.isin(ds.words.kind, S.NEAR_DIGIT_WORDS) & (ds.words.group == "B")
    if near.any():
        out["near-digit words"] = ds.words.x[near]
        out["synthetic words"] = ds.words.x[(ds.words.group == "B") & ~near]
    for k in ("babble", "music", "noise", "tv"):
        m = (ds.sounds.group == "B") & (ds.sounds.kind == k)
        if m.any():
            out[k] = ds.sounds.x[m]
    if len(ds.homophones.x):
        out["homophones"] = ds.homophones.x
    return out


def open_set_cost(head_only: np.ndarray, p_f: np.ndarray, y_f: np.ndarray, p_sc: np.ndarray,
                  y_sc: np.ndarray, sc_z: np.ndarray, t: float, thr: float,
                  target: float) -> dict[str, Any]:
    """What the rejector costs in digit coverage on held-out speakers, and what it buys."""
    out: dict[str, Any] = {}
    thr_h, cov_h, prec_h = threshold_for_precision(head_only, y_f, target)
    out["head_only_fsdd"] = {"threshold": thr_h, "coverage": cov_h, "precision": prec_h}
    a = (p_f.argmax(1) != UNKNOWN_INDEX) & (p_f.max(1) >= thr)
    out["with_rejector_fsdd"] = {"threshold": thr, "coverage": float(a.mean())}
    if len(y_sc):
        dig = y_sc != UNKNOWN_INDEX
        ph = softmax(sc_z, t)
        ah = ph.max(1) >= thr_h
        out["head_only_speech_commands"] = {
            "digits_covered": float((ah & (ph.argmax(1) == y_sc))[dig].mean()),
            "words_accepted": float(ah[~dig].mean())}
        ar = (p_sc.argmax(1) != UNKNOWN_INDEX) & (p_sc.max(1) >= thr)
        out["with_rejector_speech_commands"] = {
            "digits_covered": float((ar & (p_sc.argmax(1) == y_sc))[dig].mean()),
            "words_accepted": float(ar[~dig].mean())}
    return out


def render_text(report: dict[str, Any]) -> str:
    """The report for a person: every figure the model card quotes."""
    c = report["conditions"]
    out = [f"leave-one-speaker-out over {', '.join(report['speakers'])}"]
    for k, label in (("clean", "clean"), ("white10", "white noise 10 dB SNR"),
                     ("babble10", "babble 10 dB SNR")):
        per = ", ".join(f"{s} {v:.3f}" for s, v in c[k]["per_speaker"].items())
        out.append(f"accuracy {label}: {c[k]['mean']:.3f} (worst {c[k]['worst']:.3f}; {per}); "
                   f"coverage at the threshold {c[k]['coverage']:.3f}")
    out.append("per accent: " + ", ".join(f"{a} {v:.3f}"
                                          for a, v in report["per_accent"].items()))
    out.append("per class: " + ", ".join(f"{d} {v:.3f}" for d, v in report["per_class"].items()))
    ho = report["heldout_voices"]
    if ho["accuracy"] is not None:
        out.append(f"full-band synthetic voices never trained on ({ho['n']} clips): accuracy "
                   f"{ho['accuracy']:.3f}, coverage {ho['coverage']:.3f}")
    cal, th, neg = report["calibration"], report["threshold"], report["negatives"]
    out.append(f"calibration: temperature {cal['temperature']:.3f}, Platt a={cal['platt'][0]:.3f}"
               f" b={cal['platt'][1]:.3f}; ECE {cal['ece']:.4f} (uncalibrated "
               f"{cal['ece_uncalibrated']:.4f}; FSDD digits {cal['ece_fsdd_digits']:.4f})")
    out.append(f"thresholds for precision {th['target_precision']} on the worst held-out "
               f"group: {th['value']:.4f}; per class " + ", ".join(
                   f"{d} {v:.3f}" for d, v in th["per_class"].items()) +
               f"; FSDD precision {th['precision'] or 0:.4f}, coverage {th['coverage']:.4f}")

    def prec(v: dict) -> str:
        p = v["precision"]
        w = v.get("words_accepted")
        return f"{'n/a' if p is None else f'{p:.4f}'} ({v['accepted']} acted on, digits " \
            f"covered {v['coverage']:.3f}" + ("" if w is None else f", words acted on {w:.4f}") \
            + ")"
    out.append("precision by held-out group: " + "; ".join(
        f"{g} {prec(v)}" for g, v in th["by_group"].items()) +
        f"; worst {th['worst_group'] or 0:.4f}")
    out.append("precision by source: " + "; ".join(f"{g} {prec(v)}"
                                                   for g, v in th["by_source"].items()))
    out.append("precision by held-out group at thresholds chosen without it: " + "; ".join(
        f"{g} {prec(v)}" for g, v in th["nested"].items()) +
        f"; worst {th['nested_worst'] or 0:.4f}")
    fa = report.get("false_activations", {})
    if fa:
        rule = fa["rule"]
        out.append(f"false activations per hour (out of fold; addressing: speech span ≤ "
                   f"{rule['max_length_s']} s, ≥ {rule['min_quiet_before_s']} s quiet before, "
                   f"force-cut {'acts' if rule['act_on_forced_cut'] else 'never acts'}): " +
                   "; ".join(f"{k} {v['per_hour']:.2f} (model alone {v['per_hour_model']:.2f}; "
                             f"{v['segments']} segments in {v['hours']:.2f} h, "
                             f"{100 * v['addressed']:.0f} % addressed)"
                             for k, v in fa.items() if k != "rule"))
    out.append(f"false accepts on {neg['n']} held-out negatives: {neg['false_accepts']:.4f} (" +
               ", ".join(f"{k} {v:.3f}" for k, v in neg["by_kind"].items()) + ")")
    sc = report.get("speech_commands")
    if sc:
        out.append(f"Speech Commands, {sc['speakers']} speakers in {sc['folds']} held-out "
                   f"groups: closed-set accuracy {sc['closed_set_accuracy']:.3f}; digits covered "
                   f"{sc['digits_covered']:.3f} at precision {sc['precision']:.4f}; non-digit "
                   f"words accepted {sc['words_accepted']:.4f}")
    cost = report["open_set_cost"]
    out.append("open-set cost: " + "; ".join(
        f"{k} " + ", ".join(f"{kk} {vv:.3f}" for kk, vv in v.items() if vv is not None)
        for k, v in cost.items()))
    out.append("confusion (rows spoken, columns decided " + " ".join(
        report["confusion"]["columns"]) + "):")
    for d, row in zip(report["confusion"]["rows"], report["confusion"]["counts"], strict=True):
        out.append(f"  {d}: " + " ".join(f"{v:4d}" for v in row))
    return "\n".join(out)
