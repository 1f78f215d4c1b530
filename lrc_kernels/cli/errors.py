"""How the command line fails: one line on stderr, a documented exit status, never a traceback.

Exit status: 0 success, 1 bad input (a file, an option value, the data, a missing optional dependency),
2 a bad command line (argparse), 130 interrupted (Ctrl-C). Anything else escaping is a bug in lrc-kernels
and keeps its traceback, so that it gets reported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

PROG = "lrc-kernels"
EXIT_INPUT, EXIT_COMMAND_LINE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(ValueError):
    """A problem with the user's input (file, option, data); the command line prints it as one line."""


class MissingDependency(UsageError):
    """An optional package is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or fail with ``pip install 'lrc-kernels[extra]'`` (checked before any work)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{purpose} needs the Python package '{module}', which is not installed: "
                                f"pip install 'lrc-kernels[{extra}]'")


def say(kind: str, message: str) -> None:
    """``lrc-kernels: <kind>: <message>`` as one line on stderr."""
    line = " ".join(str(message).split()) or kind
    print(f"{PROG}: {kind}: {line}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    say("warning", message)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``lrc-kernels trace: error: ... (see lrc-kernels trace --help)``), exit 2."""

    def error(self, message: str):
        line = " ".join(f"{message} (see {self.prog} --help)".split())
        print(f"{self.prog}: error: {line}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_COMMAND_LINE)


def int_option(minimum: int, maximum: int = (1 << 63) - 1) -> Callable[[str], int]:
    """An argparse ``type`` for an int in ``[minimum, maximum]`` (digits only: no 5000-digit conversion)."""
    def parse(text: str) -> int:
        digits = text.strip().lstrip("+-")
        if not digits.isdigit() or not digits.isascii():
            raise argparse.ArgumentTypeError(f"expected an integer, got {text[:40]!r}")
        if len(digits) > 19:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {len(digits)} digits")
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected an integer <= {maximum}, got {value}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def fraction_option(text: str) -> float:
    """An argparse ``type`` for a number strictly between 0 and 1 (a confidence level)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text[:40]!r}") from None
    if not 0.0 < value < 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text[:40]}")
    return value


fraction_option.__name__ = "number"  # argparse names the type in its messages


def run_guarded(body: Callable[[], int]) -> int:
    """Run one command; expected failures become one line and an exit status (see the module docstring)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr, flush=True)  # after a half-drawn progress bar
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `lrc-kernels ... | head`: the reader left, nothing to say
        return EXIT_INPUT
    except MemoryError:
        say("error", "out of memory (try fewer sequences, layers, --seg-lens or --num-bootstrap)")
        return EXIT_INPUT
    except (UsageError, ValueError, TypeError, OSError) as error:
        say("error", _first_line(error))
        return EXIT_INPUT


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
