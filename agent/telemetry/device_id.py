"""Device id for telemetry: explicit, else derived from the machine without revealing it.

/etc/machine-id is a stable secret-ish identifier that other software also uses; publishing it
would let anyone correlate this device across services. A salted SHA-256 gives a stable,
application-specific id that cannot be reversed to the machine id. 16 hex characters stay
under MQTT 3.1.1's 23-character client id limit and are safe as a topic level and username.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agent.errors import ConfigError
from agent.telemetry.message import check_level

DEFAULT_SALT = "edge-voice-agent/device-id/v1"
MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def derive_device_id(machine_id: str, salt: str = DEFAULT_SALT, length: int = 16) -> str:
    """Shortened hex SHA-256 of `salt:machine_id`."""
    digest = hashlib.sha256(f"{salt}:{machine_id.strip()}".encode()).hexdigest()
    return digest[:length]


def resolve_device_id(explicit: str = "", *,
                      machine_id_paths: tuple[str, ...] = MACHINE_ID_PATHS,
                      salt: str = DEFAULT_SALT) -> str:
    """`explicit` if given (validated), else the derived id from the first readable machine id."""
    if explicit:
        try:
            return check_level(explicit)
        except ValueError as e:
            raise ConfigError(f"invalid agent.device_id: {e}") from None
    for p in machine_id_paths:
        try:
            mid = Path(p).read_text().strip()
        except OSError:
            continue
        if mid:
            return derive_device_id(mid, salt)
    raise ConfigError(f"no machine id in {', '.join(machine_id_paths)}; set --device-id")
