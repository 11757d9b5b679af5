"""Telemetry: message schema, sinks (none, stdout, file, mqtt) and the durable outbox.

Service usage::

    sink = make_sink(cfg.telemetry.sink, device_id=dev, prefix=..., state_dir=cfg.state_path(),
                     birth=birth_payload, mqtt=MqttOptions(...), outbox=OutboxLimits(...))
    sink.publish(Message(topic(prefix, dev, "stats"), payload))   # pipeline thread; mqtt ~0.3 ms
    #   (JSON encoding + one SQLite commit, benchmarks/bench_publish.py)
    ok = sink.close(drain_timeout_s=10.0)                         # at shutdown

`mqtt` and `outbox` are imported lazily (by name, below) so `none`/`stdout`/`file` load
neither paho nor sqlite3: the daemon's memory budget is small.
"""

from typing import Any

from agent.telemetry.device_id import derive_device_id, resolve_device_id
from agent.telemetry.message import DEFAULT_PREFIX, KINDS, Message, topic
from agent.telemetry.sinks import (
    SINK_FORMS,
    FileSink,
    NullSink,
    Sink,
    StdoutSink,
    make_sink,
    parse_sink_spec,
)

__all__ = [
    "DEFAULT_PREFIX", "KINDS", "OUTBOX_FILENAME", "SINK_FORMS", "FileSink", "Message",
    "NullSink", "Outbox", "OutboxLimits", "Sink", "StdoutSink", "derive_device_id",
    "make_sink", "parse_sink_spec", "resolve_device_id", "topic",
]


def __getattr__(name: str) -> Any:
    if name in ("OUTBOX_FILENAME", "Outbox", "OutboxLimits"):
        from agent.telemetry import outbox

        return getattr(outbox, name)
    raise AttributeError(name)
