"""argparse types that refuse a bad number while the command line is parsed, before any model work.

argparse turns the ``ArgumentTypeError`` into ``PROG: error: argument --FLAG: MESSAGE`` and exit code 2.
"""
from __future__ import annotations

import argparse
import math


def help_text(text: str) -> str:
    """``text`` as an argparse help string: argparse %-formats help texts (``%(default)s``), so a literal ``%``
    (EasyCache's "0.05 is 5%") is doubled, or ``--help`` would stop with a ValueError."""
    return text.replace("%", "%%")


def _at_least(low, kind, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text} is too small; allowed: {what} >= {low:g}")
        return value
    parse.__name__ = f"{what} >= {low:g}"
    return parse


def int_at_least(low: int):
    return _at_least(low, int, "an integer")


def float_at_least(low: float):
    return _at_least(low, float, "a finite number")


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
