"""The systemd unit, its CI gate, the example config and install.sh / uninstall.sh.

Nothing here touches the real system: the install scripts run into a temporary root with
--no-systemctl (or `systemctl --root`), and systemd-analyze only reads files.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from agent import config
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "edge-voice-agent.service"
CHECK = REPO / ".ci" / "check-systemd.sh"
INSTALL = REPO / "systemd" / "install.sh"
UNINSTALL = REPO / "systemd" / "uninstall.sh"
EXAMPLE = REPO / "systemd" / "config.example.toml"
NAME = "edge-voice-agent"
TIMEOUT_S = 60

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd); the CI image has it")
needs_sysusers = pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None,
    reason="systemd-sysusers is not installed; install.sh needs it to create the user")


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, **(env or {})})


def unit_entries(path: Path = UNIT) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists; systemd allows repeated keys."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(section: str, key: str) -> list[str]:
    return [v for k, v in unit_entries()[section] if k == key]


def one(section: str, key: str) -> str:
    found = values(section, key)
    assert len(found) == 1, f"{key}= appears {len(found)} times in [{section}]"
    return found[0]


# --- the unit itself -------------------------------------------------------------------------

def test_unit_lifecycle_settings() -> None:
    assert one("Service", "Type") == "notify"
    assert one("Service", "NotifyAccess") == "main"
    assert one("Service", "ExecStart") == (
        "/opt/edge-voice-agent/venv/bin/edge-voice-agent run "
        "--config /etc/edge-voice-agent/config.toml")
    assert int(one("Service", "WatchdogSec")) == 30
    assert one("Service", "Restart") == "on-failure"
    assert int(one("Unit", "StartLimitBurst")) >= 1
    assert int(one("Unit", "StartLimitIntervalSec")) > 0
    # SIGTERM must be answered within 5 s; the stop timeout leaves slack before SIGKILL.
    assert int(one("Service", "TimeoutStopSec")) > 5
    # the agent signals itself: a minimal Debian has no /bin/kill (procps), so nothing outside
    # the venv may be needed for a reload
    assert one("Service", "ExecReload") == (
        "/opt/edge-voice-agent/venv/bin/edge-voice-agent reload $MAINPID")


def test_unit_identity_and_directories() -> None:
    assert one("Service", "User") == NAME
    assert one("Service", "StateDirectory") == NAME
    assert one("Service", "ConfigurationDirectory") == NAME
    assert one("Service", "UMask") == "0077"
    sysusers = (REPO / "systemd" / "edge-voice-agent.sysusers").read_text()
    assert re.search(rf"^m\s+{NAME}\s+audio\s*$", sysusers, re.M), "user must be in audio"


def test_unit_hardening_choices() -> None:
    assert one("Service", "MemoryDenyWriteExecute") == "yes"
    assert one("Service", "DevicePolicy") == "closed"
    assert values("Service", "DeviceAllow") == ["char-alsa rw"]
    assert set(one("Service", "RestrictAddressFamilies").split()) == \
        {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert one("Service", "CapabilityBoundingSet") == ""
    assert one("Service", "ProtectSystem") == "strict"
    assert one("Service", "NoNewPrivileges") == "yes"
    assert values("Service", "SystemCallFilter")[0] == "@system-service"
    assert one("Service", "SystemCallArchitectures") == "native"
    # Known breakages on this hardware (shared/NOTES.md): audio group, onnxruntime cpuinfo.
    assert values("Service", "PrivateUsers") in ([], ["no"])
    assert values("Service", "ProcSubset") in ([], ["all"])
    assert values("Service", "PrivateDevices") in ([], ["no"])  # would hide /dev/snd


@needs_analyze
def test_ci_check_passes_and_reports_exposure() -> None:
    r = run(CHECK)
    assert r.returncode == 0, r.stderr
    m = re.search(r"exposure (\d+(?:\.\d+)?) <= 2\.0", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 2.0
    assert "verify clean" in r.stdout


@needs_analyze
def test_exposure_measured_directly() -> None:
    # Independent of the script's parsing: read systemd-analyze's own summary line.
    r = run("systemd-analyze", "security", "--offline=true", UNIT)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for edge-voice-agent\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-500:]
    assert float(m.group(1)) <= 2.0


@needs_analyze
def test_ci_check_fails_on_a_verify_warning(tmp_path: Path) -> None:
    broken = tmp_path / "edge-voice-agent.service"
    broken.write_text(UNIT.read_text().replace("TimeoutStopSec=", "TimeoutStpSec="))
    r = run(CHECK, broken)
    assert r.returncode != 0
    assert "Unknown key" in r.stderr and "TimeoutStpSec" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1  # one-line reason


@needs_analyze
def test_ci_check_fails_above_the_threshold(tmp_path: Path) -> None:
    r = run(CHECK, env={"EXPOSURE_MAX": "0.5"})
    assert r.returncode != 0
    assert "above 0.5" in r.stderr
    weak = tmp_path / "edge-voice-agent.service"
    weak.write_text(UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=no")
                    .replace("CapabilityBoundingSet=\n", "")
                    .replace("SystemCallFilter=", "#SystemCallFilter=")
                    .replace("RestrictAddressFamilies=", "#RestrictAddressFamilies=")
                    .replace("ProtectHome=yes", "ProtectHome=no"))
    r = run(CHECK, weak)
    assert r.returncode != 0 and "above 2.0" in r.stderr, r.stdout + r.stderr


# --- MemoryDenyWriteExecute with the real library stack ---------------------------------------

# Loads the same seccomp rules systemd installs for MemoryDenyWriteExecute=yes (systemd 252,
# seccomp_memory_deny_write_execute), proves they bite, then imports and exercises the stack.
MDWE_PROBE = r"""
import ctypes, errno, mmap, sys
lib = ctypes.CDLL("libseccomp.so.2")
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                       ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctx = lib.seccomp_init(0x7fff0000)  # SCMP_ACT_ALLOW
W, X, SHM_EXEC, MASKED_EQ = mmap.PROT_WRITE, mmap.PROT_EXEC, 0o100000, 7
for name, mask in ((b"mmap", W | X), (b"mprotect", X), (b"pkey_mprotect", X),
                   (b"shmat", SHM_EXEC)):
    nr = lib.seccomp_syscall_resolve_name(name)
    c = Cmp(2, MASKED_EQ, mask, mask)
    assert lib.seccomp_rule_add_array(ctx, 0x00050000 | errno.EPERM, nr, 1, ctypes.byref(c)) == 0
assert lib.seccomp_load(ctx) == 0
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | W | X)
    sys.exit("W+X mapping was allowed: the filter is not active")
except PermissionError:
    pass
import numpy as np, onnxruntime as ort, soundfile, soxr, webrtcvad, paho.mqtt.client, sounddevice
from onnx import TensorProto, helper
x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
out = s.run(None, {"x": np.zeros((1, 4), np.float32)})[0]
assert np.allclose(out, 0.25), out
v = webrtcvad.Vad(2); v.is_speech(b"\0\0" * 480, 16000)
soxr.resample(np.zeros(1600, np.float32), 16000, 8000)
# Fidelity check (shared/NOTES.md): PortAudio callbacks need W+X memory and must fail here,
# which is why capture uses blocking reads.
try:
    sounddevice._ffi.callback("int(void)")(lambda: 0)
    sys.exit("a cffi callback was created: the filter does not match systemd's")
except MemoryError:
    pass
print("stack ok under MemoryDenyWriteExecute")
"""


def test_library_stack_works_under_memory_deny_write_execute() -> None:
    try:
        import ctypes.util

        if not ctypes.util.find_library("seccomp"):
            pytest.skip("libseccomp is not installed; cannot emulate MemoryDenyWriteExecute")
        import onnx  # noqa: F401  (only to build a model in the probe)
        import sounddevice  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"probe needs onnx, sounddevice and PortAudio: {e}")
    r = run(sys.executable, "-c", MDWE_PROBE)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "stack ok" in r.stdout


# --- example config ---------------------------------------------------------------------------

def test_example_config_loads_as_the_defaults() -> None:
    assert config.to_dict(config.load(EXAMPLE)) == config.to_dict(config.Config())


def test_example_config_documents_every_setting_with_valid_values(tmp_path: Path) -> None:
    """Uncommenting every `# key = value` line must give a valid config naming every setting."""
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"^# ([a-z_]+ = .+)$", r"\1", text, flags=re.M)
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        pytest.fail(f"an example value is invalid: {e}")
    import tomllib

    data = tomllib.loads(uncommented)
    missing = [f"{s}.{f.name}" for s, f in config.settings() if f.name not in data.get(s, {})]
    assert missing == [], f"add these to {EXAMPLE.name}: {missing}"
    # The documented values are the defaults, so the commented-out file means what it shows.
    assert config.to_dict(cfg) == config.to_dict(config.Config())


# --- install.sh / uninstall.sh ----------------------------------------------------------------

def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mode, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@needs_sysusers
def test_install_places_files_and_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    r = run(INSTALL, "--root", root, "--no-systemctl", "--no-venv")
    assert r.returncode == 0, r.stdout + r.stderr

    unit = root / "etc/systemd/system/edge-voice-agent.service"
    assert unit.read_bytes() == UNIT.read_bytes()
    assert unit.stat().st_mode & 0o777 == 0o644
    conf = root / "etc/edge-voice-agent/config.toml"
    assert conf.read_bytes() == EXAMPLE.read_bytes()
    assert conf.stat().st_mode & 0o777 == 0o640  # will hold broker credentials
    assert (root / "etc/sysusers.d/edge-voice-agent.conf").is_file()
    assert (root / "opt/edge-voice-agent/config.example.toml").is_file()
    passwd = (root / "etc/passwd").read_text()
    assert re.search(rf"^{NAME}:x:\d+:\d+:[^:]*:/var/lib/{NAME}:/usr/sbin/nologin$", passwd, re.M)
    audio = [g for g in (root / "etc/group").read_text().splitlines() if g.startswith("audio:")]
    assert audio and NAME in audio[0].split(":")[3].split(",")
    assert "not calling systemctl" in r.stdout

    # A local edit to the config survives a second run, which changes nothing else.
    conf.write_text(conf.read_text() + '\n[decision]\nmode = "shadow"\n')
    before = snapshot(root)
    r2 = run(INSTALL, "--root", root, "--no-systemctl", "--no-venv")
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert snapshot(root) == before
    assert "keeping existing /etc/edge-voice-agent/config.toml" in r2.stdout
    assert "unchanged /etc/systemd/system/edge-voice-agent.service" in r2.stdout

    # A changed unit is replaced on the next run.
    unit.write_text("stale\n")
    r3 = run(INSTALL, "--root", root, "--no-systemctl", "--no-venv")
    assert r3.returncode == 0 and unit.read_bytes() == UNIT.read_bytes()


@needs_sysusers
def test_install_enables_offline_with_systemctl_root(tmp_path: Path) -> None:
    if shutil.which("systemctl") is None:
        pytest.skip("systemctl is not installed")
    root = tmp_path / "root"
    r = run(INSTALL, "--root", root, "--no-venv")
    assert r.returncode == 0, r.stdout + r.stderr
    link = root / "etc/systemd/system/multi-user.target.wants/edge-voice-agent.service"
    assert link.is_symlink()
    r = run(UNINSTALL, "--root", root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not link.is_symlink()


@needs_sysusers
def test_uninstall_keeps_data_by_default_and_purge_removes_it(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert run(INSTALL, "--root", root, "--no-systemctl", "--no-venv").returncode == 0
    state = root / "var/lib/edge-voice-agent"
    state.mkdir(parents=True)
    (state / "outbox.sqlite").write_bytes(b"unsent windows")
    (state / "samples").mkdir()
    (state / "samples" / "x.wav").write_bytes(b"RIFF a person's voice")
    (root / "opt/edge-voice-agent/venv/bin").mkdir(parents=True)

    r = run(UNINSTALL, "--root", root, "--no-systemctl")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (root / "etc/systemd/system/edge-voice-agent.service").exists()
    assert not (root / "opt/edge-voice-agent").exists()
    assert not (root / "etc/sysusers.d/edge-voice-agent.conf").exists()
    assert (state / "outbox.sqlite").read_bytes() == b"unsent windows"
    assert not (state / "samples").exists()  # recordings of people never outlive the program
    assert (root / "etc/edge-voice-agent/config.toml").is_file()
    assert "use --purge" in r.stdout

    r = run(UNINSTALL, "--root", root, "--no-systemctl", "--purge")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not state.exists()
    assert not (root / "etc/edge-voice-agent").exists()
    r = run(UNINSTALL, "--root", root, "--no-systemctl", "--purge")  # idempotent
    assert r.returncode == 0 and "already absent" in r.stdout


def test_install_refuses_bad_arguments(tmp_path: Path) -> None:
    r = run(INSTALL, "--root", tmp_path, "--bogus")
    assert r.returncode != 0 and "unknown option --bogus" in r.stderr
    r = run(INSTALL, "--root", tmp_path, "--no-systemctl", tmp_path / "missing.whl")
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = run(UNINSTALL, "--root", tmp_path / "nope")
    assert r.returncode != 0 and "not a directory" in r.stderr


def stub_wheel(directory: Path) -> Path:
    """A minimal wheel named edge-voice-agent providing the console script, built offline."""
    dist = "edge_voice_agent-0.0.0"
    files = {
        "eva_stub/__init__.py": "def main():\n    print('stub agent')\n    return 0\n",
        f"{dist}.dist-info/METADATA": "Metadata-Version: 2.1\nName: edge-voice-agent\n"
                                      "Version: 0.0.0\n",
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
        f"{dist}.dist-info/entry_points.txt": "[console_scripts]\n"
                                              "edge-voice-agent = eva_stub:main\n",
    }
    record = []
    for name, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(content.encode())}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = directory / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, content in files.items():
            z.writestr(name, content)
    return path


@pytest.mark.slow
@needs_sysusers
def test_install_creates_venv_and_pip_installs_a_wheel(tmp_path: Path) -> None:
    """The venv and pip steps, offline, with a stub wheel instead of the real package."""
    root = tmp_path / "root"
    wheel = stub_wheel(tmp_path)
    env = {"PIP_NO_INDEX": "1", "PIP_NO_CACHE_DIR": "1"}
    args = (INSTALL, "--root", root, "--no-systemctl", "--python", sys.executable, wheel)
    r = run(*args, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    exe = root / "opt/edge-voice-agent/venv/bin/edge-voice-agent"
    assert run(exe).stdout == "stub agent\n"
    assert "Successfully installed edge-voice-agent-0.0.0" in r.stdout

    r2 = run(*args, env=env)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    assert "venv /opt/edge-voice-agent/venv exists" in r2.stdout
    assert "Successfully installed" not in r2.stdout  # nothing reinstalled, no restart needed
