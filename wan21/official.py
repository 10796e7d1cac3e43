"""Upstream Wan2.1 (``wan.modules.model.WanModel``, the official Wan-Video/Wan2.1 repo): where its blocks are,
where each signal lives, how its sampler calls it.

The TeaCache signal is the timestep embedding ``e`` (or its projection ``e0`` with ``use_ret_steps``), read with
forward hooks. A call's CFG branch is named by which ``context`` list the sampler passed, never by call parity.
:func:`attach` installs a method on a sampler instance (its ``WanModel``, inside FSDP, after any USP forward,
and an instance ``generate`` that announces each generation); nothing is set on a class. Under USP the blocks
see and cache this rank's shard, while every decision is rank-invariant (the timestep embedding, the whole
input latent and gathered output, the step): no measurement is reduced and no collective is added.

Design notes: docs/wan21.md#inside-the-adapter-for-contributors
"""
from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..compiling import kept_output, outside_graph
from ..patching import first_arg_io, install_stack
from ..storage import CacheStorage
from ..profiles import match_profiles
from ..timing import DiTTimer

FAMILY = "wan2.1"
VAE_SPATIAL_SCALE = 8  # Wan's VAE downsamples height and width by 8
BRANCH_NAMES = ("cond", "uncond")
# Upstream WanModel config names -> the names profiles use (diffusers' WanTransformer3DModel config).
PROFILE_CONFIG_KEYS = {"num_layers": "num_layers", "num_heads": "num_attention_heads", "in_dim": "in_channels"}


def _x_of(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return args[0] if args else kwargs["x"]


def _context_of(args: tuple, kwargs: dict):
    return args[2] if len(args) > 2 else kwargs.get("context")


def stack_latents(latents) -> torch.Tensor:
    """One tensor for a list of latents: stacked when they share a shape (upstream's batch of one always does),
    else their flattened concatenation."""
    latents = list(latents)
    if all(u.shape == latents[0].shape for u in latents):
        return torch.stack(latents)
    return torch.cat([u.reshape(-1) for u in latents])


def unstack_latents(tensor: torch.Tensor, like) -> list[torch.Tensor]:
    like = list(like)
    if tensor.dim() == like[0].dim() + 1 and tensor.shape[0] == len(like):
        return list(tensor.unbind(0))
    out, offset = [], 0
    for u in like:
        out.append(tensor[offset:offset + u.numel()].view(u.shape))
        offset += u.numel()
    return out


def model_config(model: nn.Module) -> dict[str, Any]:
    """The loaded model's identifying config, under the names profiles use."""
    config = getattr(model, "config", None) or {}
    get = config.get if hasattr(config, "get") else (lambda k: getattr(config, k, None))
    return {ours: get(theirs) if get(theirs) is not None else getattr(model, theirs, None)
            for theirs, ours in PROFILE_CONFIG_KEYS.items()}


class ContextBranches:
    """Names CFG branches by the identity of the ``context`` list a call got: the first list seen in a generation
    is "cond", the second "uncond" (upstream always calls cond first within a step).

    A third distinct list can only come from a new generation that nobody announced (the model driven without
    :func:`attach`'s ``generate`` wrapper), so it starts the naming again.
    """

    def __init__(self):
        self._seen: list[Any] = []  # the list objects themselves, not ids: an id can be reused once freed

    def reset(self) -> None:
        self._seen = []

    def name(self, context) -> str:
        for index, seen in enumerate(self._seen):
            if seen is context:
                return BRANCH_NAMES[index]
        if len(self._seen) == len(BRANCH_NAMES):
            self._seen = []
        self._seen.append(context)
        return BRANCH_NAMES[len(self._seen) - 1]


class WanOfficialAdapter:
    family = FAMILY
    vae_spatial_scale = VAE_SPATIAL_SCALE
    block_io = first_arg_io("x")
    sequence_sharded = frozenset()  # e, e0 and the model's input/output are whole on every rank (see above)

    def __init__(self):
        self.branches = ContextBranches()

    @staticmethod
    def check(model: nn.Module) -> None:
        missing = [n for n in ("blocks", "time_embedding", "time_projection", "patch_embedding", "head")
                   if not hasattr(model, n)]
        if missing:
            raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not Wan2.1's WanModel (no "
                            f"{', '.join(missing)}); the upstream-Wan2.1 adapter cannot patch it")

    @staticmethod
    def blocks(model) -> list:
        """The block stack, in call order."""
        return list(model.blocks)

    def install(self, patch, model, runner_of, wants_signal: bool, signal_name) -> None:
        self.check(model)
        install_stack(patch, runner_of, self.blocks(model), self.block_io)
        if not wants_signal:
            return

        def capture(wanted: str):
            @outside_graph
            def hook(module, inputs, output):
                runner = runner_of()
                if runner is not None and runner.current is not None and signal_name() == wanted:
                    runner.current.signal_tensor = kept_output(output)
            return hook

        # e0 is `time_projection(e).unflatten(...)`: the module's output holds the same values before the reshape.
        patch.hook(model.time_embedding.register_forward_hook(capture("temb")))
        patch.hook(model.time_projection.register_forward_hook(capture("timestep_proj")))

    def start_generation(self) -> None:
        self.branches.reset()

    def branch_of(self, model, args: tuple, kwargs: dict) -> str:
        return self.branches.name(_context_of(args, kwargs))

    def latent_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor:
        return stack_latents(_x_of(args, kwargs))

    def timestep_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return args[1] if len(args) > 1 else kwargs.get("t")

    def pixel_size(self, model, args: tuple, kwargs: dict) -> tuple[int, int]:
        latent = _x_of(args, kwargs)[0]
        scale = self.vae_scale(model)
        return latent.shape[-2] * scale, latent.shape[-1] * scale

    def vae_scale(self, model) -> int:
        """How much the VAE of this model's checkpoint downsamples height and width."""
        return self.vae_spatial_scale

    def output_latent(self, output: Any) -> torch.Tensor:
        return stack_latents(output)

    def build_output(self, model, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        return [u.float() for u in unstack_latents(latent, _x_of(args, kwargs))]

    def describe_config(self, model) -> dict[str, Any]:
        return {**model_config(model), "model_type": getattr(model, "model_type", None)}

    def detect_profiles(self, model):
        return match_profiles(self.family, model_config(model), type(model).__name__)


def unwrap(model: nn.Module) -> nn.Module:
    """The WanModel inside an FSDP wrapper (FSDP.forward calls ``self._fsdp_wrapped_module(...)``, so an
    instance-level forward on the inner model is what runs)."""
    inner = model
    while type(inner).__name__ in ("FullyShardedDataParallel", "DistributedDataParallel") and \
            hasattr(inner, "module"):
        inner = inner.module
    return inner


@dataclass
class GenerationRecord:
    steps: int
    dit_seconds: float = 0.0
    generate_seconds: float = 0.0
    dit_calls: int = 0
    pixel_size: tuple[int, int] | None = None
    switch_step: int | None = None  # a two-expert sampler's: the first step of its second expert


@dataclass
class Attachment:
    """What :func:`attach` installed on one sampler; :meth:`remove` takes it all off again."""

    sampler: Any
    model: nn.Module  # the WanModel (inside any FSDP wrapper); the first expert's for a two-expert sampler
    models: list[nn.Module] = field(default_factory=list)  # every WanModel the sampler runs, in run order
    cached: Any = None  # stepcache.api.CachedModel, or None for an uncached or calibration run
    calibration: Any = None  # the measuring CachedModel (stepcache.calibrate) during --magcache_calibration
    adapter: WanOfficialAdapter = field(default_factory=WanOfficialAdapter)
    generations: list[GenerationRecord] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _original_generate: Any = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._original_generate is not None and self.sampler.__dict__.get("generate") is not None:
            del self.sampler.generate
            self._original_generate = None
        if self.calibration is not None:
            self.calibration.remove()  # its runner keeps the measurements
        if self.cached is not None:
            self.cached.remove()
            self.cached = None


def attach(sampler, method: str | None = None, profile=None, params: dict[str, Any] | None = None,
           calibrate: bool = False, parallel="xdit", experts: tuple[str, ...] = ("model",),
           adapter: WanOfficialAdapter | None = None, switch_step=None, storage=None) -> Attachment:
    """Install ``method`` (or nothing, or the calibration recorder) on an upstream sampler instance.

    ``sampler`` is a ``WanT2V`` / ``WanI2V`` / ``WanFLF2V`` whose ``model`` is a ``WanModel`` or an FSDP wrapper
    of one; or (Wan2.2) a sampler whose ``experts`` attributes hold two of them in run order, one cache over both,
    with ``switch_step(arguments)`` giving the first step of the second from a generate() call's bound
    arguments. Every generate() call is timed (DiT forward time, CUDA-synchronised) and announced to the cache.
    ``parallel``: the default, ``"xdit"``, is xDiT's sequence-parallel group under ``torchrun`` (the world under
    FSDP alone; None on one process). Wan's measurements are whole on every rank, so nothing is reduced over it;
    it carries the one agreement each pass ends with. ``storage``: where the cached residuals are kept
    (:class:`stepcache.storage.CacheStorage`; default: where they are computed).
    """
    from ..api import StepClock, _profile_for, install
    if parallel == "xdit":
        from ..distributed import xdit_group
        parallel = xdit_group()
    if method is not None and calibrate:
        raise ValueError("calibration runs uncached; do not combine it with a method")
    outers = [getattr(sampler, name) for name in experts]
    models = [unwrap(outer) for outer in outers]
    for model in models:
        WanOfficialAdapter.check(model)
    adapter = adapter or WanOfficialAdapter()
    attachment = Attachment(sampler, models[0], models, adapter=adapter)
    switch = {"step": None}  # this generation's, set when it starts
    shared_switch = (lambda: switch["step"]) if len(models) > 1 else None
    if method is not None:
        attachment.cached = install(models, adapter, method, _profile_for(adapter, models[0], profile),
                                    StepClock(), params=params, parallel=parallel, switch_step=shared_switch,
                                    storage=storage or CacheStorage())
    if calibrate:
        from ..calibrate import CalibrationRunner
        runner = CalibrationRunner(None, parallel, adapter.sequence_sharded)  # magnitude ratios only
        attachment.calibration = install(models, adapter, "calibrate", None, StepClock(), runner=runner,
                                         switch_step=shared_switch)

    def size_of_the_video(module, args, kwargs):
        if attachment.generations and attachment.generations[-1].pixel_size is None:
            attachment.generations[-1].pixel_size = adapter.pixel_size(module, args, kwargs)

    for outer in outers:
        attachment._handles.append(outer.register_forward_pre_hook(size_of_the_video, with_kwargs=True))
    timer = DiTTimer(*outers)
    attachment._handles.append(timer)

    original = sampler.generate
    signature = inspect.signature(original)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        steps = int(bound.arguments["sampling_steps"])
        record = GenerationRecord(steps)
        attachment.generations.append(record)
        if switch_step is not None:
            switch["step"] = record.switch_step = switch_step(bound.arguments)
        attachment.adapter.start_generation()
        guidance = bound.arguments.get("guide_scale")  # Wan2.2's A14B gives a (low, high) pair: not one scale
        for installed in (attachment.cached, attachment.calibration):
            if installed is not None:
                installed.start_generation(steps, guidance if isinstance(guidance, (int, float)) else None)
        start, dit_before, calls_before = time.perf_counter(), timer.seconds, timer.calls
        try:
            return original(*args, **kwargs)
        finally:
            record.generate_seconds = time.perf_counter() - start
            record.dit_seconds, record.dit_calls = timer.seconds - dit_before, timer.calls - calls_before
            attachment.adapter.start_generation()  # drop the context lists it holds

    sampler.generate = generate
    attachment._original_generate = original
    return attachment
