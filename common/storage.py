"""Where, and in what dtype, the runner keeps the residuals it holds between passes (``cache_dtype``,
``cache_device``).

A cached residual is tokens x width per CFG branch (0.72 GiB per branch on Wan2.1-14B at 720p in bf16), two of them
per branch with linear prediction. ``cache_dtype="bf16"`` halves what a float32 stack keeps; ``cache_device="cpu"``
moves it to host memory, as ComfyUI-TeaCache's ``cache_device`` and kijai's offload device do. A residual is
stored once per computed pass and brought back once per reused pass; from a CUDA device to the host it goes into
pinned memory with a non-blocking copy, so neither direction waits for the GPU (the copy back is queued on the
same stream after the copy out, which orders them). What the CUDA runtime provides sits behind
:func:`pinned_empty` and :func:`can_pin`, so that the tests can run these paths on the CPU with stand-ins.

Only the residuals move: the other tensors a method keeps are read every pass and stay where they are computed
(EasyCache's latent-sized input and output copies; TeaCache's previous signal, a few KiB on Wan but as large as a
residual on HunyuanVideo and Open-Sora, where it is block 0's modulated input).

Design notes: docs/design.md#cache-memory
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import ParameterError

CACHE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CACHE_DTYPE_HELP = ("keep the cached residuals in this dtype: bf16, fp16 or fp32 (default: the dtype the "
                    "transformer computes them in); bf16 halves a float32 cache, at a small loss")
CACHE_DEVICE_HELP = ("keep the cached residuals on this device, e.g. 'cpu' to free GPU memory (pinned memory, "
                     "non-blocking copies: one copy out per computed pass, one back per reused pass); default: the "
                     "transformer's device")


def can_pin() -> bool:
    """Whether host memory can be pinned here (it needs a CUDA runtime)."""
    return torch.cuda.is_available()


def pinned_empty(shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory, so that copies to and from a GPU can run without the host waiting."""
    return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=True)


def _dtype(value: Any) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) and value in CACHE_DTYPES.values():
        return value
    if isinstance(value, str) and value in CACHE_DTYPES:
        return CACHE_DTYPES[value]
    raise ParameterError(f"cache_dtype={value!r} is not allowed; allowed: {', '.join(CACHE_DTYPES)} (or None: the "
                         f"dtype the transformer computes in)")


def _device(value: Any) -> torch.device | None:
    if value is None:
        return None
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ParameterError(f"cache_device={value!r} is not allowed; allowed: 'cpu', 'cuda' or 'cuda:N' (or None: "
                             f"the transformer's device)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError(f"cache_device={value!r} needs CUDA, and torch sees no CUDA device here")
    return device


@dataclass(frozen=True)
class CacheStorage:
    """How residuals are kept: ``dtype`` None keeps the computed dtype, ``device`` None the computed device."""

    dtype: torch.dtype | None = None
    device: torch.device | None = None

    @classmethod
    def of(cls, dtype: Any = None, device: Any = None) -> CacheStorage:
        """Checked settings from what a caller gave (``"bf16"`` or ``torch.bfloat16``; ``"cpu"``, ``"cuda:1"``)."""
        return cls(_dtype(dtype), _device(device))

    @property
    def default(self) -> bool:
        return self.dtype is None and self.device is None

    def describe(self) -> str:
        names = {v: k for k, v in CACHE_DTYPES.items()}
        parts = ([f"in {names[self.dtype]}"] if self.dtype is not None else []) + (
            [f"on {self.device}"] if self.device is not None else [])
        return "residuals kept " + " ".join(parts)

    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """The stored form of ``tensor`` (``tensor`` itself when nothing is to change)."""
        tensor = tensor.to(self.dtype) if self.dtype is not None else tensor
        device = self.device
        if device is None or _same_device(device, tensor.device):
            return tensor
        if device.type == "cpu" and tensor.device.type == "cuda" and can_pin():
            host = pinned_empty(tensor.shape, tensor.dtype)
            host.copy_(tensor, non_blocking=True)
            return host
        return tensor.to(device, non_blocking=True)

    @staticmethod
    def bring(stored: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``stored`` on ``device`` in ``dtype`` (itself when it is there already)."""
        return stored.to(device, dtype, non_blocking=True)


def _same_device(wanted: torch.device, actual: torch.device) -> bool:
    """``cuda`` means the current CUDA device, whatever index a tensor shows."""
    return wanted.type == actual.type and (wanted.index is None or wanted.index == actual.index)


def add_storage_arguments(group, sep: str = "-") -> None:
    """``--cache{sep}dtype`` and ``--cache{sep}device`` (``sep`` "_" for scripts whose flags use underscores)."""
    group.add_argument(f"--cache{sep}dtype", choices=list(CACHE_DTYPES), default=None,
                       help=f"stepcache option, any method: {CACHE_DTYPE_HELP}")
    group.add_argument(f"--cache{sep}device", default=None, metavar="DEVICE",
                       help=f"stepcache option, any method: {CACHE_DEVICE_HELP}")


STORAGE_FLAGS = ("cache_dtype", "cache_device")  # their argparse destinations


def storage_of_args(args) -> CacheStorage:
    """The checked storage from a namespace that has :func:`add_storage_arguments`' flags."""
    return CacheStorage.of(getattr(args, "cache_dtype", None), getattr(args, "cache_device", None))
