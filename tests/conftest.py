"""Shared fixtures: paths, the shared FSDD data (skipped where absent), stream building."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("EVA_SHARED", ROOT.parent / "shared"))
FSDD = SHARED / "data" / "fsdd" / "recordings"
EVAL = SHARED / "eval"
SPEECH_COMMANDS = SHARED / "data" / "speech-commands"
TALK = SHARED / "data" / "talk"



@pytest.fixture(autouse=True)
def _root_logging_restored() -> object:
    """A test that runs `cli.main` in-process points the root logger at the stream pytest is
    capturing into (agent.daemon.logs.setup); once pytest closes that stream, every later log line
    printed "--- Logging error ---". Each test gets the root logger back as it found it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)

@pytest.fixture(scope="session")
def fsdd() -> Path:
    if not FSDD.is_dir():
        pytest.skip(f"shared FSDD recordings not found at {FSDD} (set EVA_SHARED to the shared/ "
                    "folder)")
    return FSDD


@pytest.fixture(scope="session")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 10 s of the bundled demo recording (7 digits), as a WAV."""
    import soundfile as sf

    from agent.resources import demo_audio

    x, sr = sf.read(str(demo_audio()), dtype="float32")
    path = tmp_path_factory.mktemp("clip") / "clip.wav"
    sf.write(str(path), x[: 10 * sr], sr, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def speech_commands() -> Path:
    if not (SPEECH_COMMANDS / "clips").is_dir():
        pytest.skip(f"shared Speech Commands clips not found at {SPEECH_COMMANDS} (set "
                    "EVA_SHARED to the shared/ folder)")
    return SPEECH_COMMANDS


@pytest.fixture(scope="session")
def talk() -> Path:
    if not any(TALK.glob("talk_*.flac")):
        pytest.skip(f"shared talk recordings not found at {TALK} (set EVA_SHARED to the shared/ "
                    "folder)")
    return TALK


@pytest.fixture(scope="session")
def eval_tools() -> Path:
    if not (EVAL / "make_stream.py").is_file():
        pytest.skip(f"shared eval tools not found at {EVAL} (set EVA_SHARED)")
    return EVAL


@pytest.fixture(scope="session")
def make_stream(tmp_path_factory, fsdd, eval_tools):
    """Build (and cache per session) a stream with ../shared/eval/make_stream.py."""
    cache: dict[tuple, Path] = {}

    def build(*, speakers: str = "", seconds: float = 120, drift_at: float | None = None,
              seed: int = 0) -> Path:
        key = (speakers, seconds, drift_at, seed)
        if key not in cache:
            out = tmp_path_factory.mktemp("stream") / "stream"
            cmd = [sys.executable, str(eval_tools / "make_stream.py"), "--clips", str(fsdd),
                   "--seconds", str(seconds), "--seed", str(seed), "--out", str(out)]
            if speakers:
                cmd += ["--speakers", speakers]
            if drift_at is not None:
                cmd += ["--drift-at", str(drift_at)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            cache[key] = out
        return cache[key]

    return build


def score(eval_dir: Path, truth: Path, decisions: Path, phase: str | None = None) -> dict:
    cmd = [sys.executable, str(eval_dir / "score_stream.py"), str(truth), str(decisions)]
    if phase:
        cmd += ["--phase", phase]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout)


def eva(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the CLI as a separate process, the way a user or systemd does."""
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=kw.pop("cwd", ROOT), **kw)
