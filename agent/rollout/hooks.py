"""Wiring the rollout controller into the service: one call, so service.py stays a shell."""

from __future__ import annotations

from typing import Any

from agent.rollout.device import RolloutController


def attach_rollout(service: Any, *, pinned: bool) -> RolloutController:
    """Build the controller on the service's pipeline and monitor, and subscribe it to the
    rollout topics when the telemetry sink is MQTT (other sinks: the saved rollout only)."""
    ctl = RolloutController(service.cfg, service, pinned=pinned)
    subscribe = getattr(service.sink, "subscribe", None)
    if subscribe is not None:
        subscribe(ctl.topics, ctl.submit)
    return ctl
