"""Why the telemetry link is down, in words an operator can act on, logged once per cause.

A device retries its broker for hours; a line per attempt would flood the journal, a line only
for the first attempt hides a cause that changes (the broker came back with a new certificate),
and a generic "unreachable" hides the one fact the operator needs (CERTIFICATE_VERIFY_FAILED,
connection refused, a port that takes TCP but never speaks MQTT). So: the real cause, once, then
again only when it changes; a successful connect resets it.
"""

from __future__ import annotations

import logging
import socket
import ssl

from agent.errors import one_line


def connect_error_cause(e: BaseException | None) -> str:
    """The real reason a TCP/TLS connect failed, without a traceback."""
    if e is None:
        return "connection failed (no error reported)"
    if isinstance(e, ssl.SSLCertVerificationError):
        detail = e.verify_message or one_line(e)
        return f"TLS certificate verification failed (CERTIFICATE_VERIFY_FAILED: {detail}); " \
               "check telemetry.ca_file and the broker's certificate and host name"
    if isinstance(e, ssl.SSLError):
        return f"TLS handshake failed ({e.reason or one_line(e)})"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(e, socket.gaierror):
        return f"host name not resolved ({e.strerror or one_line(e)})"
    if isinstance(e, TimeoutError):
        return "TCP connect timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return one_line(e) or type(e).__name__


class CauseLog:
    """Logs a link problem when its cause differs from the last one logged."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.last = ""

    def report(self, cause: str, message: str, *args: object,
               level: int = logging.WARNING) -> bool:
        """Log `message % args` if `cause` is new; True when it was logged."""
        if cause == self.last:
            return False
        self.last = cause
        self.log.log(level, message, *args)
        return True

    def clear(self) -> None:
        self.last = ""
