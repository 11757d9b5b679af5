"""The personal state on disk: `STATE_DIR/personal/`, 0700, files 0600, never published.

* `enrollment.npz`: enrolled head inputs and labels (agent.personal.enrollment), written by
  `edge-voice-agent enroll`, removed by `enroll --forget`;
* `adaptation.npz`: the device's running mean of head inputs (agent.personal.adaptation) with
  the model build, front end and microphone it belongs to.

Writes are atomic (temporary file, fsync, rename, fsync of the folder): a power cut leaves the
old file or the new one. A file that cannot be read back is corrupt: it is moved aside
(`*.corrupt-STAMP`, kept for inspection), reported once through StateHealth (one log line, the
`state_files_quarantined` count and alarm), and the device starts that part afresh. A failed
write is counted (`state_write_errors`) and the state kept in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from agent.atomic import atomic_write
from agent.daemon.state_health import StateHealth, describe_error
from agent.personal.adaptation import AdaptationState
from agent.personal.enrollment import Enrollment
from agent.recognition.model import Manifest

log = logging.getLogger("edge-voice-agent")

FOLDER = "personal"
ENROLLMENT = "enrollment.npz"
ADAPTATION = "adaptation.npz"
FORMAT = 1


def frontend_id(m: Manifest) -> str:
    """What makes head inputs comparable: the front end's parameters and graph hashes."""
    parts = [json.dumps(m.frontend.to_dict(), sort_keys=True)]
    for role in ("melspectrogram", "embedding"):
        c = m.component(role)
        parts.append(c.sha256 if c is not None else "")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AdaptationKey:
    """What an adaptation state belongs to; any difference starts it afresh."""

    model: str       # "name@version sha256": another version or build starts afresh
    frontend: str
    microphone: str

    def differs(self, other: AdaptationKey) -> str:
        """Why `other` is not this key ("" when equal), for the log line."""
        if other.model != self.model:
            return "the model changed"
        if other.frontend != self.frontend:
            return "the front end changed"
        if other.microphone != self.microphone:
            return f"another microphone ({other.microphone} → {self.microphone})"
        return ""


class Corrupt(Exception):
    """A state file that exists but cannot be read back."""


def _atomic_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays), mode=0o600)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except PermissionError:
        raise  # unreadable, not corrupt: the caller says so
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise Corrupt(" ".join(str(e).split())[:120] or type(e).__name__) from None


class PersonalStore:
    def __init__(self, state_dir: str | os.PathLike[str],
                 health: StateHealth | None = None) -> None:
        self.root = Path(state_dir) / FOLDER
        self.health = health
        self.enrollment_path = self.root / ENROLLMENT
        self.adaptation_path = self.root / ADAPTATION

    # --- corrupt files ------------------------------------------------------------------
    def _quarantine(self, path: Path, reason: str, consequence: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        dest = path.with_name(f"{path.name}.corrupt-{stamp}")
        n = 1
        while dest.exists():
            n += 1
            dest = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
        try:
            os.replace(path, dest)
        except OSError as e:
            log.error("corrupt state file %s (%s) cannot be moved aside (%s); %s", path, reason,
                      e.strerror, consequence)
            return
        if self.health is not None:
            self.health.quarantine(path, dest, reason, consequence)
        else:
            log.error("corrupt state file %s (%s) moved aside to %s; %s", path, reason, dest,
                      consequence)

    # --- enrollment ---------------------------------------------------------------------
    def load_enrollment(self) -> Enrollment | None:
        """The enrollment, None when there is none (or it was corrupt and moved aside)."""
        path = self.enrollment_path
        if not path.exists():
            return None
        try:
            z = read_npz(path)
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise Corrupt(f"format {meta.get('format')!r}, expected {FORMAT}")
            return Enrollment(x=z["x"].astype(np.float32),
                              labels=tuple(str(v) for v in z["labels"]),
                              frontend=str(meta["frontend"]), model=str(meta["model"]))
        except (Corrupt, KeyError, ValueError, TypeError) as e:
            self._quarantine(path, " ".join(str(e).split())[:120] or type(e).__name__,
                             "decisions run without enrollment; enroll again with "
                             "'edge-voice-agent enroll'")
            return None

    def save_enrollment(self, e: Enrollment) -> Path:
        """Raises OSError when the state directory refuses the write (the CLI reports it)."""
        meta = {"format": FORMAT, "frontend": e.frontend, "model": e.model}
        _atomic_npz(self.enrollment_path, {"meta": np.array(json.dumps(meta)),
                                           "x": e.x.astype(np.float32),
                                           "labels": np.array(e.labels)})
        return self.enrollment_path

    def forget(self) -> list[Path]:
        """Remove the enrollment (and moved-aside corrupt copies of it); the removed paths."""
        gone = []
        if self.root.is_dir():
            for p in sorted(self.root.glob(ENROLLMENT + "*")):
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone

    # --- adaptation ---------------------------------------------------------------------
    def load_adaptation(self, key: AdaptationKey, dim: int) -> tuple[AdaptationState, str]:
        """(state, note): the saved state when it belongs to `key`, else a fresh one."""
        path = self.adaptation_path
        if not path.exists():
            return AdaptationState.fresh(dim), "no adaptation state yet: learning"
        try:
            z = read_npz(path)
            meta = json.loads(str(z["meta"]))
            mean = z["mean"].astype(np.float64)
            n = int(meta["n"])
            saved = AdaptationKey(str(meta["model"]), str(meta["frontend"]),
                                  str(meta["microphone"]))
            if meta.get("format") != FORMAT or mean.shape != (dim,) or n < 0 or \
                    not np.all(np.isfinite(mean)):
                raise Corrupt("wrong format, shape or values")
        except (Corrupt, KeyError, ValueError, TypeError) as e:
            self._quarantine(path, " ".join(str(e).split())[:120] or type(e).__name__,
                             "device adaptation starts afresh")
            return AdaptationState.fresh(dim), "adaptation state was corrupt: learning afresh"
        why = key.differs(saved)
        if why:
            return AdaptationState.fresh(dim), f"adaptation starts afresh: {why}"
        return AdaptationState(mean, n), f"adaptation resumed ({n} utterances)"

    def save_adaptation(self, state: AdaptationState, key: AdaptationKey) -> bool:
        meta = {"format": FORMAT, "n": int(state.n), "model": key.model,
                "frontend": key.frontend, "microphone": key.microphone}
        try:
            _atomic_npz(self.adaptation_path, {"meta": np.array(json.dumps(meta)),
                                               "mean": state.mean.astype(np.float32)})
        except OSError as e:
            if self.health is not None:
                self.health.write_failed("adaptation", self.adaptation_path, e,
                                         "device adaptation goes on in memory and is saved "
                                         "when the disk takes data again")
            else:
                log.warning("adaptation state %s not saved (%s)", self.adaptation_path,
                            describe_error(e))
            return False
        if self.health is not None:
            self.health.write_ok("adaptation", self.adaptation_path)
        return True
