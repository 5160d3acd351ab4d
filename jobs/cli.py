"""What every command line of the tool shares: --version, --log-level, and one-line failures.

Diagnostics go through ``logging`` to stderr at the level asked for; a job's progress lines are
plain lines on stdout whatever the level, so `ray job logs` reads the same.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn

LOG_LEVELS = ("debug", "info", "warning", "error")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line like every other failure of the tool:
    ``error: <what is wrong> (see <prog> --help)``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    from pipeline.output.layout import TOOL_NAME, tool_version

    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="diagnostics on stderr from this level up (default: %(default)s)")
    parser.add_argument("--version", action="version", version=f"{TOOL_NAME} {tool_version()}")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def fail(exc: BaseException, *, code: int = 1, prefix: str = "") -> int:
    """Print ``error: <first line>`` on stderr and return the exit code."""
    logging.getLogger("sinq").debug("failure", exc_info=exc)
    print(f"error: {prefix}{one_line(exc)}", file=sys.stderr)
    return code
