"""Command line: subcommands map onto the functions of the package; errors become one line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

from agent import __version__
from agent import config as config_mod
from agent.errors import AgentError

PROG = "edge-voice-agent"


def _add_settings(p: argparse.ArgumentParser) -> None:
    """--config plus one flag per setting (`--section-key`, and a short alias for common ones)."""
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config file (default {config_mod.DEFAULT_CONFIG_PATH} if present)")
    g = p.add_argument_group("settings (each overrides the config file)")
    for section, f in config_mod.settings():
        names = [config_mod.flag_name(section, f)]
        if f.metadata.get("alias"):
            names.insert(0, f"--{f.metadata['alias']}")
        g.add_argument(*names, dest=f"set:{section}.{f.name}", default=argparse.SUPPRESS,
                       metavar=f.name.upper(), help=f"{f.metadata['help']} [{f.default!r}]")


def _config(args: argparse.Namespace, **forced) -> config_mod.Config:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:")}
    overrides.update(forced)
    return config_mod.load(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="On-device spoken-digit recognition with "
                                "calibrated confidence and aggregated fleet monitoring.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="stderr log level [INFO]")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add = sub.add_parser

    def add_parser(name: str, **kw) -> argparse.ArgumentParser:
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    run = sub.add_parser("run", help="listen to a microphone or file and decide on each utterance")
    _add_settings(run)

    demo = sub.add_parser("demo", help="run the whole pipeline on the bundled demo recording")
    _add_settings(demo)

    cl = sub.add_parser("classify", help="classify each audio file as one utterance")
    cl.add_argument("files", nargs="+", type=Path)
    _add_settings(cl)

    tr = sub.add_parser("train", help="train, evaluate (leave-one-speaker-out) and export a "
                        "model (needs the 'train' extra)")
    tr.add_argument("--data", required=True, type=Path, help="folder of {digit}_{speaker}_{take}"
                    ".wav recordings")
    tr.add_argument("--out", type=Path, default=Path("models/fsdd-digits"),
                    help="model directory to write [models/fsdd-digits]")
    tr.add_argument("--calibration-out", type=Path, default=None,
                    help="where thresholds.json goes [calibration/<model name>]")
    tr.add_argument("--name", default="fsdd-digits")
    tr.add_argument("--model-version", default="0.1.0")
    tr.add_argument("--speakers", default="", help="comma list of speakers to use; empty = all")
    tr.add_argument("--limit-per-class", type=int, default=None,
                    help="at most N clips per speaker and digit (quick runs)")
    tr.add_argument("--target-precision", type=float, default=0.99)
    tr.add_argument("--seed", type=int, default=0)

    doc = sub.add_parser("doctor", help="check audio devices, model, calibration, state "
                         "directory, broker and clock; exit 0 only when no check fails")
    doc.add_argument("--json", action="store_true",
                     help="print a JSON list of {check, status, detail}")
    _add_settings(doc)

    from agent.fleet import watch as fleet_watch  # argparse only; paho/rich load on use
    fleet_watch.add_parser(sub)
    return p


def cmd_run(args: argparse.Namespace, **forced) -> int:
    from agent import service

    cfg = _config(args, **forced)
    signals = service.install_signal_handlers()
    summary = service.run(cfg, threading.Event(), signals=signals,
                          load_config=lambda: _config(args, **forced))
    logging.getLogger(PROG).info("done: %d decisions over %.1f s of audio from %s; %d frames "
                                 "dropped; %d stats windows", summary.decisions,
                                 summary.audio_seconds, summary.source, summary.dropped_frames,
                                 summary.windows)
    if not summary.drained and not summary.stopped:  # on a stop the outbox keeps it durably
        raise AgentError(f"telemetry outbox not drained within {cfg.telemetry.drain_timeout_s:g}"
                         f" s ({cfg.telemetry.sink} unreachable?); the undelivered messages stay "
                         f"in {cfg.state_path()} and are sent on the next run")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.resources import demo_audio

    forced = {"audio.source": str(demo_audio())}
    if not any(k == "set:output.decisions" for k in vars(args)):
        forced["output.decisions"] = "-"
    return cmd_run(args, **forced)


def cmd_classify(args: argparse.Namespace) -> int:
    from agent import service
    from agent.features import extract
    from agent.training.dataset import load_audio

    cfg = _config(args)
    pipeline = service.build_pipeline(cfg)
    model, policy = pipeline.model, pipeline.policy
    assert model is not None
    m = model.manifest
    status = 0
    for path in args.files:
        try:
            audio = load_audio(path, m.sample_rate)
            if len(audio) == 0:
                raise AgentError(f"audio file {path} is empty")
        except AgentError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            status = 1
            continue
        probs = model.predict(extract(audio, m.features)[None, :])[0]
        label, conf, _, accepted = policy.decide(probs, m.classes) if policy.runs_model else \
            (None, None, None, False)
        print(json.dumps({"file": str(path), "label": label,
                          "confidence": None if conf is None else round(conf, 4),
                          "accepted": accepted}), flush=True)
    return status


def cmd_train(args: argparse.Namespace) -> int:
    try:  # fail before any work when the extra is missing
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401

        from agent.training.train import train
    except ImportError as e:
        raise AgentError(f"training needs the 'train' extra ({e.name} is missing); install it "
                         "with: pip install 'edge-voice-agent[train]'") from None
    calib = args.calibration_out or Path("calibration") / args.name
    speakers = {s for s in args.speakers.split(",") if s} or None
    train(args.data, args.out, calib, name=args.name, version=args.model_version,
          seed=args.seed, speakers=speakers, limit_per_class=args.limit_per_class,
          target_precision=args.target_precision,
          log=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent import doctor

    return doctor.main(lambda: _config(args), as_json=args.json)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "classify": cmd_classify, "train": cmd_train,
            "doctor": cmd_doctor,
            "fleet": lambda args: args.fleet_func(args)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from agent import logs

    logs.setup(args.log_level)  # stderr, one line per event (journald priorities under systemd)
    try:
        return COMMANDS[args.command](args)
    except AgentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
