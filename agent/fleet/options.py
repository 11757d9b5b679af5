"""The broker options every `fleet` command takes, and their checks.

One place for what `fleet watch`, `fleet serve` and `fleet rollout` share on their command line
(`--broker`, `--prefix`, credentials, TLS files), so the command modules depend on it and never
on each other. Checked before anything touches the network: each fault is one ConfigError line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.errors import ConfigError
from agent.telemetry.message import DEFAULT_PREFIX, topic


def broker_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the broker options every `fleet` command takes to `p`."""
    # Also accepted after the subcommand; SUPPRESS keeps `fleet --log-level X watch` intact.
    p.add_argument("--log-level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                   default=argparse.SUPPRESS, help="stderr log level [INFO]")
    p.add_argument("--broker", required=True, metavar="URL",
                   help="mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"topic prefix [{DEFAULT_PREFIX}]")
    p.add_argument("--username", default="", help="broker username (operator account)")
    p.add_argument("--password-file", type=Path, default=None,
                   help="file whose first line is the password")
    p.add_argument("--ca-file", type=Path, default=None,
                   help="CA bundle for mqtts (default: the system trust store)")
    p.add_argument("--cert-file", type=Path, default=None, help="client certificate (mqtts)")
    p.add_argument("--key-file", type=Path, default=None, help="client key (mqtts)")
    return p


def parse_broker(url: str) -> tuple[bool, str, int]:
    """(tls, host, port) from mqtt:// or mqtts://; ConfigError otherwise."""
    from agent.telemetry.sinks import parse_sink_spec

    try:
        kind, host, port = parse_sink_spec(url)
    except ConfigError:
        kind, host, port = "", "", 0
    if kind not in ("mqtt", "mqtts"):
        raise ConfigError(f"invalid --broker {url!r}: expected mqtt://HOST[:PORT] or "
                          "mqtts://HOST[:PORT]")
    return kind == "mqtts", host, port


def check_args(args: argparse.Namespace, tls: bool) -> str | None:
    """Validate everything before touching the network; returns the password, if any."""
    try:
        topic(args.prefix, "x", "stats")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("duration", "until_idle"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0 seconds")
    files = {"--ca-file": args.ca_file, "--cert-file": args.cert_file,
             "--key-file": args.key_file}
    if not tls and any(files.values()):
        raise ConfigError("--ca-file/--cert-file/--key-file need an mqtts:// broker")
    if bool(args.cert_file) != bool(args.key_file):
        raise ConfigError("a client certificate needs both --cert-file and --key-file")
    for flag, path in files.items():
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {str(path)!r} does not exist")
    if args.password_file is None:
        return None
    if not args.username:
        raise ConfigError("--password-file needs --username")
    try:
        return args.password_file.read_text().splitlines()[0]
    except (OSError, IndexError):
        raise ConfigError(f"--password-file {str(args.password_file)!r} cannot be read or is "
                          "empty") from None
