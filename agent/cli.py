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
from agent.errors import AgentError, ConfigError

PROG = "edge-voice-agent"


# Settings a subcommand has no use for get no flag there, so argparse refuses them (with that
# subcommand's usage) instead of the command silently ignoring them.
DEMO_FIXED = frozenset({"audio.source", "audio.mic_rate", "audio.mic_channels"})
CLASSIFY_SECTIONS = frozenset({"model", "decision", "personal"})
ENROLL_SECTIONS = frozenset({"agent", "model", "audio", "vad"})


def _add_settings(p: argparse.ArgumentParser, *, skip: frozenset[str] = frozenset(),
                  sections: frozenset[str] | None = None) -> None:
    """--config plus one flag per setting (`--section-key`, and a short alias for common ones)."""
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config file (default {config_mod.DEFAULT_CONFIG_PATH} if present)")
    g = p.add_argument_group("settings (each overrides the config file)")
    for section, f in config_mod.settings():
        key = f"{section}.{f.name}"
        if key in skip or (sections is not None and section not in sections):
            continue
        names = [config_mod.flag_name(section, f)]
        if f.metadata.get("alias"):
            names.insert(0, f"--{f.metadata['alias']}")
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(str(c) for c in choices) + "}" if choices else f.name.upper()
        g.add_argument(*names, dest=f"set:{key}", default=argparse.SUPPRESS, metavar=metavar,
                       help=f"{f.metadata['help']} [{config_mod.toml_repr(f.default)}]")


def _config(args: argparse.Namespace, **forced) -> config_mod.Config:
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("set:")}
    overrides.update(forced)
    return config_mod.load(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="On-device spoken-command recognition with "
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
    p.set_defaults(_parsers={})  # subcommand name → its parser, for usage errors

    def add_parser_tracked(name: str, **kw) -> argparse.ArgumentParser:
        q = add_parser(name, **kw)
        p.get_default("_parsers")[name] = q
        return q

    sub.add_parser = add_parser_tracked  # type: ignore[method-assign]

    run = sub.add_parser("run", help="listen to a microphone or file and decide on each utterance")
    _add_settings(run)

    demo = sub.add_parser("demo", help="run the whole pipeline on the bundled demo recording")
    _add_settings(demo, skip=DEMO_FIXED)

    cl = sub.add_parser("classify", help="classify each audio file as one utterance")
    cl.add_argument("files", nargs="+", type=Path)
    cl.add_argument("--state-dir", dest="set:agent.state_dir", default=argparse.SUPPRESS,
                    metavar="DIR", help="use this device's enrollment (read only; the "
                    "adaptation learned at the device's microphone is not applied to files); "
                    "without it, the model alone decides")
    _add_settings(cl, sections=CLASSIFY_SECTIONS)

    en = sub.add_parser("enroll", help="teach the device a voice: one recording per class "
                        "({label}_{anything}.wav), or prompts at the microphone without files; "
                        "keeps head inputs only (0600), never audio, never published")
    en.add_argument("files", nargs="*", type=Path)
    en.add_argument("--forget", action="store_true",
                    help="remove the enrollment from the state directory")
    _add_settings(en, sections=ENROLL_SECTIONS)

    def data_args(q: argparse.ArgumentParser) -> None:
        from agent.monitoring.samples import DataFolders

        q.add_argument("--data", default=None, action=DataFolders,
                       help="folder of {word}_{speaker}_{take}.wav recordings (a digit is its "
                       "own word); again for each labelled export of review samples (speaker "
                       "'field', its own slice); required for the digit model")
        q.add_argument("--vocabulary", default=None, metavar="WORD,WORD,...",
                       help="train a model for these words (+ unknown) instead of the digits; "
                       "a word with few or no recordings is learned from its text (synthetic "
                       "voices); a phrase is words with single spaces ('turn on')")
        q.add_argument("--text-only", default="", metavar="WORD,WORD,...",
                       help="with --vocabulary: learn these words from their text alone; their "
                       "real recordings are only scored (to measure learning from text)")
        q.add_argument("--speakers", default="", help="comma list of speakers; empty = all")
        q.add_argument("--speech-commands", type=Path, default=None,
                       help="folder of the Speech Commands part (clips/{digit}_{speaker}_{n}.wav "
                       "and clips/neg_{word}_{speaker}_{n}.wav): real digits and real non-digit "
                       "words of many speakers, for training and speaker-grouped evaluation")
        q.add_argument("--talk", type=Path, default=None,
                       help="folder of talk_{speaker}_{utterance}.flac: real people talking, "
                       "never to the device (negatives by speaker group, false activations "
                       "per hour)")
        q.add_argument("--limit-per-class", type=int, default=None,
                       help="at most N clips per speaker and digit (quick runs)")
        q.add_argument("--small", action="store_true",
                       help="a few hundred synthetic clips instead of thousands (quick runs)")
        q.add_argument("--cache", type=Path, default=None,
                       help="where synthesised speech is cached [~/.cache/edge-voice-agent]")
        q.add_argument("--workers", type=int, default=2, help="processes [2]")
        q.add_argument("--seed", type=int, default=0)

    tr = sub.add_parser("train", help="train, evaluate (leave-one-speaker-out), calibrate and "
                        "export a model with its card (needs the 'train' extra)")
    data_args(tr)
    tr.add_argument("--out", type=Path, default=None,
                    help="a new model directory to write (never an existing model) "
                    "[exported/<name>@<version>]")
    tr.add_argument("--calibration-out", type=Path, default=None,
                    help="thresholds, baseline and out-of-fold predictions "
                    "[OUT/calibration: the model directory is then a deliverable bundle]")
    tr.add_argument("--name", default=None,
                    help="the model's name [fsdd-digits; with --vocabulary: vocabulary]")
    tr.add_argument("--model-version", default=None,
                    help="the new build's version, required for the digit model (a new build "
                    "needs a new version) [with --vocabulary: 1.0.0]")

    ev = sub.add_parser("evaluate", help="leave-one-speaker-out evaluation of the training "
                        "recipe: accuracy by speaker, accent, class and condition, confusion, "
                        "calibration, coverage and precision at the threshold, false accepts "
                        "(needs the 'train' extra)")
    data_args(ev)
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.add_argument("--enrollment", action="store_true",
                    help="instead: the bundled model's enrollment slice (one recording per digit "
                    "of each held-out FSDD speaker enrolled, the rest scored from the recipe's "
                    "out-of-fold probabilities; --data is the FSDD folder)")
    ev.add_argument("--reps", type=int, default=10, help="enrollment draws per speaker [10]")

    ca = sub.add_parser("calibrate", help="write the training baseline (baseline.json) for a "
                        "model by running its training recordings through the daemon's pipeline")
    ca.add_argument("--data", required=True, type=Path)
    ca.add_argument("--speakers", default="")
    ca.add_argument("--model", type=Path, default=None, help="model directory [bundled]")
    ca.add_argument("--calibration-out", type=Path, default=None,
                    help="[calibration/<model name>]")
    ca.add_argument("--seed", type=int, default=0)
    ca.add_argument("--speech-commands", type=Path, default=None,
                    help="also take the real digits of this Speech Commands folder into the "
                    "head-input reference (more voices)")
    ca.add_argument("--reference-only", action="store_true",
                    help="write only the head-input reference (head_input_reference.npz) that "
                    "device adaptation and enrollment need, not baseline.json")

    rl = sub.add_parser("reload", help="make a running agent re-read its config (SIGHUP to "
                        "PID); what `systemctl reload` runs, so no /bin/kill is needed")
    rl.add_argument("pid", type=int, metavar="PID", help="the agent's main PID ($MAINPID)")

    li = sub.add_parser("listen", help="print the running agent's decisions as JSON lines, "
                        "from its local decision socket, until stopped")
    where = li.add_mutually_exclusive_group()
    where.add_argument("--state-dir", default=None, metavar="DIR",
                       help="the agent's state directory (its socket is DIR/decisions.sock) "
                       "[/run/edge-voice-agent under systemd, else the default state dir]")
    where.add_argument("--socket", default=None, metavar="PATH",
                       help="the decision socket itself (the agent's output.socket)")
    li.add_argument("--accepted", action="store_true",
                    help="only accepted decisions (what actions run for), not abstentions")

    doc = sub.add_parser("doctor", help="check audio devices, model, calibration, state "
                         "directory, broker and clock; exit 0 only when no check fails")
    doc.add_argument("--json", action="store_true",
                     help="print a JSON list of {check, status, detail}")
    _add_settings(doc)

    from agent.fleet import cli as fleet_cli  # argparse only; paho/rich load on use
    fleet_cli.add_parser(sub)
    from agent.rollout import cli as models_cli
    models_cli.add_parser(sub)
    from agent.monitoring import samples
    samples.add_parser(sub)
    return p


def cmd_run(args: argparse.Namespace, **forced) -> int:
    from agent.daemon import service

    cfg = _config(args, **forced)
    signals = service.install_signal_handlers()
    summary = service.run(cfg, threading.Event(), signals=signals,
                          load_config=lambda: _config(args, **forced))
    logging.getLogger(PROG).info("done: %d decisions over %.1f s of audio from %s; %d frames "
                                 "dropped; %d stats windows", summary.decisions,
                                 summary.audio_seconds, summary.source, summary.dropped_frames,
                                 summary.windows)
    if not summary.drained and not summary.stopped:  # on a stop the outbox keeps it durably
        why = f"{cfg.telemetry.sink} unreachable?"
        if "outbox" in summary.state_failing:  # not the broker's fault: see docs/faults.md
            why = f"the state disk refuses outbox writes: {summary.state_failing['outbox']}"
        raise AgentError(f"telemetry outbox not drained within {cfg.telemetry.drain_timeout_s:g}"
                         f" s ({why}); the undelivered messages stay "
                         f"in {cfg.state_path()} and are sent on the next run")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from agent.resources import demo_audio

    # a showcase of the shipped model: it neither learns from nor is changed by this device's
    # personal state (a demo file must not teach the device's adaptation six synthetic voices)
    forced = {"audio.source": str(demo_audio()), "personal.adaptation": False,
              "personal.enrollment": False}
    if not any(k == "set:output.decisions" for k in vars(args)):
        forced["output.decisions"] = "-"
    return cmd_run(args, **forced)


def cmd_classify(args: argparse.Namespace) -> int:
    from agent.daemon import service
    from agent.training.dataset import load_audio

    cfg = _config(args)
    pipeline = service.build_pipeline(cfg)
    model, policy = pipeline.model, pipeline.policy
    assert model is not None
    m = model.manifest
    personal = None
    if cfg.agent.state_dir:  # the enrollment; adaptation belongs to the device's microphone
        cfg.personal.adaptation = False
        personal = service.personalize(cfg, model, learn=False)
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
        feats = model.features(audio)
        probs = model.predict(feats[None, :])[0] if personal is None else \
            personal.predict(model, feats)
        label, conf, _, accepted = policy.decide(probs, m.classes) if policy.runs_model else \
            (None, None, None, False)
        print(json.dumps({"file": str(path), "label": label,
                          "confidence": None if conf is None else round(conf, 4),
                          "accepted": accepted}), flush=True)
    return status


def cmd_enroll(args: argparse.Namespace) -> int:
    from agent.personal import enroll

    cfg = _config(args)
    if args.forget:
        if args.files:
            raise AgentError("enroll --forget takes no files; run it alone")
        print(enroll.forget(cfg), flush=True)
        return 0
    from agent.daemon import service

    print(enroll.enroll(cfg, args.files, service.load_model(cfg)), flush=True)
    return 0


def _training():
    """The training modules, or a one-line error naming the missing extra."""
    try:  # fail before any work when the extra is missing
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401

        from agent.training import evaluate, train
    except ImportError as e:
        raise AgentError(f"training needs the 'train' extra ({e.name} is missing); install it "
                         "with: pip install 'edge-voice-agent[train]'") from None
    return train, evaluate


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _recipe(args: argparse.Namespace):
    from agent.training.recipe import Recipe

    return Recipe().small() if args.small else Recipe()


def train_outputs(args: argparse.Namespace, root: Path = Path()) -> tuple[Path, Path]:
    """(model directory, calibration directory) `train` writes: a new folder under `root` by
    default, so a build never lands on the bundled model (or any model) by accident."""
    vocabulary = getattr(args, "vocabulary", None)
    if args.name is None:
        args.name = "vocabulary" if vocabulary else "fsdd-digits"
    if not args.model_version and vocabulary:
        args.model_version = VOCABULARY_VERSION
    if not args.model_version:
        raise ConfigError("train needs --model-version: a new build needs a new version (the "
                          "running build's name and version with another digest is refused "
                          "by devices)")
    out = args.out or root / "exported" / f"{args.name}@{args.model_version}"
    if args.out is None and (out / "manifest.json").exists():
        raise AgentError(f"{out} already holds a model; train writes a new build to a new "
                         "directory — choose another --model-version (or --out to replace it)")
    return out, args.calibration_out or out / "calibration"


VOCABULARY_VERSION = "1.0.0"


def _vocabulary(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(words, text-only words) of --vocabulary/--text-only, checked; None for the digits.
    Also the one-line error when the digit model is asked for without --data."""
    from agent.training.words import parse_vocabulary

    if args.vocabulary is None:
        if args.text_only:
            raise ConfigError("--text-only needs --vocabulary (the words it names are in it)")
        if args.data is None:
            raise ConfigError(f"{args.command} needs --data: the folder of FSDD recordings "
                              "({digit}_{speaker}_{take}.wav), or --vocabulary WORD,...")
        return None
    words = parse_vocabulary(args.vocabulary)
    text_only = parse_vocabulary(args.text_only) if args.text_only else ()
    stray = [w for w in text_only if w not in words]
    if stray:
        raise ConfigError(f"--text-only: {', '.join(stray)} not in --vocabulary; name words "
                          "of the vocabulary")
    return words, text_only


def _vocab_recipe(args: argparse.Namespace):
    from agent.training.vocabulary import VocabRecipe

    return VocabRecipe().small() if args.small else VocabRecipe()


def cmd_train(args: argparse.Namespace) -> int:
    vocab = _vocabulary(args)
    train, _ = _training()
    out, calib = train_outputs(args)
    if vocab is not None:
        from agent.training.train_vocabulary import train_vocabulary

        train_vocabulary(vocab[0], args.data, out, calib, name=args.name,
                         version=args.model_version, seed=args.seed, text_only=vocab[1],
                         recipe=_vocab_recipe(args), cache=args.cache or train.DEFAULT_CACHE,
                         workers=args.workers, speech_commands=args.speech_commands,
                         talk=args.talk, command=" ".join(["edge-voice-agent", *sys.argv[1:]]),
                         log=_log)
        return 0
    speakers = {s for s in args.speakers.split(",") if s} or None
    train.train(args.data, out, calib, name=args.name, version=args.model_version,
                seed=args.seed, speakers=speakers, limit_per_class=args.limit_per_class,
                recipe=_recipe(args), cache=args.cache, workers=args.workers,
                speech_commands=args.speech_commands, talk=args.talk, log=_log)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    vocab = _vocabulary(args)
    train, evaluate = _training()
    if args.enrollment:
        return evaluate_enrollment(args)
    if vocab is not None:
        from agent.training import vocabulary as V

        r = _vocab_recipe(args)
        d = V.build(vocab[0], args.data, args.cache or train.DEFAULT_CACHE, r, args.seed,
                    vocab[1], args.workers, _log, args.speech_commands, args.talk)
        report = train.public(V.evaluate(d, r, args.seed, args.workers, _log))
        print(json.dumps(report, indent=None if args.json else 1))
        return 0
    speakers = {s for s in args.speakers.split(",") if s} or None
    r = _recipe(args)
    ds = evaluate.build_dataset(args.data, args.cache or train.DEFAULT_CACHE, r, args.seed,
                                speakers, args.limit_per_class, args.workers, _log,
                                args.speech_commands, args.talk)
    report = train.public(evaluate.loso(ds, r, args.seed, args.workers, _log))
    if args.json:
        print(json.dumps(report))
        return 0
    print(evaluate.render_text(report))
    return 0


def evaluate_enrollment(args: argparse.Namespace) -> int:
    """`evaluate --enrollment`: agent.training.enrollment_slice on the bundled model."""
    from agent.config import PersonalConfig
    from agent.training import enrollment_slice as E

    if args.data is None:
        raise ConfigError("evaluate --enrollment needs --data FSDD_RECORDINGS_DIR")
    report = E.bundled_slice(args.data, args.speech_commands, args.reps,
                             PersonalConfig().enrollment_weight)
    print(json.dumps(report) if args.json else E.render(report))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    _training()
    from agent.recognition.model import Manifest
    from agent.resources import default_model_dir
    from agent.training.calibrate import calibrate, write_reference
    from agent.training.dataset import discover

    model_dir = args.model or default_model_dir()
    name = Manifest.read(model_dir / "manifest.json").name
    speakers = {s for s in args.speakers.split(",") if s} or None
    clips = discover(args.data, speakers)
    ref_clips = clips
    if args.speech_commands is not None:
        from agent.training.dataset import discover_speech_commands

        ref_clips = clips + [c for c in discover_speech_commands(args.speech_commands)
                             if not c.label.startswith("neg:")]
    out = args.calibration_out or Path("calibration") / name
    if args.reference_only:
        write_reference(model_dir, ref_clips, out, log=_log)
    else:
        calibrate(model_dir, clips, out, seed=args.seed, log=_log, reference_clips=ref_clips)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    from agent.daemon.control import send_reload

    send_reload(args.pid)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    from agent.actions import listen

    return listen.listen(listen.candidates(args.state_dir, args.socket), args.accepted)


def cmd_doctor(args: argparse.Namespace) -> int:
    from agent.daemon import doctor

    return doctor.main(lambda: _config(args), as_json=args.json)


COMMANDS = {"run": cmd_run, "demo": cmd_demo, "classify": cmd_classify, "enroll": cmd_enroll,
            "train": cmd_train,
            "evaluate": cmd_evaluate, "calibrate": cmd_calibrate, "doctor": cmd_doctor,
            "reload": cmd_reload, "listen": cmd_listen, "fleet": lambda args: args.fleet_func(args),
            "models": lambda args: args.models_func(args),
            "samples": lambda args: args.samples_func(args)}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; an unknown flag is reported with the usage of the subcommand it was given to
    (argparse's own handling prints the top-level usage, which does not list it)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        target = parser.get_default("_parsers").get(args.command, parser)
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from agent.actions.decision_log import silence_stdout
    from agent.daemon import logs

    logs.setup(args.log_level)  # stderr, one line per event (journald priorities under systemd)
    try:
        return COMMANDS[args.command](args)
    except AgentError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # stdout's reader had enough (`classify ... | head -1`): done
        silence_stdout()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
