"""Operator side: merge the monitoring messages of a fleet of devices.

`agent.fleet.state.FleetState` (pure, no I/O) turns the messages of
`{prefix}/{device}/{stats,alarm,status,birth}` into one merged view; `agent.fleet.watch` feeds
it from a broker and shows or prints it. Nothing is imported here, so the CLI can build its
parser from agent.fleet.cli without loading numpy, paho or rich.
"""
