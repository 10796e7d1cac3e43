"""Open-Sora 1.2's ``STDiT3`` as VideoSys packages it: where its blocks are, where each signal lives, how the step
index is known.

The target is the VideoSys fork at the root of Zehong-Ma/MagCache and ali-vilab/TeaCache, the code the
published Open-Sora numbers were made with. The stack is ``spatial_blocks[0], temporal_blocks[0], ...``; CFG is
batched, so every pass is one branch (``"cond+uncond"``). The step index is the call's position in a generation
that a new ``all_timesteps`` list starts, never a timestep compared for equality (the bf16 schedule makes that
unreliable). EasyCache works on the velocity half of the ``[velocity; sigma]`` output. Under VideoSys's sequence
parallelism each rank holds a slice of the frames inside the block stack: the cache must be given that group
(``parallel=model.parallel_manager.sp_group``) so that every rank takes the same decision, and TeaCache's signal
is measured on the real frames of each slice (the fork pads the last one). CFG parallelism is refused.

Design notes: docs/opensora.md#inside-the-adapter-for-contributors
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from ..compiling import outside_graph
from ..distributed import SIGNAL
from ..patching import first_arg_io, first_block_signal, install_stack
from ..profiles import match_profiles

FAMILY = "opensora"
BRANCH = "cond+uncond"  # the sampler's batched CFG call: one branch
VAE_SPATIAL_SCALE = 8  # OpenSoraVAE_V1_2 downsamples height and width by 8
TEACACHE_SIGNAL = "block0_modulated"
REQUIRED = ("spatial_blocks", "temporal_blocks", "x_embedder", "t_block", "final_layer", "unpatchify")
MULTI_GPU_MESSAGE = (
    "Open-Sora multi-GPU (VideoSys num_gpus > 1) caches only through stepcache's engine: "
    "stepcache.opensora.session.build_engine(num_gpus=N), which is what the drop-in scripts' --num-gpus N use, "
    "installs the cache in every worker process VideoSys spawns, each with its sequence-parallel group. A "
    "VideoSysEngine built otherwise has spawned its workers before a patch can reach them, so only rank 0 would "
    "cache while the other ranks wait in the blocks' all-to-alls (a hang); see docs/opensora.md#multi-gpu.")
SEQUENCE_PARALLEL_MESSAGE = (
    "this STDiT3 runs sequence parallel over {sp} ranks, and the cache was given {group}: every rank must take the "
    "same decision, so enable it on every rank with that group, stepcache.enable(transformer, METHOD, "
    "parallel=transformer.parallel_manager.sp_group) (VideoSys's engine: "
    "stepcache.opensora.session.build_engine(num_gpus=N) does it)")
CFG_PARALLEL_MESSAGE = (
    "this STDiT3 runs CFG parallel (cp_size={cp}: the cond and uncond halves of a step on different ranks), which "
    "stepcache does not support for Open-Sora (docs/opensora.md#multi-gpu): one decision covers the whole [cond; uncond] "
    "batch. VideoSys's engine never enables it (OpenSoraPipeline._set_parallel is called with enable_cp=False); "
    "leave it off")


class MultiGPUNotSupported(RuntimeError):
    """Caching an Open-Sora model that runs sequence or CFG parallel."""


def blocks_in_call_order(model: nn.Module) -> list[nn.Module]:
    spatial, temporal = list(model.spatial_blocks), list(model.temporal_blocks)
    if len(spatial) != len(temporal):
        raise TypeError(f"STDiT3 has {len(spatial)} spatial and {len(temporal)} temporal blocks; its forward zips "
                        f"them, so they must pair up")
    return [block for pair in zip(spatial, temporal) for block in pair]


def parallel_sizes(model: nn.Module) -> dict[str, int]:
    manager = getattr(model, "parallel_manager", None)
    return {name: int(getattr(manager, name, 1) or 1) for name in ("sp_size", "cp_size")} if manager else {}


def check_parallel_setup(model: nn.Module, group) -> None:
    """Refuse what cannot cache correctly: CFG parallelism, or sequence parallelism without its group (``group``, the
    cache's :class:`stepcache.distributed.SequenceGroup` or None) spanning the ``sp_size`` ranks."""
    sizes = parallel_sizes(model)
    if sizes.get("cp_size", 1) > 1:
        raise MultiGPUNotSupported(CFG_PARALLEL_MESSAGE.format(cp=sizes["cp_size"]))
    sp = sizes.get("sp_size", 1)
    if sp > 1 and (group is None or group.size != sp):
        raise MultiGPUNotSupported(SEQUENCE_PARALLEL_MESSAGE.format(
            sp=sp, group="no group" if group is None else f"{group} of {group.size} rank(s)"))


def real_frames(model_or_block: nn.Module, frames: int) -> int:
    """How many of this rank's ``frames`` (its slice of the latent frames inside the block stack) are real: under
    sequence parallelism the fork pads the frame count to a multiple of ``sp_size`` with zero frames at the end
    (``set_pad("temporal", ...)`` then ``split_sequence(..., pad=...)``), which sit on the last rank(s)."""
    manager = getattr(model_or_block, "parallel_manager", None)
    sp = int(getattr(manager, "sp_size", 1) or 1) if manager is not None else 1
    if sp <= 1:
        return frames
    get_pad = getattr(sys.modules.get(type(model_or_block).__module__), "get_pad", None)
    pad = int(get_pad("temporal")) if callable(get_pad) else 0
    total = frames * sp - pad
    return max(0, min(frames, total - int(manager.sp_rank) * frames))


def _call_parts(args: tuple, kwargs: dict):
    """(x, timestep, all_timesteps) of a call to ``STDiT3.forward(x, timestep, all_timesteps, y, ...)``."""
    names = ("x", "timestep", "all_timesteps")
    return tuple(args[i] if len(args) > i else kwargs.get(name) for i, name in enumerate(names))


def _modulate_fn(block: nn.Module):
    """The fork's own ``t2i_modulate`` when the block comes from it (the function the reference calls)."""
    module = sys.modules.get(type(block).__module__)
    fn = getattr(module, "t2i_modulate", None)
    return fn if callable(fn) else (lambda x, shift, scale: x * (1 + scale) + shift)


def block0_modulated_input(block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """TeaCache's signal from ``spatial_blocks[0]``'s call ``(x, y, t_mlp, mask, x_mask, t0, T, S, ...)``
    (TC-OS:65-72). Under sequence parallelism, the tokens of this rank's real frames only: the padding frames
    would change the full-sequence mean the ranks agree on (one process has none)."""
    x = args[0] if args else kwargs["x"]
    t_mlp = args[2] if len(args) > 2 else kwargs["t"]
    batch = x.shape[0]
    shift, scale = (block.scale_shift_table[None] + t_mlp.reshape(batch, 6, -1)).chunk(6, dim=1)[:2]
    signal = _modulate_fn(block)(block.norm1(x), shift, scale)
    frames = args[6] if len(args) > 6 else kwargs.get("T")
    if frames is not None:
        real = real_frames(block, int(frames))
        if real < int(frames):
            signal = signal[:, : real * (x.shape[1] // int(frames))]
    return signal


class GenerationTracker:
    """Where a call sits in its generation, from the ``all_timesteps`` list the sampler passes.

    A generation is one ``all_timesteps`` list object: RFlow builds a new one in every ``sample()`` call and passes
    the same object at every step. A new object or a list used up (more calls than entries) starts the next
    generation, and a pass that raised ends its generation (the cache calls :meth:`STDiT3Adapter.start_generation`),
    so a caller reusing its list after a failed sample starts afresh too. No timestep is read: on a GPU each read
    would be a host synchronisation per pass, for a fact the list already gives.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._timesteps: Any = None  # the list object itself (an id could be reused once it is freed)
        self._calls = 0

    def observe(self, all_timesteps) -> tuple[int, int, bool]:
        """(step index, number of steps, whether this call starts a generation)."""
        steps = len(all_timesteps)
        new = all_timesteps is not self._timesteps or self._calls >= steps
        if new:
            self._timesteps, self._calls = all_timesteps, 0
        index = self._calls
        self._calls += 1
        return index, steps, new


class STDiT3Adapter:
    family = FAMILY
    block_io = first_arg_io("x")
    # Under sequence parallelism block 0's input is this rank's slice of the frames (TeaCache's signal); the model's
    # input and output (EasyCache's x and v) are whole on every rank: the split comes after the embedding and the
    # gather before the final layer.
    sequence_sharded = frozenset({SIGNAL})

    def __init__(self):
        self.generations = GenerationTracker()
        self.in_channels: int | None = None
        self.pred_sigma = False
        self._sigma: torch.Tensor | None = None  # the sigma half of the last computed output (EasyCache)

    @staticmethod
    def check(model: nn.Module) -> None:
        missing = [name for name in REQUIRED if not hasattr(model, name)]
        if missing:
            raise TypeError(f"{type(model).__module__}.{type(model).__name__} is not VideoSys's Open-Sora STDiT3 (no "
                            f"{', '.join(missing)}); the Open-Sora adapter cannot patch it")

    @staticmethod
    def blocks(model) -> list:
        """The block stack, in call order (spatial and temporal blocks interleaved)."""
        return blocks_in_call_order(model)

    def install(self, patch, model, runner_of, wants_signal: bool, signal_name) -> None:
        try:
            self.check(model)
            runner = runner_of()  # built before the adapter is asked; None while a profile is still to be picked
            if runner is not None or not parallel_sizes(model).get("sp_size", 1) > 1:
                check_parallel_setup(model, runner.group_of() if runner is not None else None)
        except (TypeError, MultiGPUNotSupported):
            # The forward wrapper is already installed by the time an adapter is asked (stepcache.api.CachedModel);
            # take it off again so that a refused model is left exactly as it was.
            patch.restore()
            raise
        self.in_channels = int(model.in_channels)
        self.pred_sigma = int(getattr(model, "out_channels", self.in_channels)) == 2 * self.in_channels
        signal_of = first_block_signal(model.spatial_blocks, block0_modulated_input, wants_signal, signal_name,
                                       TEACACHE_SIGNAL, "Open-Sora STDiT3")
        install_stack(patch, runner_of, self.blocks(model), self.block_io, signal_of=signal_of)
        patch.hook(model.register_forward_pre_hook(outside_graph(self._before_call), with_kwargs=True))

    # -------------------------------------------------------------------------------------------- step index
    def _before_call(self, model, args, kwargs):
        cached = getattr(model, "_stepcache", None)
        # enable_parallel() may have run after the cache was installed
        check_parallel_setup(model, cached.group_of() if cached is not None else None)
        _, timestep, all_timesteps = _call_parts(args, kwargs)
        if all_timesteps is None or timestep is None:
            return None  # not the fork's sampler: the clock's pass counter over enable(num_steps=) applies
        _, steps, new = self.generations.observe(all_timesteps)
        if new and cached is not None:
            cached.start_generation(steps)
        return None

    def start_generation(self) -> None:
        self.generations.reset()
        self._sigma = None

    def branch_of(self, model, args: tuple, kwargs: dict) -> str:
        return BRANCH

    # ------------------------------------------------------------------------------------- latents, outputs
    def latent_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor:
        # Float32 always: the pipeline starts RFlow from a model-dtype (bf16) latent, and the latent is float32
        # from the second step on (the forward returns float32). Given as is, that dtype change would look like
        # a new generation to the runner after the first step.
        return _call_parts(args, kwargs)[0].float()

    def videos_in_batch(self, latent: torch.Tensor) -> int:
        return max(latent.shape[0] // 2, 1)  # the sampler batches cond and uncond: two rows per video

    def timestep_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor | None:
        """None under the fork's sampler: its timestep list says where a generation starts (the clock then counts
        passes from there without reading a timestep); the timestep for a caller's own loop."""
        _, timestep, all_timesteps = _call_parts(args, kwargs)
        return None if all_timesteps is not None else timestep

    def pixel_size(self, model, args: tuple, kwargs: dict) -> tuple[int, int]:
        height = args[7] if len(args) > 7 else kwargs.get("height")
        width = args[8] if len(args) > 8 else kwargs.get("width")
        if height is not None and width is not None:
            return int(float(height.reshape(-1)[0])), int(float(width.reshape(-1)[0]))
        x = self.latent_of(model, args, kwargs)
        return x.shape[-2] * VAE_SPATIAL_SCALE, x.shape[-1] * VAE_SPATIAL_SCALE

    def output_latent(self, output: Any) -> torch.Tensor:
        """The velocity half (what RFlow integrates); the sigma half is kept for reused passes."""
        if self.pred_sigma and output.shape[1] == 2 * self.in_channels:
            velocity, self._sigma = output[:, : self.in_channels], output[:, self.in_channels:].detach()
            return velocity
        return output

    def build_output(self, model, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        latent = latent.to(torch.float32)  # the forward's own output dtype
        if not self.pred_sigma:
            return latent
        sigma = self._sigma
        if sigma is None or sigma.shape[0] != latent.shape[0] or sigma.shape[2:] != latent.shape[2:]:
            sigma = torch.zeros_like(latent)
        return torch.cat([latent, sigma.to(latent)], dim=1)

    # -------------------------------------------------------------------------------------------- profiles
    @staticmethod
    def model_config(model) -> dict[str, Any]:
        config = getattr(model, "config", None)
        get = (lambda k: getattr(config, k, None)) if config is not None else (lambda k: None)
        return {"depth": get("depth") or len(model.spatial_blocks), "hidden_size": get("hidden_size"),
                "num_heads": get("num_heads"), "in_channels": get("in_channels"), "pred_sigma": get("pred_sigma")}

    def describe_config(self, model) -> dict[str, Any]:
        return self.model_config(model)

    def detect_profiles(self, model):
        config = self.model_config(model)
        found = match_profiles(self.family, {"depth": config["depth"], "hidden_size": config["hidden_size"]},
                               type(model).__name__)
        return [p for p in found if not p.name.endswith("-released")]
