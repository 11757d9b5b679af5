"""Review samples: the audio of hard cases, kept on the device for a person to label.

Opt-in (`samples.enabled`, off by default). When on, the audio of abstained utterances,
accepted ones below `samples.confidence_below`, and utterances where a shadow candidate
disagreed with the active model are written to `STATE_DIR/samples/` — WAV plus a small JSON
with the device's own guess — as files only the agent's user can read (0600, directory 0700).
Nothing here is ever published: telemetry never reads this folder. Bounded by count, bytes and
age (oldest deleted first); `samples list | export DIR | purge` manage it, and uninstalling
deletes it even when the rest of the state is kept.

Writing happens after the active decisions of a block were emitted (the service calls
`flush()`), so the disk never delays a decision; a failed write is counted and logged once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.errors import AgentError
from agent.recognition.vocabulary import word_problem

log = logging.getLogger("edge-voice-agent.samples")

SAMPLES_DIR = "samples"
EXPORT_README = "README-LABELLING.txt"


@dataclass(frozen=True)
class Sample:
    wav: Path
    meta: dict[str, Any]
    bytes: int
    mtime: float


def _open_private(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


class SampleStore:
    """The samples folder and its bounds; `clock` is wall time (file ages), injectable."""

    def __init__(self, state_dir: str | Path, *, max_count: int = 200,
                 max_bytes: int = 20 * 1024 * 1024, max_age_s: float = 14 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.dir = Path(state_dir) / SAMPLES_DIR
        self.max_count, self.max_bytes, self.max_age_s = max_count, max_bytes, max_age_s
        self.clock = clock
        self.errors = 0
        self._seq = 0

    @classmethod
    def from_config(cls, cfg: Any) -> SampleStore:
        s = cfg.samples
        return cls(cfg.state_path(), max_count=s.max_count, max_bytes=s.max_bytes,
                   max_age_s=s.max_age_s)

    def save(self, audio: np.ndarray, rate: int, meta: dict[str, Any]) -> Path | None:
        """Write one sample (0600) and enforce the bounds; None when it could not be written."""
        import soundfile as sf

        now = self.clock()
        self._seq += 1
        stem = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}-{os.getpid()}-{self._seq:05d}"
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.dir, 0o700)
            wav = self.dir / f"{stem}.wav"
            with os.fdopen(_open_private(wav), "wb") as f:
                sf.write(f, np.clip(audio, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
            with os.fdopen(_open_private(self.dir / f"{stem}.json"), "w") as f:
                json.dump({**meta, "rate": rate, "saved_utc": now}, f)
            os.utime(wav, (now, now))
        except OSError as e:
            self.errors += 1
            if self.errors == 1:
                log.warning("review sample not written to %s (%s); further failures are only "
                            "counted", self.dir, e.strerror)
            return None
        self.enforce()
        return wav

    def list(self) -> list[Sample]:
        """Oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for wav in self.dir.glob("*.wav"):
            try:
                st = wav.stat()
                side = wav.with_suffix(".json")
                meta = json.loads(side.read_text()) if side.is_file() else {}
                size = st.st_size + (side.stat().st_size if side.is_file() else 0)
            except (OSError, ValueError):
                continue
            out.append(Sample(wav, meta, size, st.st_mtime))
        return sorted(out, key=lambda s: (s.mtime, s.wav.name))

    def _delete(self, s: Sample) -> None:
        s.wav.unlink(missing_ok=True)
        s.wav.with_suffix(".json").unlink(missing_ok=True)

    def enforce(self) -> int:
        """Delete by age, then oldest first until count and bytes fit; returns how many."""
        items = self.list()
        now = self.clock()
        removed = 0
        keep = []
        for s in items:
            if now - s.mtime > self.max_age_s:
                self._delete(s)
                removed += 1
            else:
                keep.append(s)
        total = sum(s.bytes for s in keep)
        while keep and (len(keep) > self.max_count or total > self.max_bytes):
            s = keep.pop(0)
            total -= s.bytes
            self._delete(s)
            removed += 1
        return removed

    def purge(self) -> int:
        n = len(self.list())
        if self.dir.exists():
            shutil.rmtree(self.dir)
        return n

    def export(self, dest: str | Path, speaker: str) -> int:
        """Copy every sample to `dest` as `<speaker>-<take>.wav` (+ its JSON) with labelling
        instructions: renamed to `<word>_<speaker>_<take>.wav` (a word of the model's vocabulary,
        agent.recognition.vocabulary), the folder is accepted by
        `edge-voice-agent train --data` as an extra source. Unrenamed files are ignored there."""
        dest = Path(dest)
        items = self.list()
        if not items:
            raise AgentError(f"no review samples in {self.dir}; enable samples.enabled and let "
                             "the agent run first")
        speaker = speaker.replace("_", "-")
        guess = next((str(s.meta.get("device_label")) for s in items
                      if s.meta.get("device_label") != "unknown"
                      and word_problem(s.meta.get("device_label")) is None), "yes")
        dest.mkdir(parents=True, exist_ok=True)
        for take, s in enumerate(items):
            name = f"{speaker}-{take}"
            shutil.copyfile(s.wav, dest / f"{name}.wav")
            os.chmod(dest / f"{name}.wav", 0o600)
            (dest / f"{name}.json").write_text(json.dumps(s.meta))
        (dest / EXPORT_README).write_text(
            "Review samples exported from an edge-voice-agent device (audio of real people: "
            "handle with care, delete when done).\n"
            "Listen to each <speaker>-<take>.wav and rename it to <word>_<speaker>_<take>.wav, "
            "<word> being what was said, one of the model's words (for example "
            f"{speaker}-0.wav -> {guess}_{speaker}_0.wav); delete files that hold none of its "
            "words. The .json next to each file holds the device's own guess.\n"
            "Then: edge-voice-agent train --data FSDD_FOLDER --data THIS_FOLDER (these files "
            "become the speaker 'field': held out together in evaluate, a row of the model "
            "card)\n")
        return len(items)


class SampleRecorder:
    """Pipeline observer: picks hard cases, writes them in `flush()` (after the decisions)."""

    def __init__(self, store: SampleStore, confidence_below: float) -> None:
        self.store = store
        self.confidence_below = confidence_below
        self._pending: list[tuple[np.ndarray, int, dict[str, Any]]] = []

    def on_block(self, clock_s: float, stats: Any, dropped: int) -> None:
        pass

    def on_outcome(self, o: Any) -> None:
        d = o.decision
        if d.label is None:
            return
        if not d.accepted:
            reason = "abstained"
        elif d.confidence is not None and d.confidence < self.confidence_below:
            reason = "low_confidence"
        else:
            return
        self._queue(o, reason, {})

    def on_shadow(self, o: Any, r: Any) -> None:
        """A shadow candidate's result; disagreements are worth a person's ear."""
        if not r.agrees and (o.decision.accepted or r.accepted):
            self._queue(o, "shadow_disagreement", {"candidate_label": r.label,
                                                   "candidate_confidence": round(r.confidence,
                                                                                 4)})

    def _queue(self, o: Any, reason: str, extra: dict[str, Any]) -> None:
        d = o.decision
        if any(p[2].get("decided_at") == d.decided_at for p in self._pending):
            return  # the same utterance for two reasons: one file
        self._pending.append((o.utterance.audio, o.utterance.rate, {
            "reason": reason, "device_label": d.label, "device_confidence": d.confidence,
            "accepted": d.accepted, "model": d.model, "decided_at": d.decided_at, **extra}))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for audio, rate, meta in pending:
            self.store.save(audio, rate, meta)


# --- `edge-voice-agent samples list | export DIR | purge` -------------------------------------
def add_parser(sub: Any) -> None:
    s = sub.add_parser("samples", help="review samples kept on this device (opt-in): list, "
                       "export for labelling, purge")
    ssub = s.add_subparsers(dest="samples_command", required=True, metavar="SAMPLES_COMMAND")

    def common(p: Any) -> Any:
        p.add_argument("--config", type=Path, default=None, help="TOML config file")
        p.add_argument("--state-dir", default=None, help="state directory [from the config]")
        return p

    common(ssub.add_parser("list", help="samples with reason, device guess, size and age"))
    e = common(ssub.add_parser("export", help="copy them to DIR for a person to label"))
    e.add_argument("dir", type=Path)
    e.add_argument("--speaker", default=None,
                   help="speaker name in the exported file names [the device id]")
    common(ssub.add_parser("purge", help="delete every sample now"))
    s.set_defaults(samples_func=run)


def run(args: Any) -> int:
    from agent import config as config_mod

    cfg = config_mod.load(args.config, {"agent.state_dir": args.state_dir}
                          if args.state_dir else {})
    store = SampleStore.from_config(cfg)
    if args.samples_command == "list":
        items = store.list()
        now = time.time()
        print(f"{len(items)} samples, {sum(s.bytes for s in items)} bytes in {store.dir} "
              f"(limits: {store.max_count} samples, {store.max_bytes} bytes, "
              f"{store.max_age_s / 86400:g} days; collection "
              f"{'on' if cfg.samples.enabled else 'off'})")
        for s in items:
            m = s.meta
            print(f"{s.wav.name}  {m.get('reason', '?'):20s} device: {m.get('device_label')} "
                  f"({m.get('device_confidence')})  {(now - s.mtime) / 3600:.1f} h old")
    elif args.samples_command == "export":
        from agent.telemetry.device_id import resolve_device_id

        speaker = args.speaker or resolve_device_id(cfg.agent.device_id)
        n = store.export(args.dir, speaker)
        print(f"exported {n} samples to {args.dir}; label them as {args.dir / EXPORT_README} "
              "explains, then purge them here with: edge-voice-agent samples purge")
    else:
        print(f"purged {store.purge()} samples from {store.dir}")
    return 0


# --- closing the loop: labelled exports as an extra training source ---------------------------
FIELD_SPEAKER = "field"


def training_folder(folders: list[Path], root: Path | None = None) -> Path:
    """One folder the training code reads, from the main data folder and labelled exports.

    The first folder is used as it is; every further folder is an extra source whose labelled
    files (`<word>_<speaker>_<take>.wav`, a word as agent.recognition.vocabulary allows) join as
    speaker `field`, so leave-one-speaker-out evaluation holds them out together and reports them as
    their own slice (and the model card lists it). Unlabelled files (`<speaker>-<take>.wav`, as
    exported) are skipped. The folder is made of symbolic links under `root` (default
    $XDG_CACHE_HOME/edge-voice-agent), named by a digest of the sources so a repeated run reuses its
    cached features.
    """
    import hashlib

    if len(folders) == 1:
        return folders[0]
    for f in folders:
        if not f.is_dir():
            raise AgentError(f"data directory {f} does not exist; point --data at a folder of "
                             "recordings")
    key = hashlib.sha256("\0".join(str(f.resolve()) for f in folders).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    out = (root or cache / "edge-voice-agent") / f"sources-{key}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for p in sorted(folders[0].glob("*.wav")):
        (out / p.name).symlink_to(p.resolve())
    n = 0
    for extra in folders[1:]:
        for p in sorted(extra.glob("*.wav")):
            parts = p.stem.split("_")
            if len(parts) != 3 or not parts[2].isdigit() or word_problem(parts[0]):
                continue  # not labelled (yet), or labelled with no vocabulary word
            (out / f"{parts[0]}_{FIELD_SPEAKER}_{n}.wav").symlink_to(p.resolve())
            n += 1
    if n == 0:
        raise AgentError(f"no labelled recordings (<word>_<speaker>_<take>.wav) in "
                         f"{', '.join(map(str, folders[1:]))}; label the exported samples first "
                         f"(see {EXPORT_README} there)")
    log.info("training data: %s + %d labelled field recordings (speaker %r)", folders[0], n,
             FIELD_SPEAKER)
    return out


class DataFolders(argparse.Action):
    """`--data DIR`, given once or more: the main folder, then labelled exports
    (see `training_folder`)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        seen = [*(getattr(namespace, "_data_folders", None) or []), Path(values)]
        namespace._data_folders = seen
        setattr(namespace, self.dest, training_folder(seen) if len(seen) > 1 else seen[0])
