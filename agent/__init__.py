"""edge-voice-agent: on-device spoken-command recognition with fleet monitoring."""

__version__ = "0.1.0"
