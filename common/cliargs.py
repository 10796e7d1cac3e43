"""argparse types that refuse a bad number while the command line is parsed, before any model work.

argparse turns the ``ArgumentTypeError`` into ``PROG: error: argument --FLAG: MESSAGE`` and exit code 2.
"""
from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is too small; allowed: an integer >= {low}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def float_at_least(low: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"{text} is not allowed; allowed: a finite number >= {low:g}")
        return value
    parse.__name__ = f"number >= {low:g}"
    return parse


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (the usage is one ``--help`` away), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
