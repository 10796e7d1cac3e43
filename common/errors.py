"""The one base class for input a user can fix, and how every command line reports it.

Every entry point (the ``stepcache`` subcommands, the official-repo drop-ins, ``python -m`` tools) raises a
subclass of :class:`InputError` for a bad value, a missing file or an unusable profile, *before* any model work,
and :func:`run_cli` turns it into one line on stderr and exit code 2. A Ctrl-C becomes one line and exit code 130
(the shell's convention for SIGINT); whatever the command was writing is left as it was before the command ran,
because outputs are written to a temporary name and moved into place (:mod:`stepcache.outputs`).
"""
from __future__ import annotations

import sys
from typing import Callable

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class StepcacheWarning(UserWarning):
    """What stepcache tells a user without stopping (a run that cached nothing, a profile measured elsewhere):
    the base of its warnings, so that an entry point can keep them visible where a host program silences the
    rest (upstream Wan's generate.py ignores every warning when it is imported)."""


class InputError(ValueError):
    """Bad input: the message alone names the value, file or key that is wrong and what is allowed."""


class ParameterError(InputError):
    """A method parameter outside its allowed range. The message names the value and the range."""


class ProfileError(InputError):
    """An unknown, malformed or unsuitable profile. The message says what is known and how to calibrate."""


def run_cli(body: Callable[[], int | None], prog: str = "stepcache") -> int:
    """Run a command's body and map bad input and Ctrl-C to one line and an exit code (never a traceback)."""
    try:
        return int(body() or 0)
    except InputError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no partial output was kept", file=sys.stderr)
        return EXIT_INTERRUPTED
