"""Where the shipped model, calibration and demo audio live, installed or in a checkout.

In a wheel they are package data under `agent/_bundled/` (see pyproject's force-include); in a
source checkout they are the top-level `models/` and `calibration/` folders. Both hold the same
files, so this is a lookup, not a fallback to something different.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import AgentError

DEFAULT_MODEL = "fsdd-digits"
PACKAGE = Path(__file__).resolve().parent


def bundled(kind: str) -> Path:
    """The bundled `models` or `calibration` folder."""
    for candidate in (PACKAGE / "_bundled" / kind, PACKAGE.parent / kind):
        if candidate.is_dir():
            return candidate
    raise AgentError(f"the bundled {kind}/ folder is missing from this installation; "
                     "reinstall edge-voice-agent")


def default_model_dir() -> Path:
    return bundled("models") / DEFAULT_MODEL


def calibration_dir(model_name: str) -> Path:
    return bundled("calibration") / model_name


def demo_audio() -> Path:
    return PACKAGE / "demo" / "demo-digits.flac"


def demo_truth() -> Path:
    return PACKAGE / "demo" / "demo-digits.truth.json"
