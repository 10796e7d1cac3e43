"""The clocks every timed command offers (``--clock``), in one place.

``wall`` is wall-clock time; ``cpu`` is this process's CPU time, steadier on a shared machine since time spent
waiting for a core is not counted (with one thread it is the compute this process did). GPU runs want ``wall``.
"""
from __future__ import annotations

import time

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_NAMES = {"wall": "wall-clock time", "cpu": "CPU time of this process"}
CLOCK_HELP = "wall-clock time (default), or this process's CPU time (steadier on a shared machine)"


def add_clock_argument(parser) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=CLOCK_HELP)
