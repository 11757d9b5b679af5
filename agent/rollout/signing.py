"""Signed bundles: the operator signs a bundle's digest offline with an ed25519 key; devices run
only bundles signed by a key listed in their configuration (`rollout.trusted_keys`).

Why: the broker account that publishes rollouts then no longer decides what a device runs — a
rollout can only choose among bundles someone holding a trusted private key signed. Several
keys may be trusted at once, so a new key can be added before the old one is retired.

Files: the private key is PKCS#8 PEM (0600, kept off the fleet); the public key is one line,
`ed25519:<base64 of the 32 raw bytes>`, pasted into the devices' config. The signature is
`bundle.sig` inside the bundle: {"schema", "key", "sha256", "signature"} over the bundle digest
(agent.rollout.bundle), so it covers every file, calibration included. The cryptography is the
`cryptography` library's Ed25519, nothing hand-written.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Sequence
from pathlib import Path

from agent.errors import AgentError, ConfigError
from agent.rollout.bundle import SIGNATURE, bundle_digest

PREFIX = "ed25519:"
CONTEXT = b"edge-voice-agent signed bundle 1\n"  # what is signed: CONTEXT + digest (hex)


def _message(digest: str) -> bytes:
    return CONTEXT + digest.encode()


def public_text(raw: bytes) -> str:
    return PREFIX + base64.b64encode(raw).decode()


def parse_public(text: str, where: str = "rollout.trusted_keys") -> bytes:
    """The 32 raw bytes of an `ed25519:BASE64` public key; ConfigError naming `where`."""
    t = text.strip()
    try:
        raw = base64.b64decode(t[len(PREFIX):], validate=True) if t.startswith(PREFIX) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{where}: {t[:24]!r} is not an ed25519 public key; paste the "
                          "'ed25519:…' line 'edge-voice-agent models keygen' printed")
    return raw


def keygen(private_path: Path) -> str:
    """A new key pair: the private key written to `private_path` (0600, never overwritten)
    and the public key to `private_path`.pub; returns the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path = Path(private_path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    try:
        fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AgentError(f"{private_path} exists; keygen never overwrites a key — choose "
                         "another file") from None
    except OSError as e:
        raise AgentError(f"cannot write {private_path} ({e.strerror})") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = public_text(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw))
    Path(f"{private_path}.pub").write_text(pub + "\n")
    return pub


def _load_private(path: Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise AgentError(f"signing key {path} cannot be read ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise AgentError(f"signing key {path} is not an unencrypted PEM private key ({e}); "
                         "make one with 'edge-voice-agent models keygen FILE'") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise AgentError(f"signing key {path} is not an ed25519 key; make one with "
                         "'edge-voice-agent models keygen FILE'")
    return key


def sign(bundle: Path, key_path: Path) -> tuple[str, str]:
    """Write `bundle`/bundle.sig; returns (bundle digest, public key line)."""
    from cryptography.hazmat.primitives import serialization

    key = _load_private(key_path)
    digest = bundle_digest(bundle)
    pub = public_text(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw))
    sig = base64.b64encode(key.sign(_message(digest))).decode()
    (Path(bundle) / SIGNATURE).write_text(json.dumps(
        {"schema": 1, "key": pub, "sha256": digest, "signature": sig}, indent=1) + "\n")
    return digest, pub


def check_signature(bundle: Path, trusted: Sequence[str], digest: str | None = None) -> str:
    """Raise AgentError (one line) unless `bundle` carries a valid signature by one of the
    `trusted` public keys over its current digest; returns the signing key. No trusted keys:
    nothing is required (returns "")."""
    if not trusted:
        return ""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    bundle = Path(bundle)
    path = bundle / SIGNATURE
    if not path.is_file():
        raise AgentError(f"model bundle {bundle} is unsigned and rollout.trusted_keys is set; "
                         "sign it with 'edge-voice-agent models sign DIR --key FILE'")
    try:
        s = json.loads(path.read_text())
        key_text, sig = str(s["key"]), base64.b64decode(str(s["signature"]), validate=True)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error):
        raise AgentError(f"model bundle signature {path} is unreadable; sign the bundle "
                         "again") from None
    keys = {k.strip(): parse_public(k) for k in trusted}
    if key_text.strip() not in keys:
        raise AgentError(f"model bundle {bundle} is signed by {key_text[:20]}…, which is not "
                         "in rollout.trusted_keys; sign it with a trusted key or add its "
                         "public key")
    digest = digest or bundle_digest(bundle)
    try:
        Ed25519PublicKey.from_public_bytes(keys[key_text.strip()]).verify(sig, _message(digest))
    except InvalidSignature:
        raise AgentError(f"model bundle {bundle}: its signature does not match its files "
                         f"(bundle sha256 {digest[:12]}…); a file changed after signing — "
                         "deliver the signed bundle again") from None
    return key_text.strip()
