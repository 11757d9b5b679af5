"""The on-device model store: installed models, each in its own slot, and the pointers that say
which one runs.

Layout under the state directory:

    models/slots/<name>@<version>/    manifest.json, the model files, optional calibration/
    models/pointers.json              {"active", "candidate", "previous", "probation", ...}

Why one pointer file: `active`, `candidate` and `previous` change together (an activation moves
active to previous; a rollback moves it back), and a single write-to-temp + fsync + rename makes
that one atomic step — a power cut leaves either the old or the new pointers, never a mix.

Every model is verified twice: on install (copied to a temporary slot, opened with
`agent.model.ModelRunner`, which checks each file against the manifest's sha256, checked for
compatibility, then renamed into place) and again on every load (ModelRunner checks again), so a
slot corrupted on disk is refused instead of run.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import AgentError, one_line
from agent.model import MANIFEST, Manifest, ModelRunner, sha256_file, verify_components
from agent.rollout.compat import check_compatible, thresholds_path

STORE = "models"
SLOTS = "slots"
POINTERS = "pointers.json"


def manifest_digest(model_dir: Path) -> str:
    """The sha256 of a model directory's manifest.json: the identity a rollout command names.
    The manifest lists every model file's own sha256, so this one digest covers the whole
    model (whatever number of components it has)."""
    path = Path(model_dir) / MANIFEST
    if not path.is_file():
        raise AgentError(f"model directory {model_dir} has no {MANIFEST}; point at an exported "
                         "model directory")
    return sha256_file(path)


@dataclass(frozen=True)
class Probation:
    """A freshly activated model under watch; persisted so a restart continues it."""

    ref: str
    previous: str | None
    windows_total: int
    windows_done: int = 0
    rollout_id: str | None = None
    starts: int = 0           # agent starts during this probation (a crash loop rolls back)
    # the previous model's recent values the new one is compared with (agent.rollout.probation)
    baseline: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pointers:
    active: str | None = None
    candidate: str | None = None
    previous: str | None = None
    probation: Probation | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pointers:
        p = d.get("probation")
        return cls(active=d.get("active"), candidate=d.get("candidate"),
                   previous=d.get("previous"),
                   probation=Probation(**p) if isinstance(p, dict) else None)


@dataclass(frozen=True)
class SlotInfo:
    ref: str
    directory: Path
    digest: str
    manifest: Manifest


def atomic_write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Write-to-temp, fsync, rename, fsync the directory: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ModelStore:
    """Installed models and the active/candidate/previous pointers in `state_dir/models`."""

    def __init__(self, state_dir: str | Path) -> None:
        self.root = Path(state_dir) / STORE
        self.slots = self.root / SLOTS

    # --- pointers -----------------------------------------------------------------------
    def pointers(self) -> Pointers:
        path = self.root / POINTERS
        try:
            return Pointers.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return Pointers()
        except (OSError, ValueError, TypeError) as e:
            raise AgentError(f"model store pointers {path} are unreadable ({one_line(e)}); "
                             "run 'edge-voice-agent models activate NAME@VERSION' to rewrite "
                             "them") from None

    def set_pointers(self, p: Pointers) -> Pointers:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            atomic_write_json(self.root / POINTERS, p.to_dict())
        except OSError as e:
            raise AgentError(f"model store pointers in {self.root} cannot be written "
                             f"({e.strerror}); free space or fix the state directory's "
                             "permissions") from None
        return p

    # --- slots --------------------------------------------------------------------------
    def slot_dir(self, ref: str) -> Path:
        if "/" in ref or ref.startswith(".") or "@" not in ref:
            raise AgentError(f"model reference {ref!r} is not NAME@VERSION")
        return self.slots / ref

    def installed(self) -> list[SlotInfo]:
        out = []
        if not self.slots.is_dir():
            return out
        for d in sorted(self.slots.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                m = Manifest.read(d / MANIFEST)
                out.append(SlotInfo(d.name, d, manifest_digest(d), m))
            except AgentError:
                continue  # shown as broken by `models list` through verify()
        return out

    def has(self, ref: str) -> bool:
        return (self.slot_dir(ref) / MANIFEST).is_file()

    def install(self, src: str | Path, reference: Manifest | None = None,
                expect_digest: str | None = None, load: bool = True) -> str:
        """Copy a model directory into its slot after verifying it; returns NAME@VERSION.

        `reference` is the running model's manifest (compatibility is checked against it);
        `expect_digest` is the manifest sha256 a rollout command named. `load` False checks
        every file's sha256 and the compatibility without opening ONNX sessions (the daemon:
        its memory budget; the model is loaded, and checked again, when it is used).
        Installing the same build again is a no-op; another build under the same NAME@VERSION
        is refused.
        """
        src = Path(src)
        if not (src / MANIFEST).is_file():
            raise AgentError(f"model directory {src} has no {MANIFEST}; install an exported "
                             "model directory (manifest.json + model files)")
        digest = manifest_digest(src)
        if expect_digest is not None and digest != expect_digest:
            raise AgentError(f"model directory {src}: manifest sha256 {digest[:12]}… does not "
                             f"match the {expect_digest[:12]}… the rollout names; the files are "
                             "corrupt or another build — deliver the right files")
        m = Manifest.read(src / MANIFEST)
        dest = self.slot_dir(m.ref)
        if dest.exists():
            have = manifest_digest(dest) if (dest / MANIFEST).is_file() else ""
            if have == digest:
                self._check(dest, reference, load)
                return m.ref
            raise AgentError(f"model {m.ref} is already installed as another build (manifest "
                             f"sha256 {have[:12]}…, new {digest[:12]}…); a new build needs a "
                             "new version")
        self.slots.mkdir(parents=True, exist_ok=True)
        tmp = self.slots / f".tmp-{m.ref}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, tmp, symlinks=False)
            if manifest_digest(tmp) != digest:
                raise AgentError(f"model directory {src} changed while it was being copied; "
                                 "install it again")
            try:
                self._check(tmp, reference, load)
            except AgentError as e:  # name the delivered directory, not our temporary copy
                raise AgentError(str(e).replace(str(tmp), str(src))) from None
            os.replace(tmp, dest)
            _fsync_dir(self.slots)
        except OSError as e:
            raise AgentError(f"model {m.ref} cannot be installed into {self.slots} "
                             f"({e.strerror}); free space or fix permissions") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return m.ref

    def _check(self, directory: Path, reference: Manifest | None, load: bool = True,
               share_from: ModelRunner | None = None) -> ModelRunner | None:
        if load:
            runner = ModelRunner(directory, share_from=share_from)  # hashes, shapes, classes
            m = runner.manifest
        else:
            runner, m = None, Manifest.read(directory / MANIFEST)
            verify_components(directory, m)
        check_compatible(m, directory, reference)
        return runner

    def verify(self, ref: str, reference: Manifest | None = None, load: bool = True,
               share_from: ModelRunner | None = None) -> ModelRunner | None:
        """Check an installed model again (every file's sha256, compatibility; with `load`
        also opened in ONNX Runtime); raises AgentError if not fit."""
        d = self.slot_dir(ref)
        if not (d / MANIFEST).is_file():
            raise AgentError(f"model {ref} is not installed in {self.slots}; install it first "
                             "with 'edge-voice-agent models install PATH'")
        return self._check(d, reference, load, share_from)

    def thresholds(self, ref: str) -> Path:
        d = self.slot_dir(ref)
        return thresholds_path(d, Manifest.read(d / MANIFEST))

    # --- pointer moves ------------------------------------------------------------------
    def activate(self, ref: str, reference: Manifest | None = None,
                 probation: Probation | None = None, load: bool = True) -> Pointers:
        """`ref` becomes active; what was active becomes `previous` (the rollback target)."""
        self.verify(ref, reference, load)
        p = self.pointers()
        if p.active == ref:
            return p
        return self.set_pointers(Pointers(active=ref, candidate=None if p.candidate == ref
                                          else p.candidate, previous=p.active,
                                          probation=probation))

    def rollback(self) -> Pointers:
        """Back to the previous model (None = the bundled or configured one)."""
        p = self.pointers()
        if p.active is None and p.previous is None:
            raise AgentError("nothing to roll back: no model from the store is active")
        if p.previous is not None:
            self.verify(p.previous, load=False)
        return self.set_pointers(Pointers(active=p.previous, candidate=p.candidate,
                                          previous=p.active, probation=None))

    def set_candidate(self, ref: str | None) -> Pointers:
        return self.set_pointers(replace(self.pointers(), candidate=ref))

    def commit(self) -> Pointers:
        """Probation passed: the active model stays, its watch ends."""
        return self.set_pointers(replace(self.pointers(), probation=None))
