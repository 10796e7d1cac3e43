"""The clocks every timed command offers (``--clock``), and the one DiT-only timer, in one place.

``wall`` is wall-clock time; ``cpu`` is this process's CPU time, steadier on a shared machine since time spent
waiting for a core is not counted (with one thread it is the compute this process did). GPU runs want ``wall``.
"""
from __future__ import annotations

import time
from typing import Any

import torch

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK_NAMES = {"wall": "wall-clock time", "cpu": "CPU time of this process"}
CLOCK_HELP = "wall-clock time (default), or this process's CPU time (steadier on a shared machine)"


def add_clock_argument(parser) -> None:
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help=CLOCK_HELP)


def _first_tensor(value: Any):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def synchronize(value: Any) -> None:
    """Wait for the CUDA work behind ``value`` (a tensor, or the first tensor in a list, tuple or dict)."""
    tensor = _first_tensor(value)
    if tensor is not None and tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


class DiTTimer:
    """Seconds spent inside a transformer's forward (the "DiT-only" time the published tables report), and the
    number of forwards: hooks on ``module``, synchronised with CUDA at both ends (a host wait the measurement
    needs; without it a GPU's queued work would be timed elsewhere). A caller times one video by reading
    ``seconds`` and ``calls`` before and after it. Several modules (the experts of a two-expert model, which run
    one at a time) are timed together."""

    def __init__(self, *modules: torch.nn.Module):
        self.seconds = 0.0
        self.calls = 0
        self._start: float | None = None
        self.handles = [handle for module in modules for handle in (
            module.register_forward_pre_hook(self._begin, with_kwargs=True),
            module.register_forward_hook(self._end, with_kwargs=True))]

    def _begin(self, module, args, kwargs):
        synchronize([args, kwargs])
        self._start = time.perf_counter()

    def _end(self, module, args, kwargs, output):
        if self._start is None:
            return
        synchronize(output)
        self.seconds += time.perf_counter() - self._start
        self.calls += 1
        self._start = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class HostMeter:
    """Times a piece of work with a host clock (``CLOCKS``); no device memory to read. The CPU's meter."""

    def __init__(self, clock: str = "wall"):
        self.clock_name = clock
        self._clock = CLOCKS[clock]
        self._start = 0.0

    def start(self) -> None:
        self._start = self._clock()

    def stop(self) -> tuple[float, int | None]:
        """(seconds since ``start``, peak memory in bytes or None)."""
        return self._clock() - self._start, None


class CudaMeter:
    """Times a piece of work with CUDA events (the GPU's own clock: the queued work is timed where it runs, with
    one host wait at the end, which the measurement needs), and reads the peak memory allocated on the device
    since ``start``. ``cuda`` is ``torch.cuda``, or a stand-in with the same members (tests on CPU)."""

    clock_name = "cuda"

    def __init__(self, device, cuda=None):
        self.cuda = torch.cuda if cuda is None else cuda
        self.device = device
        self._events = None

    def start(self) -> None:
        self.cuda.synchronize(self.device)  # work queued before the start is not this piece's
        self.cuda.reset_peak_memory_stats(self.device)
        begin, end = self.cuda.Event(enable_timing=True), self.cuda.Event(enable_timing=True)
        begin.record()
        self._events = (begin, end)

    def stop(self) -> tuple[float, int | None]:
        begin, end = self._events
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1000.0, int(self.cuda.max_memory_allocated(self.device))


def meter_for(device: str, clock: str = "wall", cuda=None):
    """The meter of a device: CUDA events and peak memory on ``cuda``/``cuda:N``, else the host ``clock``."""
    if str(device).startswith("cuda"):
        return CudaMeter(torch.device(device), cuda)
    return HostMeter(clock)
