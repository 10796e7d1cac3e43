"""What an adapter is: the one place that knows a model class. It never decides anything.

Adding a model means writing one class with these members (see ``stepcache/wan21/diffusers_adapter.py``) and
one line in its family's ``FAMILY.adapters`` (:mod:`stepcache.families`).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from .patching import InstalledPatch


class Adapter(Protocol):
    family: str  # matches a profile's model.family ("wan2.1", "hunyuanvideo", "opensora")

    def install(self, patch: InstalledPatch, model: nn.Module, runner_of: Callable[[], Any], wants_signal: bool,
                signal_name: Callable[[], str | None]) -> None:
        """Wrap the block stack with :func:`stepcache.patching.install_stack` (blocks in call order) and, when
        the method ``wants_signal`` (TeaCache), make the signal reach the runner: either as ``signal_of`` to
        ``install_stack`` (computed from the first block's call, e.g. :func:`stepcache.patching.first_block_signal`)
        or by setting ``runner_of().current.signal_tensor`` from a forward hook. ``signal_name()`` is the profile
        variant's signal name (e.g. "temb"); a name the model cannot compute is refused, never swapped. Everything
        set goes through ``patch`` so that it can be restored exactly."""

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The block stack in call order (what ``install`` wraps; what the bench counts the work of)."""

    def latent_of(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """The latent ``x`` of this call, in the space the model's output lives in (EasyCache's ``v - x``)."""

    def pixel_size(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        """The video's (height, width) in pixels, to choose among profiles that differ only in resolution."""

    def timestep_of(self, model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """The timestep tensor of this call (read only when the caller's loop gives no step index)."""

    def output_latent(self, output: Any) -> torch.Tensor:
        """The prediction tensor inside whatever the model's forward returns."""

    def build_output(self, model: nn.Module, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """What the forward would return for prediction ``latent`` (EasyCache's reused passes)."""

    def describe_config(self, model: nn.Module) -> dict[str, Any]:
        """The config entries that identify the model, for error messages."""

    def detect_profiles(self, model: nn.Module) -> list:
        """Shipped profiles matching this model's config (several when they differ only in resolution)."""

    # Optional: ``branch_of(model, args, kwargs) -> str | None`` names the CFG branch of a call for models
    # whose pipeline does not use diffusers' ``cache_context`` (never by call parity).
