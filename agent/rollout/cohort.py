"""Canary cohorts: which devices a rollout applies to, decided on each device without a list.

A device is in the cohort of rollout R at p percent when a hash of (R, device id), read as a
number in [0, 100), falls under p. The hash depends on the rollout id and the device only, so
membership is stable across restarts and brokers, and raising p keeps every device that was
already in (5 % ⊂ 25 % ⊂ 100 %). A new rollout id draws a new, independent cohort, so the same
few devices are not always the first to get every model.
"""

from __future__ import annotations

import hashlib

SCALE = 10_000  # hundredths of a percent


def bucket(rollout_id: str, device_id: str) -> float:
    """The device's position in [0, 100) for this rollout."""
    h = hashlib.sha256(f"{rollout_id}\0{device_id}".encode()).digest()
    return (int.from_bytes(h[:8], "big") % (100 * SCALE)) / SCALE


def in_cohort(rollout_id: str, device_id: str, percent: float) -> bool:
    return bucket(rollout_id, device_id) < percent
