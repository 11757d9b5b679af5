"""Configuration: TOML, flags over file, and errors that name key, value and what is allowed."""

from __future__ import annotations

import pytest

from agent import config
from agent.errors import ConfigError


def test_defaults_are_valid():
    cfg = config.load(None, {}) if not config.DEFAULT_CONFIG_PATH.exists() else config.Config()
    assert cfg.decision.mode == "partial"
    assert cfg.vad.frame_ms in (10, 20, 30)


def test_toml_then_flags(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[vad]\naggressiveness = 3\nframe_ms = 20\n[decision]\nmode = "shadow"\n')
    cfg = config.load(p, {"vad.aggressiveness": "1"})
    assert cfg.vad.aggressiveness == 1       # the flag wins over the file
    assert cfg.vad.frame_ms == 20            # the file wins over the default
    assert cfg.decision.mode == "shadow"


@pytest.mark.parametrize("text,match", [
    ("[vad]\nframe_ms = 25\n", r"vad.frame_ms = 25 is not allowed; allowed: 10, 20, 30"),
    ("[vad]\naggressiveness = 7\n", r"vad.aggressiveness = 7 is out of range; allowed: int from"),
    ("[vad]\nagressiveness = 1\n", r"unknown setting vad.agressiveness; allowed: frame_ms"),
    ("[vadd]\nx = 1\n", r"unknown section \[vadd\]"),
    ('[decision]\nmode = "auto"\n', r'decision.mode = "auto" is not allowed; allowed: off, '
                                    r"shadow, assist, partial, full"),
    # TOML has numbers and booleans: a quoted one is refused like "high", and messages spell
    # values the TOML way (true, "60"), not Python's (True, '60')
    ('[monitoring]\nwindow_s = "60"\n', r'monitoring.window_s = "60" is a string, not a float; '
                                         r"write it without quotes: window_s = 60.0"),
    ('[monitoring]\nwindow_s = "high"\n', r'monitoring.window_s = "high" is not a valid float'),
    ('[vad]\naggressiveness = "2"\n', r'vad.aggressiveness = "2" is a string, not an int'),
    ("[audio]\nspeed = true\n", r"audio.speed = true is not a valid float"),
    ('[telemetry]\nhistorical_on_reconnect = "yes"\n', r"is a string, not a bool"),
    ('[telemetry]\nsink = "mqtt:// 127.0.0.1:1883"\n',
     r'c.toml: telemetry.sink = "mqtt:// 127.0.0.1:1883": invalid telemetry sink .* contains a '
     r"space"),
    ('[telemetry]\nsink = "kafka://x"\n', r'c.toml: telemetry.sink = "kafka://x": invalid'),
    ('[audio]\nspeed = "fast"\n', r'audio.speed = "fast" is not a valid float'),
    ("[vad]\ntrigger_frames = 5\ntrigger_window = 3\n", r"trigger_frames = 5 exceeds"),
    ("[vad\n", r"not valid TOML"),
])
def test_invalid_config_names_key_value_and_allowed(tmp_path, text, match):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        config.load(p)
    assert "\n" not in str(e.value)
    assert e.value.exit_code == 2


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")


def test_every_setting_has_a_flag_and_help():
    names = [config.flag_name(s, f) for s, f in config.settings()]
    assert len(names) == len(set(names))
    assert all(f.metadata["help"] for _, f in config.settings())


def test_flags_arrive_as_text_and_are_converted():
    cfg = config.load(None, {"monitoring.window_s": "30", "audio.speed": "2",
                             "telemetry.historical_on_reconnect": "true"})
    assert cfg.monitoring.window_s == 30.0 and cfg.audio.speed == 2.0
    assert cfg.telemetry.historical_on_reconnect is True
    with pytest.raises(ConfigError, match=r"^command line: telemetry.sink = "):
        config.load(None, {"telemetry.sink": "mqtt:// 127.0.0.1:1883"})
