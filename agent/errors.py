"""One error type whose message is a single line naming the thing and the fix."""


class AgentError(Exception):
    """An error the user can act on; the CLI prints it as one line and exits with `exit_code`."""

    exit_code = 1


class ConfigError(AgentError):
    """Invalid configuration (file or flag): exit code 2, like argparse usage errors."""

    exit_code = 2


def one_line(e: BaseException | str) -> str:
    """An exception (or text) as one line for an error message: whitespace folded."""
    return " ".join(str(e).split()) or type(e).__name__
