"""The on-device model store: installed models, each in its own slot, and the pointers that say
which one runs.

Layout under the state directory:

    models/slots/<name>@<version>/    the bundle: manifest.json, model files, calibration/, …
    models/pointers.json              {"active", "candidate", "previous", "probation",
                                       "bundles", "failed"}

Why one pointer file: `active`, `candidate` and `previous` change together (an activation moves
active to previous; a rollback moves it back), and a single write-to-temp + fsync + rename makes
that one atomic step — a power cut leaves either the old or the new pointers, never a mix. The
memory of failures (`failed`, by bundle digest) lives in the same file for the same reason: a
rollback and the record that the build failed are one write, so no crash in between can bring
the failed build back.

Every bundle is verified on install (its digest over every file, agent.rollout.bundle, against
the one the rollout names; with `rollout.trusted_keys`, its signature; copied to a temporary
slot, opened with `agent.recognition.model.ModelRunner`, checked for compatibility, then renamed
into place; the digest is recorded in `bundles`) and again on every load (the slot's digest against
the recorded one, the signature, ModelRunner's own checks), so a slot changed on disk — an edited
calibration file included — is refused instead of run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.atomic import atomic_write, fsync_dir
from agent.errors import AgentError, one_line
from agent.recognition.model import MANIFEST, Manifest, ModelRunner, verify_components
from agent.rollout.bundle import bundle_digest
from agent.rollout.compat import check_compatible, thresholds_path
from agent.rollout.signing import check_signature

log = logging.getLogger("edge-voice-agent.rollout")

STORE = "models"
SLOTS = "slots"
POINTERS = "pointers.json"


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
    breached: int = 0         # probation windows that breached a limit (a pass needs none)
    # its classes differ from the previous model's: figures about which word was heard
    # (agent.rollout.probation.VOCABULARY_BOUND) are not compared
    vocabulary_change: bool = False


@dataclass(frozen=True)
class Pointers:
    active: str | None = None
    candidate: str | None = None
    previous: str | None = None
    probation: Probation | None = None
    # NAME@VERSION -> bundle digest recorded at install: every load checks the slot against it
    bundles: dict[str, str] = field(default_factory=dict)
    # the memory of failures: bundle digest -> {"ref", "reason", "override"}; a build in it is
    # never activated again except by an explicit operator override (`override` true)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pointers:
        p = d.get("probation")
        return cls(active=d.get("active"), candidate=d.get("candidate"),
                   previous=d.get("previous"),
                   probation=Probation(**p) if isinstance(p, dict) else None,
                   bundles=dict(d.get("bundles") or {}), failed=dict(d.get("failed") or {}))

    def failure(self, ref: str | None) -> dict[str, Any] | None:
        """The failure remembered for the build installed as `ref`, or None."""
        digest = self.bundles.get(ref) if ref else None
        return self.failed.get(digest) if digest else None


@dataclass(frozen=True)
class SlotInfo:
    ref: str
    directory: Path
    digest: str
    manifest: Manifest


def atomic_write_json(path: Path, data: Any, mode: int = 0o644) -> None:
    """Readers see the old JSON or the new, never half (agent.atomic)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")), mode)


class ModelStore:
    """Installed models and the active/candidate/previous pointers in `state_dir/models`."""

    def __init__(self, state_dir: str | Path, trusted_keys: list[str] | tuple[str, ...] = ()
                 ) -> None:
        """`trusted_keys`: public keys (rollout.trusted_keys); when any are given, every
        install and load needs a bundle signed by one of them (agent.rollout.signing)."""
        self.root = Path(state_dir) / STORE
        self.slots = self.root / SLOTS
        self.trusted_keys = tuple(trusted_keys)

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
                out.append(SlotInfo(d.name, d, bundle_digest(d), m))
            except AgentError:
                continue  # shown as broken by `models list` through verify()
        return out

    def has(self, ref: str) -> bool:
        return (self.slot_dir(ref) / MANIFEST).is_file()

    def install(self, src: str | Path, reference: Manifest | None = None,
                expect_digest: str | None = None, load: bool = True,
                allow_vocabulary_change: bool = False) -> str:
        """Copy a model directory into its slot after verifying it; returns NAME@VERSION.

        `reference` is the running model's manifest (compatibility is checked against it);
        `expect_digest` is the bundle digest a rollout command named (agent.rollout.bundle).
        `load` False checks every file's sha256 and the compatibility without opening ONNX
        sessions (the daemon: its memory budget; the model is loaded, and checked again, when
        it is used). `allow_vocabulary_change`: its classes may differ from `reference`'s
        (agent.rollout.compat).
        Installing the same build again is a no-op; another build under the same NAME@VERSION
        is refused.
        """
        src = Path(src)
        if not (src / MANIFEST).is_file():
            raise AgentError(f"model directory {src} has no {MANIFEST}; install an exported "
                             "model directory (manifest.json + model files)")
        digest = bundle_digest(src)
        if expect_digest is not None and digest != expect_digest:
            raise AgentError(f"model directory {src}: bundle sha256 {digest[:12]}… does not "
                             f"match the {expect_digest[:12]}… the rollout names; the files are "
                             "corrupt or another build — deliver the right files")
        m = Manifest.read(src / MANIFEST)
        if reference is not None and m.ref == reference.ref and m.sha256 != reference.sha256:
            raise AgentError(f"model {m.ref} in {src} has the running build's name and version "
                             f"but another build (sha256 {m.sha256[:12]}…, running "
                             f"{reference.sha256[:12]}…); a new build needs a new version")
        check_signature(src, self.trusted_keys, digest)
        dest = self.slot_dir(m.ref)
        if dest.exists():
            have = bundle_digest(dest) if (dest / MANIFEST).is_file() else ""
            if have == digest:
                self._check(dest, reference, load,
                            allow_vocabulary_change=allow_vocabulary_change)
                self._record(m.ref, digest)
                return m.ref
            raise AgentError(f"model {m.ref} is already installed as another build (bundle "
                             f"sha256 {have[:12]}…, new {digest[:12]}…); a new build needs a "
                             "new version")
        self.slots.mkdir(parents=True, exist_ok=True)
        tmp = self.slots / f".tmp-{m.ref}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src, tmp, symlinks=False)
            if bundle_digest(tmp) != digest:
                raise AgentError(f"model directory {src} changed while it was being copied; "
                                 "install it again")
            try:
                self._check(tmp, reference, load,
                            allow_vocabulary_change=allow_vocabulary_change)
            except AgentError as e:  # name the delivered directory, not our temporary copy
                raise AgentError(str(e).replace(str(tmp), str(src))) from None
            os.replace(tmp, dest)
            fsync_dir(self.slots)
            self._record(m.ref, digest)
        except OSError as e:
            raise AgentError(f"model {m.ref} cannot be installed into {self.slots} "
                             f"({e.strerror}); free space or fix permissions") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return m.ref

    def _record(self, ref: str, digest: str) -> None:
        p = self.pointers()
        if p.bundles.get(ref) != digest:
            self.set_pointers(replace(p, bundles={**p.bundles, ref: digest}))

    def digest(self, ref: str) -> str | None:
        """The bundle digest `ref` was installed with."""
        return self.pointers().bundles.get(ref)

    def check_slot(self, ref: str) -> str:
        """The slot still holds exactly the bundle that was installed (and, with trusted keys,
        signed by one of them): every file hashed again. Returns the digest."""
        d = self.slot_dir(ref)
        want = self.digest(ref)
        have = bundle_digest(d)
        if want is None:  # installed by an agent before bundle digests: adopt it, once, loudly
            log.warning("model %s in %s was installed before bundle digests; recording its "
                        "bundle sha256 %s… now", ref, d, have[:12])
            self._record(ref, have)
            want = have
        if have != want:
            raise AgentError(f"model {ref} in {d} changed on disk (bundle sha256 {have[:12]}…, "
                             f"installed {want[:12]}…); reinstall it with 'edge-voice-agent "
                             "models install PATH'")
        check_signature(d, self.trusted_keys, have)
        return have

    def _check(self, directory: Path, reference: Manifest | None, load: bool = True,
               share_from: ModelRunner | None = None, allow_vocabulary_change: bool = False
               ) -> ModelRunner | None:
        if load:
            runner = ModelRunner(directory, share_from=share_from)  # hashes, shapes, classes
            m = runner.manifest
        else:
            runner, m = None, Manifest.read(directory / MANIFEST)
            verify_components(directory, m)
        check_compatible(m, directory, reference, allow_vocabulary_change)
        return runner

    def verify(self, ref: str, reference: Manifest | None = None, load: bool = True,
               share_from: ModelRunner | None = None, allow_vocabulary_change: bool = False
               ) -> ModelRunner | None:
        """Check an installed model again (every file's sha256, compatibility; with `load`
        also opened in ONNX Runtime); raises AgentError if not fit."""
        d = self.slot_dir(ref)
        if not (d / MANIFEST).is_file():
            raise AgentError(f"model {ref} is not installed in {self.slots}; install it first "
                             "with 'edge-voice-agent models install PATH'")
        self.check_slot(ref)
        return self._check(d, reference, load, share_from, allow_vocabulary_change)

    def thresholds(self, ref: str) -> Path:
        d = self.slot_dir(ref)
        return thresholds_path(d, Manifest.read(d / MANIFEST))

    # --- pointer moves ------------------------------------------------------------------
    def activate(self, ref: str, reference: Manifest | None = None,
                 probation: Probation | None = None, load: bool = True,
                 override: bool = False, allow_vocabulary_change: bool = False) -> Pointers:
        """`ref` becomes active; what was active becomes `previous` (the rollback target).
        A build in the memory of failures is refused unless `override` (the operator's
        explicit decision, remembered so the device reports it)."""
        self.verify(ref, reference, load, allow_vocabulary_change=allow_vocabulary_change)
        p = self.pointers()
        failed = p.failure(ref)
        failed_digest = p.bundles.get(ref)
        if failed is not None and not failed.get("override"):
            if not override:
                raise AgentError(failed_text(ref, failed) + "; it is not activated again — to "
                                 "run it anyway: edge-voice-agent models activate "
                                 f"{ref} --override-failed")
            p = replace(p, failed={**p.failed, failed_digest: {**failed, "override": True}})
        if p.active == ref:
            return self.set_pointers(p)
        return self.set_pointers(replace(p, active=ref, candidate=None if p.candidate == ref
                                         else p.candidate, previous=p.active,
                                         probation=probation))

    def rollback(self, failed_reason: str | None = None) -> Pointers:
        """Back to the previous model (None = the bundled or configured one). With
        `failed_reason` the build rolled back from is remembered as failed, in the same atomic
        write as the pointer move. A previous build that failed is never the way back."""
        p = self.pointers()
        if p.active is None and p.previous is None:
            raise AgentError("nothing to roll back: no model from the store is active")
        back = p.failure(p.previous)
        if back is not None and not back.get("override"):
            raise AgentError(failed_text(p.previous, back) + "; 'models rollback' does not "
                             f"bring it back (edge-voice-agent models activate {p.previous} "
                             "--override-failed would)")
        if p.previous is not None:
            self.verify(p.previous, load=False)
        failed = dict(p.failed)
        digest = p.bundles.get(p.active) if p.active else None
        if failed_reason is not None and digest is not None:
            failed[digest] = {"ref": p.active, "reason": failed_reason[:200], "override": False}
        return self.set_pointers(replace(p, active=p.previous, previous=p.active,
                                         probation=None, failed=failed))

    def failure(self, ref: str | None) -> dict[str, Any] | None:
        return self.pointers().failure(ref)

    def failed_refs(self) -> list[str]:
        """NAME@VERSION of every remembered failure (for status)."""
        return sorted({str(f.get("ref")) for f in self.pointers().failed.values()})

    def set_candidate(self, ref: str | None) -> Pointers:
        return self.set_pointers(replace(self.pointers(), candidate=ref))

    def commit(self) -> Pointers:
        """Probation passed: the active model stays, its watch ends (an overridden failure of
        this build is forgotten: it has now passed)."""
        p = self.pointers()
        digest = p.bundles.get(p.active) if p.active else None
        failed = {k: v for k, v in p.failed.items() if k != digest}
        return self.set_pointers(replace(p, probation=None, failed=failed))


def failed_text(ref: str | None, f: dict[str, Any]) -> str:
    return f"{ref} failed probation on this device before ({f.get('reason', '')})"
