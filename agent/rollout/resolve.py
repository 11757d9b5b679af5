"""Which model directory the daemon runs: the configured one, the store's active slot, or the
bundled default — in that order — and the calibration that belongs to it.

`model.path` in the configuration pins a model (rollouts are then refused, saying why); with it
empty the store's `active` pointer decides, and without an active model the bundled one runs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from agent.config import Config
from agent.recognition.model import MANIFEST, Manifest
from agent.resources import default_model_dir
from agent.rollout.compat import baseline_path, thresholds_path
from agent.rollout.store import SLOTS, STORE, ModelStore


def store_config(cfg: Config) -> Config:
    """`cfg` with model.path, model.thresholds and monitoring.baseline pointing at the store's
    active model, when the configuration does not pin one and the store has one. The slot is
    checked against the bundle digest it was installed with (and its signature, with trusted
    keys) on every load: raises AgentError when it changed."""
    if cfg.model.path:
        return cfg
    store = ModelStore(cfg.state_path(), cfg.rollout.trusted())
    active = store.pointers().active
    if active is None:
        return cfg
    store.check_slot(active)
    d = store.slot_dir(active)
    model = dataclasses.replace(cfg.model, path=str(d))
    if not cfg.model.thresholds and (d / MANIFEST).is_file():
        model = dataclasses.replace(model, thresholds=str(
            thresholds_path(d, Manifest.read(d / MANIFEST))))
    monitoring = cfg.monitoring
    b = baseline_path(d)
    if not cfg.monitoring.baseline and b is not None:
        monitoring = dataclasses.replace(monitoring, baseline=str(b))
    return dataclasses.replace(cfg, model=model, monitoring=monitoring)


def slot_of(model_dir: Path | str) -> str:
    """Where a running model came from: "store", "bundled" or "configured"."""
    d = Path(model_dir).resolve()
    if d.parent.name == SLOTS and d.parent.parent.name == STORE:
        return "store"
    try:
        if d == default_model_dir().resolve():
            return "bundled"
    except Exception:  # noqa: BLE001 - no bundled folder: it cannot be the bundled model
        pass
    return "configured"
