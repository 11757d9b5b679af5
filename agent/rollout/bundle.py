"""A deliverable model bundle and its one digest.

A bundle is a model directory as it is delivered to a device: `manifest.json`, every model file
it lists, and `calibration/` (thresholds.json, baseline.json, … made for exactly this build),
plus anything else in the folder (model card, notice). Its digest is a sha256 over the path and
sha256 of EVERY file in it except the signature, so editing any byte — a threshold in
calibration/thresholds.json included — gives another digest. The rollout command names this
digest; `models install`, every load of a store slot and `fleet rollout start` check it.

Why every file rather than a list of the ones that matter: a list is one more thing to keep in
step with the loader; a file the loader does not read costs a hash, a file it reads and a list
forgot would be an unchecked input.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.errors import AgentError
from agent.recognition.decision import Thresholds
from agent.recognition.model import MANIFEST, Manifest, sha256_file, verify_components

SIGNATURE = "bundle.sig"   # agent.rollout.signing: not part of what it signs
CALIBRATION = "calibration"
THRESHOLDS = "thresholds.json"
_TAG = "edge-voice-agent bundle 1\n"


def bundle_files(directory: Path) -> list[str]:
    """Every regular file of the bundle as a relative POSIX path, sorted; the signature file
    excluded. A symlink or other special file refuses the bundle (a link could point anywhere
    after it was checked)."""
    d = Path(directory)
    out = []
    for root, dirs, files in os.walk(d):
        dirs.sort()
        for name in [*dirs, *files]:
            p = Path(root) / name
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise AgentError(f"model bundle {d}: {p.relative_to(d)} is a link or special "
                                 "file; deliver plain files only")
        for name in files:
            rel = (Path(root) / name).relative_to(d).as_posix()
            if rel != SIGNATURE:
                out.append(rel)
    return sorted(out)


def bundle_digest(directory: str | Path) -> str:
    """sha256 over (path, sha256) of every file of the bundle: the identity a rollout names."""
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise AgentError(f"model directory {d} has no {MANIFEST}; point at an exported model "
                         "directory")
    h = hashlib.sha256(_TAG.encode())
    try:
        for rel in bundle_files(d):
            h.update(f"{rel}\0{sha256_file(d / rel)}\n".encode())
    except OSError as e:
        raise AgentError(f"model bundle {d} cannot be read ({e.strerror}); fix its "
                         "permissions or deliver it again") from None
    return h.hexdigest()


def bundle_problem(directory: str | Path) -> str | None:
    """Why `directory` is not a complete deliverable bundle, or None: its manifest, every file
    the manifest lists with the listed sha256, and its own calibration for exactly this build."""
    d = Path(directory)
    try:
        m = Manifest.read(d / MANIFEST)
        verify_components(d, m)
        bundle_files(d)
    except AgentError as e:
        return str(e)
    cal = d / CALIBRATION / THRESHOLDS
    if not cal.is_file():
        return (f"{d} has no {CALIBRATION}/{THRESHOLDS}; a bundle carries the calibration made "
                f"for its build (copy 'edge-voice-agent train' output's {CALIBRATION}/ into it)")
    try:
        t = Thresholds.read(cal)
    except AgentError as e:
        return str(e)
    if t.sha256 != m.sha256:
        return (f"{cal} was made for another build (sha256 {t.sha256[:12]}…, model "
                f"{m.sha256[:12]}…); ship the {CALIBRATION}/ made with this model")
    return None
