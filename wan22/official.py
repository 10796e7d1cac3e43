"""Upstream Wan2.2 (``wan.modules.model.WanModel``, the official Wan-Video/Wan2.2 repo): the Wan2.1 adapter (the
same block stack, signals and call convention), the Wan2.2 profiles, and where a two-expert sampler switches.

``WanT2V`` and ``WanI2V`` (A14B) hold two ``WanModel`` s, ``high_noise_model`` and ``low_noise_model``, and pick one
per step in ``_prepare_model_for_timestep``: the high-noise expert while ``t >= boundary * num_train_timesteps``.
:func:`attach` puts one cache on both (one runner: the published rule shares one state, stepcache's
``experts="separate"`` keys it by expert), each expert an instance attribute of its own model, so that Ulysses'
instance ``forward`` (``_configure_model``), FSDP wrappers and ``--offload_model`` moves keep it. ``WanTI2V`` holds
one ``model`` whose VAE downsamples by 16.

Design notes: docs/wan22.md#inside-the-adapter-for-contributors
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from torch import nn

from ..wan21.official import WanOfficialAdapter, attach as attach_wan

FAMILY = "wan2.2"
EXPERT_MODELS = ("high_noise_model", "low_noise_model")  # a two-expert sampler's models, in run order
TI2V_IN_CHANNELS = 48  # TI2V-5B's latent: the Wan2.2 VAE (48 channels, 16x spatial)


class Wan22OfficialAdapter(WanOfficialAdapter):
    family = FAMILY

    def vae_scale(self, model) -> int:
        return 16 if getattr(model, "in_dim", None) == TI2V_IN_CHANNELS else 8


def expert_attributes(sampler) -> tuple[str, ...]:
    """The sampler's DiT attributes in run order: both experts of an A14B sampler, else its one model."""
    if all(isinstance(getattr(sampler, name, None), nn.Module) for name in EXPERT_MODELS):
        return EXPERT_MODELS
    return ("model",)


def sampler_timesteps(sampler_class, num_train_timesteps: int, steps: int, shift: float, solver: str):
    """The timesteps a sampler class's generate() loops over, made by its module's own scheduler classes with
    the calls it makes (text2video.py / image2video.py), on the CPU; no model needed."""
    module = SimpleNamespace(**sampler_class.generate.__globals__)  # the names generate() itself calls
    if solver == "unipc":
        scheduler = module.FlowUniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, shift=1,
                                                       use_dynamic_shifting=False)
        scheduler.set_timesteps(steps, device="cpu", shift=shift)
        return scheduler.timesteps
    if solver == "dpm++":
        scheduler = module.FlowDPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, shift=1,
                                                           use_dynamic_shifting=False)
        timesteps, _ = module.retrieve_timesteps(scheduler, device="cpu",
                                                 sigmas=module.get_sampling_sigmas(steps, shift))
        return timesteps
    raise ValueError(f"unknown sample_solver {solver!r}; Wan2.2 has unipc and dpm++")


def switch_step_for(sampler_class, num_train_timesteps: int, boundary: float, steps: int, shift: float,
                    solver: str) -> int:
    """The first step of the low-noise expert: the number of timesteps at or above ``boundary *
    num_train_timesteps`` (upstream compares ``t.item() >= boundary`` at each step)."""
    timesteps = sampler_timesteps(sampler_class, num_train_timesteps, steps, shift, solver)
    return int((timesteps >= boundary * num_train_timesteps).sum())


def switch_step(sampler, arguments: dict[str, Any]) -> int:
    """The switch of the generate() call with these bound ``arguments``, on this sampler."""
    return switch_step_for(type(sampler), sampler.num_train_timesteps, sampler.boundary,
                           int(arguments["sampling_steps"]), float(arguments["shift"]), arguments["sample_solver"])


def attach(sampler, method: str | None = None, profile=None, params: dict[str, Any] | None = None,
           calibrate: bool = False, parallel="xdit", storage=None):
    """:func:`stepcache.wan21.official.attach` for a Wan2.2 sampler: both experts of A14B, or TI2V's model."""
    experts = expert_attributes(sampler)
    return attach_wan(sampler, method, profile, params, calibrate, parallel, experts=experts,
                      adapter=Wan22OfficialAdapter(), storage=storage,
                      switch_step=(lambda arguments: switch_step(sampler, arguments)) if len(experts) > 1 else None)
