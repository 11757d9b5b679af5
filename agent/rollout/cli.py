"""`edge-voice-agent models list | install PATH | activate NAME@VERSION | rollback | keygen |
sign`.

The device-local face of the model store, for a person at the device (or an update tool). A
running agent picks the new pointers up on reload (`systemctl reload edge-voice-agent`); the
activation starts the same probation as a rollout, compared with the model that ran before.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.actions.table import label_warnings
from agent.actions.table import parse as parse_actions
from agent.errors import AgentError, one_line
from agent.recognition.model import MANIFEST, Manifest
from agent.resources import default_model_dir
from agent.rollout.compat import vocabulary_changes, vocabulary_difference
from agent.rollout.store import ModelStore, Probation

RELOAD_HINT = "a running agent applies it on reload: systemctl reload edge-voice-agent"


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="the on-device model store: list, install, activate, "
                            "roll back")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="MODELS_COMMAND")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", type=Path, default=None, help="TOML config file")
        p.add_argument("--state-dir", default=None, help="state directory [from the config]")
        return p

    common(msub.add_parser("list", help="installed models, their pointers and integrity"))
    i = common(msub.add_parser("install", help="verify a model directory (sha256 of every "
                               "file, compatibility) and copy it into its own slot"))
    i.add_argument("path", type=Path)
    vocab = ("its classes may differ from the running model's (a new vocabulary, on purpose); "
             "without it such a model is refused")
    i.add_argument("--allow-vocabulary-change", action="store_true", help=vocab)
    a = common(msub.add_parser("activate", help="make an installed model active (blue-green; "
                               "the previous one stays for rollback; starts probation)"))
    a.add_argument("ref", metavar="NAME@VERSION")
    a.add_argument("--override-failed", action="store_true",
                   help="activate a build this device remembers as failed (the operator's "
                   "explicit decision; the device reports it)")
    a.add_argument("--allow-vocabulary-change", action="store_true", help=vocab)
    common(msub.add_parser("rollback", help="back to the previous model (never to a build "
                           "that failed probation)"))
    k = msub.add_parser("keygen", help="make an ed25519 signing key pair (offline; the .pub "
                        "line goes into the devices' rollout.trusted_keys)")
    k.add_argument("key", type=Path, metavar="FILE", help="private key file to create (0600)")
    sg = msub.add_parser("sign", help="sign a model bundle (writes DIR/bundle.sig over the "
                         "digest of every file in it)")
    sg.add_argument("dir", type=Path, metavar="DIR")
    sg.add_argument("--key", type=Path, required=True, metavar="FILE")
    models.set_defaults(models_func=run)


def _cfg(args: argparse.Namespace) -> config_mod.Config:
    overrides = {"agent.state_dir": args.state_dir} if args.state_dir else {}
    return config_mod.load(args.config, overrides)


def _running(cfg: config_mod.Config, store: ModelStore) -> Manifest:
    """The manifest of the model an agent with this configuration runs now."""
    if cfg.model.path:
        return Manifest.read(Path(cfg.model.path) / MANIFEST)
    active = store.pointers().active
    d = store.slot_dir(active) if active else default_model_dir()
    return Manifest.read(d / MANIFEST)


def run(args: argparse.Namespace) -> int:
    if args.models_command in ("keygen", "sign"):
        return _signing(args)
    cfg = _cfg(args)
    store = ModelStore(cfg.state_path(), cfg.rollout.trusted())
    if args.models_command == "list":
        return _list(cfg, store)
    if cfg.model.path and args.models_command in ("activate", "rollback"):
        raise AgentError(f"model.path = {cfg.model.path} pins the model in the configuration; "
                         "empty it to run models from the store")
    if args.models_command == "install":
        ref = store.install(args.path, _running(cfg, store),
                            allow_vocabulary_change=args.allow_vocabulary_change)
        print(f"installed {ref} (bundle sha256 {store.digest(ref)}) in {store.slot_dir(ref)}")
    elif args.models_command == "activate":
        running = _running(cfg, store)
        previous = running.ref
        failed = store.failure(args.ref)
        new = Manifest.read(store.slot_dir(args.ref) / MANIFEST) if store.has(args.ref) \
            else None
        changed = new is not None and vocabulary_changes(new, running)
        p = store.activate(args.ref, running, Probation(
            ref=args.ref, previous=previous, windows_total=cfg.rollout.probation_windows,
            vocabulary_change=changed), override=args.override_failed,
            allow_vocabulary_change=args.allow_vocabulary_change)
        note = (f"; OVERRIDE: it failed probation before ({failed.get('reason', '')}), the "
                "device reports this override") if failed is not None else ""
        if changed and new is not None:
            note += f"; vocabulary changed ({vocabulary_difference(new, running)})"
            table = parse_actions(cfg.actions.labels, origin=str(args.config or "config"))
            for warning in label_warnings(table, new.classes):
                print(f"warning: {warning}", file=sys.stderr)
        print(f"active: {p.active} (previous: {previous}); probation "
              f"{cfg.rollout.probation_windows} windows{note}; {RELOAD_HINT}")
    elif args.models_command == "rollback":
        # a person rolling back says the build is bad: remembered like a failed probation,
        # so neither the stored rollout command nor a restart brings it back
        p = store.rollback(failed_reason="rolled back on the device with 'models rollback'")
        print(f"active: {p.active or 'the bundled model'} (rolled back from {p.previous}, "
              f"remembered as failed: only 'models activate {p.previous} --override-failed' "
              f"runs it again); {RELOAD_HINT}")
    return 0


def _signing(args: argparse.Namespace) -> int:
    from agent.rollout import signing

    if args.models_command == "keygen":
        pub = signing.keygen(args.key)
        print(f"private key: {args.key} (keep it offline); public key ({args.key}.pub), for "
              f"the devices' rollout.trusted_keys:\n{pub}")
        return 0
    digest, pub = signing.sign(args.dir, args.key)
    print(f"signed {args.dir} (bundle sha256 {digest}) with {pub}")
    return 0


def _list(cfg: config_mod.Config, store: ModelStore) -> int:
    p = store.pointers()
    roles = {p.active: "active", p.candidate: "candidate", p.previous: "previous"}
    bundled = Manifest.read(default_model_dir() / MANIFEST)
    runs = "configured" if cfg.model.path else ("store" if p.active else "bundled")
    print(f"running: {_running(cfg, store).ref} ({runs}); bundled: {bundled.ref}")
    status = 0
    for s in store.installed():
        try:
            store.verify(s.ref)
            ok = "verified"
        except AgentError as e:
            ok, status = f"REFUSED: {one_line(e)}", 1
        role = roles.get(s.ref, "")
        f = p.failure(s.ref)
        if f is not None:
            ok += f"; FAILED probation: {f.get('reason', '')}" + \
                (" (overridden)" if f.get("override") else "")
        print(f"{s.ref:32s} {role:9s} bundle sha256 {s.digest[:16]}…  {ok}")
    if p.probation is not None:
        print(f"probation: {p.probation.ref}, {p.probation.windows_done}/"
              f"{p.probation.windows_total} windows")
    return status
