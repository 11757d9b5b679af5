"""The `fleet` command line: `fleet watch`, `fleet serve` and `fleet rollout ...` under one
subcommand.

The only module that knows all three commands; each adds its own options (the shared broker
options come from agent.fleet.options), so none imports another. Building the parser loads
argparse-level code only: paho, rich, prometheus-client and numpy load when a command runs.
"""

from __future__ import annotations

from typing import Any

from agent.fleet import rollout, serve, watch


def add_parser(sub: Any) -> None:
    """Add `fleet` and its commands to the CLI's subcommands (whose `add_parser` already gives
    `fleet` the common options)."""
    fleet = sub.add_parser("fleet", help="operator side: watch the fleet's telemetry on a broker")
    fsub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="FLEET_COMMAND")
    watch.add_parser(fsub)
    rollout.add_parser(fsub)
    serve.add_parser(fsub)
