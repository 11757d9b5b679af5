"""Acting on decisions with real processes: the decision socket and its readers, `listen`, and
the `[actions]` table run by the agent.

Agents run as child processes under a fake systemd (tests/test_service_lifecycle.py's `Agent`),
readers are real `edge-voice-agent listen` processes or real sockets, actions are real programs
(/bin/sh one-liners that write what they were given into a folder). Waits are on events (a
notification, a log line, an exit) or bounded polls of a file an action writes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from agent import config as config_mod
from agent.actions.listen import candidates
from agent.actions.runner import ActionRunner
from agent.actions.socket_server import SOCKET_NAME, DecisionSocket, connect, socket_path
from agent.actions.table import ActionTable, check, parse
from agent.daemon import service
from agent.errors import AgentError, ConfigError
from agent.recognition.decision import Decision
from agent.resources import demo_audio
from tests.conftest import ROOT
from tests.test_service_lifecycle import Agent, agents  # noqa: F401 - the fixture

WAIT_S = 10.0


def eventually(pred: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll a condition that no event announces (a file an action writes), bounded."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def decision(label: str = "7", accepted: bool = True, mode: str = "partial",
             t: float = 1.0) -> Decision:
    return Decision(start=t, end=t + 0.4, decided_at=t + 0.6, label=label, confidence=0.97,
                    accepted=accepted, model="fsdd-digits@2.0.0", latency_ms=0.3, margin=0.9,
                    mode=mode)


@pytest.fixture(scope="module")
def quiet_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s of silence, then the demo's first 9 s (6 digits): readers connect in the silence."""
    x, sr = sf.read(str(demo_audio()), dtype="float32")
    path = tmp_path_factory.mktemp("clip") / "quiet-clip.wav"
    sf.write(str(path), np.concatenate([np.zeros(6 * sr, np.float32), x[:9 * sr]]), sr,
             subtype="PCM_16")
    return path


def eva(*args: str, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, **kw)


def listen_proc(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent", "listen", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def toml_argv(argv: list[str]) -> str:
    return "[" + ", ".join(json.dumps(a) for a in argv) + "]"


# --- the socket, with real readers ------------------------------------------------------------
def test_readers_get_every_decision_in_order_and_listen_exits_0_when_the_agent_stops(
        tmp_path: Path, quiet_clip: Path, agents: list[Agent]) -> None:  # noqa: F811
    state = tmp_path / "state"
    a = Agent(["--source", str(quiet_clip), "--speed", "3", "--state-dir", str(state),
               "--decisions", "-"], tmp_path)
    agents.append(a)
    a.until("READY=1")  # the socket is bound before READY=1
    sock = state / SOCKET_NAME
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and st.st_mode & 0o777 == 0o660
    assert st.st_gid == os.getegid()
    readers = [connect(sock), connect(sock)]
    stuck = connect(sock)  # a reader that never reads: nobody may wait for it
    for n in (1, 2, 3):
        a.log_line(f"reader {n} connected")
    assert a.stdout.empty(), "the readers connected after the first decision (a slow machine?)"
    cli = listen_proc("--state-dir", str(state))  # the real client: starts in ~1 s
    assert inet_sockets(a.proc.pid) == [], "nothing may listen on (or even open) a network port"
    assert a.finish() == 0
    got = [[x.decode() for x in r.makefile("rb")] for r in readers]  # up to end of file
    out, err = cli.communicate(timeout=WAIT_S)
    assert cli.returncode == 0, err  # the agent stopped: end of file, exit 0
    stuck.close()
    sent = [json.dumps(d) + "\n" for d in a.decisions]  # what went to stdout, in order
    assert len(sent) >= 5
    assert got[0] == got[1] == sent
    tail = out.splitlines(keepends=True)
    assert tail and tail == sent[len(sent) - len(tail):]  # from when it connected, in order
    assert not sock.exists(), "the socket file is removed when the agent stops"
    assert any("reader 3" in x and "0 dropped" in x for x in a.log)


def inet_sockets(pid: int) -> list[str]:
    """The process's IPv4/IPv6 sockets (TCP or UDP), from its descriptors and /proc/net."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                found.append(f"{table} {cols[1]}")
    return found


def test_a_reader_that_stops_reading_loses_only_its_own_decisions(tmp_path: Path) -> None:
    """Thousands of decisions, one real reader process that stops after 5 lines, one that
    keeps reading: publishing never waits, the stuck reader's buffer stays bounded and its
    drops are counted; the other reader gets everything, in order."""
    path = tmp_path / SOCKET_NAME
    server = DecisionSocket(path, buffer_max=64)
    try:
        stuck = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys, time\n"
             "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile()\n"
             "print(''.join(f.readline() for _ in range(5)), end='', flush=True)\n"
             "time.sleep(60)", str(path)], stdout=subprocess.PIPE, text=True)
        good = connect(path)
        eventually(lambda: len(server.readers) == 2, "two readers")
        received: list[bytes] = []
        arrived = threading.Condition()

        def read() -> None:
            with good.makefile("rb") as f:
                for line in f:
                    with arrived:
                        received.append(line)
                        arrived.notify()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        n, worst = 3000, 0.0
        decisions = [decision(str(i % 10), t=float(i)) for i in range(n)]
        for i in range(0, n, 3):
            t0 = time.perf_counter()
            server.publish(decisions[i:i + 3])
            worst = max(worst, time.perf_counter() - t0)
            with arrived:  # the good reader keeps up (the stuck one is never waited for)
                want = min(n, i + 3)
                assert arrived.wait_for(lambda w=want: len(received) >= w, WAIT_S)
        first = [stuck.stdout.readline() for _ in range(5)]  # type: ignore[union-attr]
        sd = next(r for r in server.readers if "pid" in r.peer and r.peer.split()[1].rstrip(",")
                  == str(stuck.pid))
        assert sd.dropped > 0 and server.dropped == sd.dropped
        assert len(sd.pending) <= 64
        assert worst < 0.05, f"publish took {worst * 1000:.1f} ms"
        lines = [json.dumps(d.to_json()) + "\n" for d in decisions]
        assert first == lines[:5]
    finally:
        server.close()  # the good reader gets end of file after what was buffered
        stuck.kill()
        stuck.wait()
    t.join(WAIT_S)
    assert [x.decode() for x in received] == lines


def test_the_socket_refuses_what_it_must_and_cleans_up_what_it_may(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the unit's UMask=: the bind alone would give 0700
    try:
        long_dir = tmp_path / ("d" * 60) / ("e" * 60)  # beyond sockaddr_un's 107 bytes
        path = long_dir / SOCKET_NAME
        s = DecisionSocket(path)
    finally:
        os.umask(old)
    try:
        assert path.stat().st_mode & 0o777 == 0o660
        with pytest.raises(AgentError, match="served by another running agent"):
            DecisionSocket(path)
        connect(path).close()
    finally:
        s.close()
    assert not path.exists()
    # a socket left by an agent that was killed: replaced without a word
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    DecisionSocket(tmp_path / "stale.sock").close()
    (tmp_path / "file.sock").write_text("not a socket")
    with pytest.raises(AgentError, match="exists and is not a socket"):
        DecisionSocket(tmp_path / "file.sock")


def test_socket_path_runtime_directory_then_state_directory(monkeypatch) -> None:
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert socket_path("", Path("/var/lib/x")) == Path("/var/lib/x/decisions.sock")
    assert socket_path("none", Path("/var/lib/x")) is None
    assert socket_path("/tmp/a.sock", Path("/var/lib/x")) == Path("/tmp/a.sock")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/edge-voice-agent")
    assert socket_path("", Path("/var/lib/x")) == Path("/run/edge-voice-agent/decisions.sock")
    assert candidates()[0] == Path("/run/edge-voice-agent/decisions.sock")
    assert candidates(state_dir="/s") == [Path("/s/decisions.sock")]


def test_listen_with_no_agent_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    r = eva("listen", "--state-dir", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert f"no agent is running at {tmp_path / SOCKET_NAME}" in line
    # a socket file left behind by a killed agent is no agent either
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / SOCKET_NAME))
    stale.close()
    r = eva("listen", "--socket", str(tmp_path / SOCKET_NAME))
    assert r.returncode == 2 and "no agent is running" in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_listen_accepted_only_and_exit_0_on_sigterm_and_sigint(tmp_path: Path, sig) -> None:
    server = DecisionSocket(tmp_path / SOCKET_NAME)
    try:
        p = listen_proc("--state-dir", str(tmp_path), "--accepted")
        eventually(lambda: len(server.readers) == 1, "the reader")
        server.publish([decision("3", accepted=False), decision("7")])
        assert json.loads(p.stdout.readline())["label"] == "7"  # type: ignore[union-attr]
        p.send_signal(sig)
        assert p.wait(WAIT_S) == 0
        assert "Traceback" not in p.stderr.read()  # type: ignore[union-attr]
    finally:
        server.close()


# --- the table ----------------------------------------------------------------------------------
def test_the_table_most_specific_wins_and_bad_entries_are_one_line(tmp_path: Path) -> None:
    t = parse({"7": ["/bin/true", "seven"], "*": ["/bin/true"]})
    assert t.match("7").argv == ("/bin/true", "seven")  # type: ignore[union-attr]
    assert t.match("3").argv == ("/bin/true",)  # type: ignore[union-attr]
    assert parse({"7": ["/bin/true"]}).match("3") is None
    # any vocabulary: labels are whatever the model calls its classes
    assert check(parse({"lights on": ["true"], "7": ["true"]}), ["lights on", "off"]) == [
        "action for label '7': the model has no such class (its classes: lights on, off); it "
        "runs only if a later model has it"]
    with pytest.raises(ConfigError, match="does not exist or is not executable"):
        check(parse({"7": [str(tmp_path / "missing")]}))
    for bad, msg in (({"7": "/bin/true seven"}, "is a string"), ({"7": []}, "non-empty list"),
                     ({"7": [1]}, "non-empty list")):
        cfg = tmp_path / "c.toml"
        key, value = next(iter(bad.items()))
        cfg.write_text(f'[actions]\n"{key}" = {json.dumps(value)}\n')
        with pytest.raises(ConfigError, match=msg) as e:
            config_mod.load(cfg)
        assert "\n" not in str(e.value) and str(cfg) in str(e.value)
    cfg.write_text('[actions]\ntimeout_s = 0\n')
    with pytest.raises(ConfigError, match="actions.timeout_s"):
        config_mod.load(cfg)


# --- the runner with real programs ---------------------------------------------------------------
def runner_for(argv: list[str], timeout_s: float = 5.0, queue_max: int = 16) -> ActionRunner:
    return ActionRunner(ActionTable(parse({"*": argv}).actions, timeout_s, queue_max),
                        "unknown")


def test_an_action_that_hangs_is_killed_with_its_process_group_and_counted(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    child = tmp_path / "child.pid"
    r = runner_for(["/bin/sh", "-c", f'sleep 60 & echo $! > {child}; wait'], timeout_s=0.5)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, "edge-voice-agent.actions"):
        r.submit([decision()])
        eventually(lambda: r.counts["timed_out"] == 1, "the timeout")
        took = time.monotonic() - t0
        r.submit([decision()])
        eventually(lambda: r.counts["timed_out"] == 2, "the second timeout")
    r.close(1.0)
    assert 0.5 <= took < 3.0
    pid = int(child.read_text())
    eventually(lambda: _dead(pid), "the grandchild's end")  # the whole group was killed
    assert [v for m, v in r.take() if m == "action_outcome"] == [2.0, 2.0]
    lines = [x.getMessage() for x in caplog.records]
    assert len(lines) == 1 and "actions.timeout_s = 0.5 s" in lines[0]  # once per cause


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_an_action_that_fails_is_counted_and_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    r = runner_for(["/bin/sh", "-c", "exit 3"])
    with caplog.at_level(logging.WARNING, "edge-voice-agent.actions"):
        for _ in range(3):
            r.submit([decision()])
        eventually(lambda: r.counts["failed"] == 3, "three failures")
    r.close(1.0)
    measures = r.take()
    assert [v for m, v in measures if m == "action_outcome"] == [1.0, 1.0, 1.0]
    assert len([v for m, v in measures if m == "action_latency_ms"]) == 3
    (line,) = [x.getMessage() for x in caplog.records]
    assert line == "action /bin/sh: exited with status 3; logged once per cause"  # no label


def test_a_full_queue_drops_and_counts_and_never_waits(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    r = runner_for(["/bin/sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.02; done"],
                   queue_max=1)
    r.submit([decision()])
    eventually(lambda: not r.idle() and r.waiting() == 0, "the first run to start")
    t0 = time.perf_counter()
    r.submit([decision(t=float(i)) for i in range(4)])  # one waits, three overflow
    assert time.perf_counter() - t0 < 0.05
    assert r.counts["dropped"] == 3
    gate.touch()
    eventually(lambda: r.counts["ok"] == 2, "the two runs")
    r.close(1.0)
    assert sorted(v for m, v in r.take() if m == "action_outcome") == [0.0, 0.0, 3.0, 3.0, 3.0]


def test_nothing_runs_for_abstentions_unknown_or_the_non_acting_modes(tmp_path: Path) -> None:
    out = tmp_path / "ran"
    r = runner_for(["/bin/sh", "-c", f"cat >> {out}"])
    r.submit([decision(accepted=False), decision(label="unknown"),
              decision(mode="shadow"), decision(mode="off"), decision(mode="assist")])
    r.submit([decision(label="5", mode="full")])
    eventually(lambda: r.counts["ok"] == 1, "the one run")
    r.close(1.0)
    assert [json.loads(x)["label"] for x in out.read_text().splitlines()] == ["5"]
    assert r.counts == {"ok": 1, "failed": 0, "timed_out": 0, "dropped": 0}


# --- the agent running actions ---------------------------------------------------------------
def recorder(out: Path, tag: str) -> list[str]:
    """An action that appends `TAG <env> <the decision on stdin>` to out."""
    return ["/bin/sh", "-c", f'printf "{tag} %s %s %s " "$EVA_LABEL" "$EVA_CONFIDENCE" '
            f'"$EVA_MODEL" >> {out}; cat >> {out}']


def runs(out: Path, complete: bool = True) -> list[tuple[str, str, str, str, dict]]:
    """The recorded runs; `complete=False` skips a line an action is still writing."""
    if not out.exists():
        return []
    got = []
    for line in out.read_text().splitlines(keepends=True):
        if not complete and not line.endswith("}\n"):
            continue
        tag, label, conf, model, rest = line.split(" ", 4)
        got.append((tag, label, conf, model, json.loads(rest)))
    return got


def test_the_agent_runs_actions_for_accepted_decisions_only(tmp_path: Path) -> None:
    out, seven = tmp_path / "runs.txt", tmp_path / "seven.txt"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[decision]\nthreshold = 0.99\n[actions]\n'
                   f'"*" = {toml_argv(recorder(out, "any"))}\n'
                   f'"7" = {toml_argv(recorder(seven, "seven"))}\n')
    tel = tmp_path / "tel.jsonl"
    r = eva("run", "--config", str(cfg), "--source", str(demo_audio()), "--state-dir",
            str(tmp_path / "s"), "--decisions", "-", "--telemetry", f"file:{tel}", "--window",
            "10", timeout=60)
    assert r.returncode == 0, r.stderr
    decisions = [json.loads(x) for x in r.stdout.splitlines()]
    acted = [d for d in decisions if d["accepted"]]
    assert any(not d["accepted"] for d in decisions) and acted
    assert all(d["label"] != "unknown" for d in acted)
    got = runs(out) + runs(seven)
    assert sorted(x[4]["decided_at"] for x in got) == [d["decided_at"] for d in acted]
    for tag, label, conf, model, d in got:
        assert d in acted and label == d["label"] and model == d["model"] == "fsdd-digits@3.0.0"
        assert float(conf) == d["confidence"]
        assert (tag == "seven") == (label == "7")  # the most specific entry wins
    assert [x[4] for x in runs(out)] == [d for d in acted if d["label"] != "7"]  # in order
    stats = [json.loads(x)["payload"] for x in tel.read_text().splitlines()
             if json.loads(x)["topic"].endswith("/stats")]
    outcome = [p["metrics"]["action_outcome"] for p in stats]
    assert sum(m["count"] for m in outcome) == len(acted)
    assert all(m["max"] in (None, 0.0) for m in outcome)
    assert sum(p["metrics"]["action_latency_ms"]["count"] for p in stats) == len(acted)

    # the same in shadow mode: nothing runs
    out.unlink()
    seven.unlink(missing_ok=True)
    r = eva("run", "--config", str(cfg), "--mode", "shadow", "--source", str(demo_audio()),
            "--state-dir", str(tmp_path / "s"), "--decisions", "-", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() and not out.exists() and not seven.exists()


def test_failing_actions_raise_the_action_outcome_alarm(tmp_path: Path) -> None:
    cfg = config_mod.load(None, {"audio.source": str(demo_audio()),
                                 "agent.state_dir": str(tmp_path / "s"),
                                 "output.decisions": str(tmp_path / "d.jsonl"),
                                 "telemetry.sink": f"file:{tmp_path / 'tel.jsonl'}",
                                 "monitoring.window_s": 10.0})
    cfg.actions.labels = {"*": ["/bin/false"]}
    service.run(cfg)
    msgs = [json.loads(x) for x in (tmp_path / "tel.jsonl").read_text().splitlines()]
    alarms = [m["payload"] for m in msgs if m["topic"].endswith("/alarm")]
    raised = [a for a in alarms if a["metric"] == "action_outcome"]
    assert raised and raised[0]["state"] == "raised" and raised[0]["stage"] == "system"
    hist = [m["payload"]["metrics"]["action_outcome"]["hist"] for m in msgs
            if m["topic"].endswith("/stats") and m["payload"]["metrics"]["action_outcome"]["count"]]
    assert hist and all(h[0] == 1 and len(h) == 2 for h in hist)  # every run in bin 1: failed


def test_a_missing_program_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[actions]\n"7" = ["{tmp_path}/nope", "x"]\n')
    r = eva("run", "--config", str(cfg), "--source", str(demo_audio()), "--state-dir",
            str(tmp_path / "s"))
    assert r.returncode == 2 and r.stdout == ""
    errors = [x for x in r.stderr.splitlines() if "error" in x.lower()]
    assert len(errors) == 1 and f"{tmp_path}/nope" in errors[0] and "does not exist" in errors[0]
    assert not (tmp_path / "s" / SOCKET_NAME).exists()


def test_reload_swaps_the_table_and_refuses_a_missing_program_keeping_the_old_one(
        tmp_path: Path, agents: list[Agent]) -> None:  # noqa: F811
    out = tmp_path / "runs.txt"
    cfg = tmp_path / "c.toml"

    def table(tag: str, program: str = "/bin/sh") -> None:
        argv = recorder(out, tag)
        argv[0] = program
        cfg.write_text(f'[decision]\nthreshold = 0.0\n[actions]\n"*" = {toml_argv(argv)}\n')

    table("A")
    a = Agent(["--config", str(cfg), "--source", str(demo_audio()), "--speed", "3",
               "--state-dir", str(tmp_path / "s"), "--decisions", "-"], tmp_path)
    agents.append(a)
    a.until("READY=1")
    eventually(lambda: len(runs(out, False)) >= 1, "a first run of A")
    table("B", program=str(tmp_path / "missing"))
    a.proc.send_signal(signal.SIGHUP)
    refused = a.log_line("reload refused")
    assert "missing" in refused and "does not exist" in refused
    n_refused = len(runs(out, False))
    eventually(lambda: len(runs(out, False)) > n_refused, "A running on after the refusal")
    table("B")
    a.proc.send_signal(signal.SIGHUP)
    line = a.log_line("reloaded at audio")
    at = float(line.split("reloaded at audio ")[1].split(" s")[0])
    assert a.finish() == 0
    got = runs(out)
    tags = [x[0] for x in got]
    assert "A" in tags and "B" in tags
    assert tags == sorted(tags)  # every A before every B: one table or the other, never a mix
    assert all(x[4]["decided_at"] <= at for x in got if x[0] == "A")
    assert all(x[4]["decided_at"] > at for x in got if x[0] == "B")
    assert len([d for d in a.decisions if d["accepted"]]) == len(got)
    assert sum("reload refused" in x for x in a.log) == 1


# --- the README's example works -----------------------------------------------------------------
def _readme_blocks() -> tuple[str, str]:
    """The README's "Speak to it" shell lines and its [actions] table, as a reader copies them."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Speak to it\n", 1)[1].split("\n## ", 1)[0]
    sh = "".join(b.split("```", 1)[0] for b in section.split("```sh\n")[1:])
    toml = section.split("```toml\n", 1)[1].split("```", 1)[0]
    return sh, toml


def test_the_readme_actions_table_loads_and_its_programs_exist(tmp_path: Path) -> None:
    _, toml = _readme_blocks()
    (tmp_path / "c.toml").write_text(toml)
    cfg = config_mod.load(tmp_path / "c.toml")
    table = parse(cfg.actions.labels, cfg.actions.timeout_s, cfg.actions.queue_max)
    assert check(table, [str(i) for i in range(10)]) == []  # programs found, labels known
    assert table.match("7").argv[0] == "/bin/sh" and table.match("3").key == "*"  # type: ignore[union-attr]


def test_the_readme_listen_one_liner_works(tmp_path: Path) -> None:
    sh, _ = _readme_blocks()
    line = next(x for x in sh.splitlines() if x.startswith("edge-voice-agent listen"))
    bindir = Path(sys.executable).parent
    if not (bindir / "edge-voice-agent").exists():
        pytest.skip(f"no edge-voice-agent script next to {sys.executable} (pip install -e .)")
    server = DecisionSocket(tmp_path / SOCKET_NAME)
    try:
        p = subprocess.Popen(["bash", "-c", line], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RUNTIME_DIRECTORY": str(tmp_path),
                                  "PATH": f"{bindir}:{os.environ['PATH']}"})
        eventually(lambda: len(server.readers) == 1, "the one-liner's listen")
        server.publish([decision("7"), decision("3"), decision("7", accepted=False),
                        decision("7")])
    finally:
        server.close()  # listen exits 0 at the agent's end; so does the pipeline
    out, _ = p.communicate(timeout=WAIT_S)
    assert p.returncode == 0
    assert [x.split(" at ")[0] for x in out.splitlines()] == ["seven", "seven"]


def test_socket_drops_reach_the_monitor_as_socket_dropped(tmp_path: Path) -> None:
    from agent.actions.outlets import Outlets

    server = DecisionSocket(tmp_path / SOCKET_NAME, buffer_max=8)
    held = connect(tmp_path / SOCKET_NAME)  # never reads
    outlets = Outlets(server, runner_for(["/bin/true"]))
    seen: list[tuple[str, list[float]]] = []

    class Monitor:
        def observe(self, metric: str, value, clock_s: float) -> None:
            seen.append((metric, list(value)))

    try:
        eventually(lambda: len(server.readers) == 1, "the reader")
        for i in range(3000):
            outlets.publish([decision(accepted=False, t=float(i))])  # no action for these
            if i % 100 == 0:
                time.sleep(0.001)  # let the socket thread fill the kernel buffer
        outlets.report(Monitor(), 1.0)
    finally:
        outlets.close(1.0)
        held.close()
    ((metric, values),) = seen
    assert metric == "socket_dropped" and len(values) == 3000
    assert sum(values) == server.dropped > 0 and set(values) == {0.0, 1.0}
    # the first decision is delivered and the last is dropped (the kernel buffer of a reader
    # that never reads fills up); in between, drops can interleave with deliveries while the
    # socket thread still moves the reader's buffer into the kernel
    assert values[0] == 0.0 and values[-1] == 1.0


def test_a_socket_that_cannot_be_served_is_one_line_and_an_alarm_not_a_stop(
        tmp_path: Path, clip: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    cfg = config_mod.load(None, {"audio.source": str(clip),
                                 "agent.state_dir": str(tmp_path / "s"),
                                 "output.decisions": str(tmp_path / "d.jsonl"),
                                 "output.socket": str(blocker / SOCKET_NAME),
                                 "telemetry.sink": f"file:{tmp_path / 'tel.jsonl'}"})
    with caplog.at_level(logging.WARNING):
        summary = service.run(cfg)
    assert summary.decisions >= 5  # listening went on
    (line,) = [r.getMessage() for r in caplog.records if "decision socket" in r.getMessage()]
    assert str(blocker) in line and "listening goes on without it" in line
    msgs = [json.loads(x) for x in (tmp_path / "tel.jsonl").read_text().splitlines()]
    (alarm,) = [m["payload"] for m in msgs if m["topic"].endswith("/alarm")
                and m["payload"]["metric"] == "socket_dropped"]
    assert alarm["state"] == "raised" and "cannot be created" in alarm["reason"]
