"""edge-voice-agent: on-device spoken-command recognition with fleet monitoring."""

import os

# Nothing leaves a device but aggregates: ONNX Runtime (1.32) has its own telemetry, which made
# DNS lookups of a vendor host and wrote a device id under ~/.cache, even with `--telemetry
# none`; only this variable, set before onnxruntime is first imported, switches it off
# (disable_telemetry_events() did not). Every entry point imports this package first.
# tests/test_no_phone_home.py runs the agent under strace to hold it.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"

__version__ = "0.1.0"
