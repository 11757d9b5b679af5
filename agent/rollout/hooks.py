"""Wiring the rollout controller into the service: one call, so service.py stays a shell."""

from __future__ import annotations

from typing import Any

from agent.rollout.device import RolloutController


def attach_rollout(service: Any, *, pinned: bool) -> RolloutController:
    """Build the controller on the service's pipeline and monitor, and subscribe it to the
    rollout topics when the telemetry sink is MQTT (other sinks: the saved rollout only)."""
    ctl = RolloutController(service.cfg, service, pinned=pinned)
    if service.cfg.samples.enabled:  # opt-in: audio of hard cases stays on the device
        from agent.monitoring.samples import SampleRecorder, SampleStore

        rec = SampleRecorder(SampleStore.from_config(service.cfg),
                             service.cfg.samples.confidence_below)
        service.pipeline.observers.append(rec)
        ctl.add_shadow_listener(rec.on_shadow)
        ctl.samples = rec
    subscribe = getattr(service.sink, "subscribe", None)
    if subscribe is not None:
        subscribe(ctl.topics, ctl.submit)
    return ctl
