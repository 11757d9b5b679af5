"""The device's side of a rollout: from the operator's retained command to a model running,
shadowing, on probation, committed or rolled back — and every step reported.

Runs on the pipeline thread only (`poll()` between blocks, `window_sections()` when a stats
window closes); the MQTT thread only `submit()`s raw messages. The last valid command is kept in
the store (`models/rollout.json`) so a restart without a broker continues the same rollout.

States (`rollout.state` in stats and birth): idle, out_of_cohort, waiting_for_files (the model
is not in the inbox yet), waiting_for_baseline (the running model has too few recent windows to
compare a successor with), shadow, probation, committed, rolled_back, refused, finished (the
operator ended the rollout; what runs stays).

The memory of failures: a build rolled back (probation breached, or a crash loop) is remembered
in the store by its bundle digest, in the same atomic write as the pointer move, so neither the
stored command nor a restart nor `models rollback` activates it again; a command naming it
leaves the device `rolled_back`, saying why. Only `models activate --override-failed` runs it
again, and the device reports that override (`failure_overridden`).
"""

from __future__ import annotations

import json
import logging
import queue
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from agent.errors import AgentError, one_line
from agent.monitoring.drift import AlarmEvent
from agent.monitoring.windows import WindowSummary
from agent.recognition.decision import Policy, Thresholds
from agent.recognition.model import MANIFEST, Manifest, ModelRunner
from agent.resources import default_model_dir
from agent.rollout import command as cmd_mod
from agent.rollout.bundle import bundle_digest
from agent.rollout.cohort import in_cohort
from agent.rollout.command import CommandError, RolloutCommand
from agent.rollout.compat import thresholds_path, vocabulary_changes, vocabulary_difference
from agent.rollout.experience import ExperienceTracker
from agent.rollout.probation import (
    VOCABULARY_BOUND,
    Limits,
    Paired,
    Recent,
    judge,
    kpis_of,
    not_compared_note,
)
from agent.rollout.shadow import ShadowRunner
from agent.rollout.store import ModelStore, Probation, atomic_write_json, failed_text

if TYPE_CHECKING:
    from agent.config import Config
    from agent.monitoring.monitor import Monitor
    from agent.recognition.pipeline import Pipeline

log = logging.getLogger("edge-voice-agent.rollout")

DESIRED = "rollout.json"
RECENT = "recent.json"  # the running model's recent values, for a probation started offline
RETRY_S = 2.0          # how often a waiting rollout looks at the inbox again
MAX_PROBATION_STARTS = 3  # starts during one probation before it counts as a crash loop
ALARM = "model_probation"
REASON_MAX = 200
MAX_FAILED_SHOWN = 8  # failed builds listed in the stats' rollout section


class Host(Protocol):
    """What the controller needs from the service."""

    pipeline: Pipeline
    monitor: Monitor
    device_id: str

    def switch_model(self) -> None:
        """Load the store's active model (or the configured/bundled one) and swap it in."""


def find_in_inbox(inbox: Path, c: RolloutCommand) -> Path | None:
    """The delivered directory for the command's model: <inbox>/<name>@<version>/ or any
    directory there whose manifest names the same model and version."""
    exact = inbox / c.ref
    if (exact / MANIFEST).is_file():
        return exact
    if not inbox.is_dir():
        return None
    for d in sorted(inbox.iterdir()):
        try:
            m = Manifest.read(d / MANIFEST) if (d / MANIFEST).is_file() else None
        except AgentError:
            continue
        if m is not None and m.ref == c.ref:
            return d
    return None


class RolloutController:
    def __init__(self, cfg: Config, host: Host, *, pinned: bool) -> None:
        self.cfg, self.host, self.pinned = cfg, host, pinned
        rc = cfg.rollout
        self.rc = rc
        self.limits = Limits.from_config(rc)
        self.store = ModelStore(cfg.state_path(), rc.trusted())
        self.inbox = Path(rc.inbox) if rc.inbox else cfg.state_path() / "inbox"
        self.device_id = host.device_id
        self.experience = ExperienceTracker(rc.retry_s)
        self.recent = Recent(rc.baseline_windows, rc.min_utterances)
        self.shadow: ShadowRunner | None = None
        self.command: RolloutCommand | None = None
        self.state = "idle"
        self.cohort: str | None = None
        self.reason = ""
        self._inq: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._raw: dict[str, bytes] = {}
        self._fleet_topic, self._device_topic = cmd_mod.topics(
            host.monitor.prefix, host.device_id)
        self._breach_run = 0
        self._last_breach = ""
        self._pool: list = []  # the probation's eligible windows so far (this boot)
        # the previous model shadowing the candidate during probation (agent.rollout.probation
        # Paired): (probation ref, runner or None when it could not be loaded)
        self._paired: tuple[str, ShadowRunner | None] | None = None
        self._paired_pool = Paired()
        self._pending: tuple[str, str] | None = None
        self._retry_at = 0.0
        self._shadow_listeners: list = []
        self._warm_logged = False
        self.samples: Any = None  # agent.monitoring.samples.SampleRecorder when samples.enabled
        host.pipeline.observers.append(self.experience)
        host.monitor.sections.append(self.window_sections)
        self.probation = self.store.pointers().probation
        if self.probation is not None:
            self._resume_probation()
            self._report_override(self.probation.ref)
        self.command = self._load_desired()
        if self.command is not None:
            self._apply(self.command, resumed=True)
        self._sync_paired()

    # --- intake -------------------------------------------------------------------------
    @property
    def topics(self) -> list[str]:
        return [self._fleet_topic, self._device_topic]

    def submit(self, topic: str, payload: bytes) -> None:
        """Thread-safe: a message arrived on a rollout topic (from the MQTT thread)."""
        self._inq.put((topic, bytes(payload)))

    def poll(self) -> None:
        """Between blocks: take new commands, retry waiting ones, run pending switches."""
        changed = False
        while True:
            try:
                t, payload = self._inq.get_nowait()
            except queue.Empty:
                break
            if t in (self._fleet_topic, self._device_topic):
                self._raw[t] = payload
                changed = True
        if changed:
            self._take_command()
        if self._pending is not None:
            action, reason = self._pending
            self._pending = None
            self._rollback(reason) if action == "rollback" else self._commit()
        if self.state in ("waiting_for_files", "waiting_for_baseline") and \
                time.monotonic() >= self._retry_at and self.command is not None:
            self._apply(self.command, resumed=True)
        self._sync_paired()

    def _sync_paired(self) -> None:
        """During probation the previous model shadows the candidate, so each window compares
        both on the same utterances; outside probation nothing extra runs."""
        p = self.probation
        want = p.ref if p is not None and p.ref == self._running_ref() else None
        have = self._paired[0] if self._paired is not None else None
        if want == have:
            return
        if self._paired is not None and self._paired[1] is not None:
            if self._paired[1] in self.host.pipeline.observers:
                self.host.pipeline.observers.remove(self._paired[1])
        self._paired, self._paired_pool = None, Paired()
        if want is None or p is None:
            return
        runner = None
        try:
            runner = self._previous_runner(p.previous)
        except AgentError as e:
            log.warning("probation of %s compares with %s's recent windows only: %s", p.ref,
                        p.previous, one_line(e))
        if runner is not None:
            self.host.pipeline.observers.append(runner)
        self._paired = (want, runner)

    def _previous_runner(self, ref: str | None) -> ShadowRunner | None:
        """The previous model as a shadow of the running candidate (its head only, when they
        share the front end); None when it is not on this device any more."""
        if ref is None:
            return None
        if self.store.has(ref):
            d = self.store.slot_dir(ref)
            self.store.check_slot(ref)
        elif Manifest.read(default_model_dir() / MANIFEST).ref == ref:
            d = default_model_dir()
        else:
            return None
        active = self.host.pipeline.model
        model = ModelRunner(d, share_from=active)
        m = model.manifest
        t = Thresholds.read(thresholds_path(d, m))
        return ShadowRunner(model, Policy("partial", t.threshold, m.unknown_label),
                            self.host.pipeline.rate, active=lambda: self.host.pipeline.model,
                            personal=lambda: self.host.pipeline.personal,
                            active_policy=lambda: self.host.pipeline.policy)

    def _take_command(self) -> None:
        raw = self._raw.get(self._device_topic, b"")
        source = self._device_topic
        if not raw.strip():
            raw, source = self._raw.get(self._fleet_topic, b""), self._fleet_topic
        try:
            c = cmd_mod.parse(raw)
        except CommandError as e:
            self._refuse(None, f"{source}: {e}")
            return
        if c is None:
            if self.command is not None:
                self._abort()
            return
        if c == self.command and self.state not in ("refused",):
            return
        if c.mode == "finish":
            self._finish(c)
            return
        self._event("rollout_received", c, f"{c.mode} {c.ref} at {c.percent:g} % from {source}")
        self._save_desired(c)
        self.command = c
        self._apply(c)

    def after_decisions(self) -> None:
        """After the active decisions of a block were written: the shadow's turn."""
        if self.shadow is not None:
            self.shadow.run_pending()
        if self._paired is not None and self._paired[1] is not None:
            self._paired[1].run_pending()
        if self.samples is not None:
            self.samples.flush()

    # --- applying -----------------------------------------------------------------------
    def _apply(self, c: RolloutCommand, resumed: bool = False) -> None:
        self._retry_at = time.monotonic() + RETRY_S
        if c.mode == "finish":
            self._finish(c, resumed=resumed)
            return
        self.cohort = "in" if in_cohort(c.id, self.device_id, c.percent) else "out"
        if self.cohort == "out":
            if self.state != "out_of_cohort":
                self._leave(c)
                self._set("out_of_cohort", c, f"{self.device_id} is not in the {c.percent:g} % "
                          f"cohort of {c.id}", event="out_of_cohort")
            return
        if self.pinned:
            self._refuse(c, "model.path is set in the configuration, which pins the model; "
                         "empty it to let rollouts manage the model")
            return
        running = self._running_ref()
        failed = self.store.pointers().failed.get(c.sha256)
        if c.mode == "activate" and failed is not None and not failed.get("override") and \
                not (running == c.ref and self.probation is not None):
            self._stop_shadow()
            if self.state != "rolled_back" or not resumed:
                self._set("rolled_back", c, failed_text(c.ref, failed) + "; not activated "
                          "again (models activate --override-failed on the device would)",
                          event="" if resumed else "rollout_refused")
            return
        if running == c.ref:
            why = self._other_build(c)
            if why:
                self._refuse(c, why)
                return
        if c.mode == "activate" and running == c.ref:
            state = "probation" if self.probation is not None else "committed"
            if self.state != state:
                self._set(state, c, "")
            self._stop_shadow()
            return
        try:
            if not self._ensure_installed(c):
                if self.state != "waiting_for_files":
                    self._set("waiting_for_files", c, f"{c.ref} is not in the inbox {self.inbox} "
                              "yet", event="waiting_for_files")
                return
            if c.mode == "shadow":
                self._start_shadow(c)
            else:
                self._activate(c)
        except AgentError as e:
            self._refuse(c, one_line(e))

    def _other_build(self, c: RolloutCommand) -> str:
        """Why a command naming the running build's NAME@VERSION is another build, or "".
        A store slot is known by its bundle digest; the bundled or configured model by its
        build digest and calibration, compared with the delivered bundle's."""
        have = self.store.digest(c.ref) if self.store.pointers().active == c.ref else None
        if have is not None:
            same = have == c.sha256
        else:
            src = find_in_inbox(self.inbox, c)
            if src is None:
                return ""  # nothing delivered to compare with: the running build stays
            running = self.host.pipeline.model
            try:
                m = Manifest.read(src / MANIFEST)
                same = running is not None and bundle_digest(src) == c.sha256 and \
                    m.sha256 == running.manifest.sha256 and \
                    Thresholds.read(thresholds_path(src, m)).threshold == Thresholds.read(
                        thresholds_path(running.directory, running.manifest)).threshold
            except AgentError:
                same = False
        if same:
            return ""
        return (f"{c.ref} is the running build's name and version, but the rollout names "
                f"another build (bundle sha256 {c.sha256[:12]}…); a new build needs a new "
                "version")

    def _ensure_installed(self, c: RolloutCommand) -> bool:
        if self.store.has(c.ref):
            have = self.store.digest(c.ref) or bundle_digest(self.store.slot_dir(c.ref))
            if have != c.sha256:
                raise AgentError(f"installed {c.ref} has bundle sha256 {have[:12]}…, the "
                                 f"rollout names {c.sha256[:12]}…; publish the right sha256 or "
                                 "a new version")
            return True
        src = find_in_inbox(self.inbox, c)
        if src is None:
            return False
        self.store.install(src, self._running_manifest(), expect_digest=c.sha256, load=False,
                           allow_vocabulary_change=c.vocabulary_change)
        log.info("installed %s from %s into the model store", c.ref, src)
        return True

    def _start_shadow(self, c: RolloutCommand) -> None:
        if self.shadow is not None and self.shadow.ref == c.ref:
            if self.state != "shadow":
                self._set("shadow", c, "")
            return
        self._stop_shadow()
        model = self._load_candidate(c.ref, c.vocabulary_change)
        m = model.manifest
        running = self._running_manifest()
        changed = vocabulary_changes(m, running)
        t = Thresholds.read(thresholds_path(model.directory, m))
        self.shadow = ShadowRunner(model, Policy("partial", t.threshold, m.unknown_label,
                                                 t.per_class, self.host.pipeline.policy.addressing),
                                   self.host.pipeline.rate,
                                   active=lambda: self.host.pipeline.model,
                                   personal=lambda: self.host.pipeline.personal,
                                   active_policy=lambda: self.host.pipeline.policy,
                                   comparable=not changed)
        self.shadow.on_result.extend(self._shadow_listeners)
        self.host.pipeline.observers.append(self.shadow)
        self.store.set_candidate(c.ref)
        note = (f"; vocabulary changes ({vocabulary_difference(m, running)}): agreement and "
                "estimated accuracy not compared, abstain rate and latency are"
                if changed and running is not None else "")
        self._set("shadow", c, f"candidate {c.ref} runs beside {self._running_ref()}{note}",
                  event="shadow_started")

    def _load_candidate(self, ref: str, allow_vocabulary_change: bool = False) -> ModelRunner:
        """The candidate's runner; the active one itself when it is the very same build
        (same manifest sha256), so a shadow of an identical model costs no memory."""
        active = self.host.pipeline.model
        if active is not None and active.manifest.ref == ref:
            return active
        cand = self.store.verify(ref, self._running_manifest(), share_from=active,
                                 allow_vocabulary_change=allow_vocabulary_change)
        assert cand is not None
        if active is not None and cand.embedder is active.embedder:
            log.info("shadow %s shares the front end of %s (same sha256)", ref,
                     active.manifest.ref)
        return cand

    def _stop_shadow(self) -> None:
        if self.shadow is not None:
            if self.shadow in self.host.pipeline.observers:
                self.host.pipeline.observers.remove(self.shadow)
            self.shadow = None
            if self.store.pointers().candidate is not None:
                self.store.set_candidate(None)

    def _activate(self, c: RolloutCommand) -> None:
        if not self.recent.full:
            if self.state != "waiting_for_baseline":
                self._set("waiting_for_baseline", c, f"{len(self.recent.windows)} of "
                          f"{self.rc.baseline_windows} recent windows of the running model",
                          event="waiting_for_baseline")
            return
        self._stop_shadow()
        previous = self._running_ref()
        running = self._running_manifest()
        new = Manifest.read(self.store.slot_dir(c.ref) / MANIFEST)
        changed = vocabulary_changes(new, running)
        prob = Probation(ref=c.ref, previous=previous, windows_total=self.rc.probation_windows,
                         rollout_id=c.id, baseline=self._baseline(), vocabulary_change=changed)
        before = self.store.pointers()
        self.store.activate(c.ref, running, prob, load=False,  # the switch loads it
                            allow_vocabulary_change=c.vocabulary_change)
        try:
            self.host.switch_model()
        except AgentError as e:
            self.store.set_pointers(before)
            raise AgentError(f"activating {c.ref} failed, {previous} keeps running: "
                             f"{one_line(e)}") from None
        self.probation = prob
        self._breach_run = 0
        self._pool = []
        self.recent.clear()
        self._clear_alarm(f"{c.ref} activated")
        note = f"; {not_compared_note(True)}; {vocabulary_difference(new, running)}" \
            if changed and running is not None else ""
        self._set("probation", c, f"{c.ref} replaced {previous}; probation "
                  f"{self.rc.probation_windows} windows{note}", event="activated",
                  previous=previous)

    def _rollback(self, reason: str) -> None:
        prob = self.probation
        bad = prob.ref if prob else self._running_ref()
        try:
            self.store.rollback(failed_reason=reason)
        except AgentError as e:
            log.error("rollback of %s refused: %s", bad, one_line(e))
            self._set("refused", self.command, f"{bad} breached probation ({reason}) but "
                      f"cannot be rolled back: {one_line(e)}"[:REASON_MAX],
                      event="rollout_refused")
            return
        self.probation = None
        try:
            self.host.switch_model()
        except AgentError as e:
            log.error("rollback of %s failed: %s", bad, one_line(e))
            reason = f"{reason}; rollback failed: {one_line(e)}"
        self.recent.clear()
        back = self._running_ref()
        text = f"{bad} rolled back to {back}: {reason}"
        if prob is not None and prob.vocabulary_change:
            text += f" ({not_compared_note(True)})"
        log.warning("probation: %s", text)
        self.host.monitor.service_alarm(AlarmEvent(
            ALARM, "model", "raised", 1.0, 0.0, self.host.pipeline.clock_s, text[:REASON_MAX]))
        self._set("rolled_back", self.command, text, event="rolled_back", model=bad,
                  previous=back)

    def _finish(self, c: RolloutCommand, resumed: bool = False) -> None:
        """The operator ended the rollout: nothing is rolled back. A shadow stops; a probation
        in progress runs to its verdict; the command stays stored so a restart stays finished."""
        self._stop_shadow()
        if not resumed:
            self._save_desired(c)
        self.command = c
        runs = self._running_ref()
        if self.probation is not None:
            self._set("probation", c, f"rollout {c.id} finished; {runs} stays on probation "
                      "until its verdict", event="" if resumed else "rollout_finished")
            return
        self._set("finished", c, f"rollout {c.id} finished by the operator; {runs} stays",
                  event="" if resumed else "rollout_finished")

    def _report_override(self, ref: str) -> None:
        f = self.store.failure(ref)
        if f is not None and f.get("override"):
            self._event("failure_overridden", self.command, failed_text(ref, f) + "; run again "
                        "by an operator override (models activate --override-failed)",
                        model=ref)

    def _commit(self) -> None:
        prob = self.probation
        self.store.commit()
        self.probation = None
        self._set("committed", self.command, f"{prob.ref if prob else ''} passed probation"
                  + (f" ({prob.windows_done} windows of its own, none breached)" if prob else "")
                  + (f"; {not_compared_note(True)}" if prob and prob.vocabulary_change else ""),
                  event="probation_passed")

    def _abort(self) -> None:
        c = self.command
        self._leave(c)
        self.command = None
        self._save_desired(None)
        self._set("idle", c, "rollout withdrawn by the operator", event="rollout_aborted")
        self.cohort = None

    def _leave(self, c: RolloutCommand | None) -> None:
        """Undo what a rollout did on this device (withdrawn, or the device left the cohort)."""
        self._stop_shadow()
        if c is not None and c.mode == "activate" and self.state != "finished" and \
                self._running_ref() == c.ref and \
                self.store.pointers().active == c.ref:
            self.probation = None
            self.store.rollback()
            self.host.switch_model()
            self.recent.clear()

    def _save_recent(self) -> None:
        try:
            atomic_write_json(self.store.root / RECENT, {"ref": self._running_ref(),
                                                         "baseline": self.recent.baseline()})
        except OSError as e:
            log.debug("recent values not saved: %s", e)

    def _saved_baseline(self, ref: str | None) -> dict[str, Any]:
        """The recent values saved while `ref` ran (a probation begun with the agent stopped,
        e.g. `models activate` then a restart, is compared with them)."""
        try:
            d = json.loads((self.store.root / RECENT).read_text())
        except (OSError, ValueError):
            return {}
        return dict(d.get("baseline") or {}) if isinstance(d, dict) and d.get("ref") == ref \
            else {}

    def _resume_probation(self) -> None:
        p = self.probation
        assert p is not None
        p = replace(p, starts=p.starts + 1)
        if not p.baseline:
            p = replace(p, baseline=self._saved_baseline(p.previous))
        self.probation = p
        self.store.set_pointers(replace(self.store.pointers(), probation=p))
        if p.starts > MAX_PROBATION_STARTS:
            self._pending = ("rollback", f"the agent started {p.starts} times during probation")

    def on_reload(self) -> None:
        """After a SIGHUP reload: `models activate`/`rollback` may have moved the pointers.
        An activation made there starts its probation now, against the recent values of the
        model that ran until the reload."""
        p = self.store.pointers().probation
        running = self._running_ref()
        if p is not None and p.ref == running and (self.probation is None
                                                   or self.probation.ref != p.ref):
            if not p.baseline:
                p = replace(p, baseline={**(self.recent.baseline() or
                                            self._saved_baseline(p.previous)),
                                         "personal": self._personal()})
                self.store.set_pointers(replace(self.store.pointers(), probation=p))
            self.probation, self._breach_run, self._pool = p, 0, []
            self.recent.clear()
            self._clear_alarm(f"{p.ref} activated")
            self._report_override(p.ref)
            note = f"; {not_compared_note(True)}" if p.vocabulary_change else ""
            self._set("probation", self.command, f"{p.ref} activated locally, replacing "
                      f"{p.previous}{note}", event="activated", model=p.ref,
                      previous=p.previous)
        elif p is None and self.probation is not None:
            self.probation = None
            self.recent.clear()
            self._set("idle", self.command, f"probation ended by a local change; {running} runs")

    # --- windows ------------------------------------------------------------------------
    def window_sections(self, s: WindowSummary) -> dict[str, Any]:
        """Called by the monitor as a stats window closes: probation and recent values move
        on, and the payload gets its `rollout` and `experience` sections."""
        exp = self.experience.take()
        k = kpis_of(s, exp)
        shadow = self.shadow.take().section() if self.shadow is not None else None
        paired = None
        if self._paired is not None and self._paired[1] is not None:
            c = self._paired[1].take()
            paired = Paired(c.n, c.abstained, c.best_word_sum, c.accepted_n,
                            c.accepted_conf_sum)
        p = self.probation
        decided_by = set(exp.by_model)
        if p is None:
            if decided_by <= {self._running_ref()}:  # only the running model's own windows
                self.recent.add(k)
                if self.recent.full and k.utterances >= self.rc.min_utterances:
                    self._save_recent()
            if self.state == "waiting_for_baseline":
                self._retry_at = 0.0  # look again at the next poll, not after RETRY_S
        elif k.utterances >= self.rc.min_utterances and self._pending is None and \
                decided_by <= {p.ref} and \
                not self._warming_up(p.baseline):  # no decision by another model in it
            self._pool.append(k)
            if paired is not None:
                self._paired_pool = self._paired_pool + paired
            mu = self.rc.min_utterances
            v = judge(k, self._pool, p.baseline, self.limits, breach_run=self._breach_run,
                      breached=p.breached, done=p.windows_done + 1, total=p.windows_total,
                      breach_windows=self.rc.breach_windows,
                      paired=paired.figures(mu) if paired is not None else None,
                      paired_so_far=self._paired_pool.figures(mu),
                      not_compared=VOCABULARY_BOUND if p.vocabulary_change else ())
            self._breach_run = v.breach_run
            if v.reasons:
                self._last_breach = "; ".join(v.reasons)
            p = replace(p, windows_done=p.windows_done + 1, breached=v.breached)
            self.probation = p
            self.store.set_pointers(replace(self.store.pointers(), probation=p))
            if v.action == "rollback":
                why = "; ".join(v.reasons)
                if v.breach_run < self.rc.breach_windows:  # the end of an unclean probation
                    why = (f"{v.breached} of its {p.windows_done} probation windows breached "
                           f"the limits (last: {self._last_breach}); a pass needs none")
                self._pending = ("rollback", why)
            elif v.action == "commit":
                self._pending = ("commit", "")
        return {"rollout": self.section(shadow), "experience": exp.section()}

    def section(self, shadow: dict[str, Any] | None = None) -> dict[str, Any]:
        c, p = self.command, self.probation
        ptr = self.store.pointers()
        return {"id": c.id if c else None, "cohort": self.cohort,
                "percent": c.percent if c else None, "mode": c.mode if c else None,
                "state": self.state,
                "candidate": (self.shadow.ref if self.shadow else (p.ref if p else None)),
                "previous": ptr.previous,
                "probation": {"windows_done": p.windows_done, "windows_total": p.windows_total,
                              "like_for_like": self._like_for_like(p.baseline)}
                if p else None,
                "shadow": shadow, "reason": self.reason[:REASON_MAX] or None,
                "failed": self.store.failed_refs()[-MAX_FAILED_SHOWN:]}

    # --- personalisation: compare like with like ----------------------------------------
    def _personal(self) -> str:
        """How decisions are personalised now (agent.personal.device.Personalizer.signature):
        recorded with a probation's baseline, compared during it."""
        sig = getattr(self.host.pipeline.personal, "signature", None)
        return sig() if sig is not None else "plain"

    def _baseline(self) -> dict[str, Any]:
        return {**self.recent.baseline(), "personal": self._personal()}

    def _warming_up(self, baseline: dict[str, Any]) -> bool:
        """The previous model decided with device adaptation, the new one's adaptation (reset
        with the model) is not active yet: its windows would not compare like with like, so
        they wait, like quiet windows (it comes back after personal.adaptation_min_utterances).
        A new model that cannot adapt at all (no head-input reference) does not wait: its
        windows count and `like_for_like` says false."""
        then = str(baseline.get("personal", ""))
        personal = self.host.pipeline.personal
        learning = getattr(personal, "adapter", None) is not None and \
            not getattr(personal, "adapting", False)  # it will adapt, it does not yet
        if "adapted" in then.split("+") and learning:
            if not self._warm_logged:
                self._warm_logged = True
                log.info("probation windows wait for the new model's device adaptation (the "
                         "previous model decided with it)")
            return True
        return False

    def _like_for_like(self, baseline: dict[str, Any]) -> bool:
        then = baseline.get("personal")
        return then is None or then == self._personal()

    # --- helpers ------------------------------------------------------------------------
    def _running_ref(self) -> str:
        m = self.host.pipeline.model
        return m.manifest.ref if m is not None else "none"

    def _running_manifest(self) -> Manifest | None:
        m = self.host.pipeline.model
        return m.manifest if m is not None else None

    def _refuse(self, c: RolloutCommand | None, reason: str) -> None:
        log.error("rollout refused: %s", reason)
        self._set("refused", c, reason, event="rollout_refused")

    def _set(self, state: str, c: RolloutCommand | None, reason: str, *, event: str = "",
             model: str | None = None, previous: str | None = None) -> None:
        self.state, self.reason = state, reason
        if event:
            self._event(event, c, reason, model=model, previous=previous)

    def _event(self, event: str, c: RolloutCommand | None, reason: str, *,
               model: str | None = None, previous: str | None = None) -> None:
        self.host.monitor.emit_event({
            "event": event, "rollout_id": c.id if c else None,
            "model": model or (c.ref if c else None), "previous": previous,
            "state": self.state, "reason": reason[:REASON_MAX],
            "window_end_s": round(self.host.pipeline.clock_s, 3)})

    def _clear_alarm(self, why: str) -> None:
        if ALARM in self.host.monitor.held_alarms:
            self.host.monitor.service_alarm(AlarmEvent(
                ALARM, "model", "cleared", 0.0, 0.0, self.host.pipeline.clock_s, why))

    def _save_desired(self, c: RolloutCommand | None) -> None:
        path = self.store.root / DESIRED
        try:
            self.store.root.mkdir(parents=True, exist_ok=True)
            if c is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_json(path, c.to_payload())
        except OSError as e:
            log.warning("rollout state %s cannot be saved (%s); a restart without the broker "
                        "forgets this rollout", path, e.strerror)

    def _load_desired(self) -> RolloutCommand | None:
        path = self.store.root / DESIRED
        if not path.is_file():
            return None
        try:
            return cmd_mod.parse(path.read_bytes())
        except (OSError, CommandError) as e:
            log.warning("saved rollout %s ignored: %s", path, one_line(e))
            return None

    def add_shadow_listener(self, f) -> None:
        """`f(outcome, shadow_result)` for every shadow decision (review samples use it)."""
        self._shadow_listeners.append(f)
        if self.shadow is not None:
            self.shadow.on_result.append(f)

    def birth_section(self) -> dict[str, Any]:
        d = self.section()
        d.pop("shadow")
        return d

