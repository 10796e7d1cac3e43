"""Upstream ``hyvideo.modules.models.HYVideoDiffusionTransformer`` (Tencent/HunyuanVideo): where its blocks are
and where each method's signal lives.

The block stack is ``double_blocks`` then ``single_blocks``; the cached residual covers the image tokens only,
as in the reference (in a single block, the first ``len(x) - txt_len`` tokens). Every pass is the branch
``cond``: upstream's sampler is CFG-distilled or batches cond and uncond into one call, so there is one
decision per step either way. The TeaCache signal is block 0's modulated image input. Under xDiT the cache
wraps upstream's instance forward, so its blocks see (and cache) this rank's image-token shard and the signal
is summed over xDiT's sequence-parallel group.

Design notes: docs/hunyuanvideo.md#official-repository-hyvideodiffusiontransformer-hunyuanofficial_adapterpy
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..distributed import SIGNAL
from ..patching import BlockIO, first_block_signal, install_stack
from ..profiles import match_profiles

VAE_SPATIAL_SCALE = 8  # the "884" VAE: 8x in height and width
BRANCH = "cond"  # the one branch of every pass (see the module docstring)


def _is_single(args: tuple, kwargs: dict) -> bool:
    # A double block's third argument is the modulation vector, a single block's the text length (an int).
    if len(args) > 2:
        return not isinstance(args[2], torch.Tensor)
    return "txt_len" in kwargs


def _single_parts(args: tuple, kwargs: dict) -> tuple[torch.Tensor, int]:
    x = args[0] if args else kwargs["x"]
    txt_len = args[2] if len(args) > 2 else kwargs["txt_len"]
    return x, x.shape[1] - int(txt_len)


def stack_io() -> BlockIO:
    """A BlockIO for the mixed double/single stack; it remembers the image token count of the current pass."""
    state = {"image_tokens": None}

    def hidden_in(args, kwargs):
        if _is_single(args, kwargs):
            x, n = _single_parts(args, kwargs)
            state["image_tokens"] = n
            return x[:, :n]
        img = args[0] if args else kwargs["img"]
        state["image_tokens"] = img.shape[1]
        return img

    def hidden_out(output):
        if isinstance(output, tuple):
            return output[0]
        return output[:, : state["image_tokens"]]

    def passthrough(args, kwargs):
        if _is_single(args, kwargs):
            return args[0] if args else kwargs["x"]
        return (args[0] if args else kwargs["img"], args[1] if len(args) > 1 else kwargs["txt"])

    def replace_hidden(output, hidden):
        if isinstance(output, tuple):
            return (hidden, output[1])
        return torch.cat((hidden, output[:, state["image_tokens"]:]), dim=1)

    return BlockIO(hidden_in, hidden_out, passthrough, replace_hidden)


def block0_modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict,
                           modulate_module: str = "hyvideo.modules.modulate_layers") -> torch.Tensor:
    """The modulated image input of upstream's double block, with upstream's own ``modulate`` (as the reference
    uses), found in ``modulate_module`` of the checkout."""
    import importlib
    modulate = importlib.import_module(modulate_module).modulate
    img = args[0] if args else kwargs["img"]
    vec = args[2] if len(args) > 2 else kwargs["vec"]
    shift, scale = block.img_mod(vec).chunk(6, dim=-1)[:2]
    return modulate(block.img_norm1(img), shift=shift, scale=scale)


class HYVideoAdapter:
    family = "hunyuanvideo"
    sequence_sharded = frozenset({SIGNAL})  # block 0's input is the image-token shard under xDiT
    modulate_module = "hyvideo.modules.modulate_layers"  # where the checkout keeps upstream's ``modulate``
    model_name = "HunyuanVideo transformer (double blocks)"
    vae_spatial_scale = VAE_SPATIAL_SCALE

    @staticmethod
    def blocks(model) -> list:
        """The block stack, in call order: the double-stream blocks, then the single-stream ones."""
        return [*model.double_blocks, *model.single_blocks]

    def modulate_module_of(self, model) -> str:
        """Where ``modulate`` is for this model: beside the model's own module for a copy of upstream's model code
        (Sparse-VideoGen's ``svg.models.hyvideo.modules.models``, which runs without Tencent's ``hyvideo``
        installed), else ``modulate_module``."""
        module = type(model).__module__
        if module.endswith(".modules.models") and module != "hyvideo.modules.models":
            return module[: -len("models")] + "modulate_layers"
        return self.modulate_module

    def install(self, patch, model, runner_of, wants_signal: bool, signal_name) -> None:
        read = functools.partial(block0_modulated_input, modulate_module=self.modulate_module_of(model))
        signal_of = first_block_signal(model.double_blocks, read, wants_signal, signal_name, "block0_modulated",
                                       self.model_name)
        install_stack(patch, runner_of, self.blocks(model), stack_io(), signal_of=signal_of)

    def branch_of(self, model, args: tuple, kwargs: dict) -> str:
        return BRANCH

    def latent_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor:
        return args[0] if args else kwargs["x"]

    def videos_in_batch(self, latent: torch.Tensor) -> int:
        return 1  # one video per upstream call; true CFG batches cond and uncond in it (one branch)

    def timestep_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return args[1] if len(args) > 1 else kwargs.get("t")

    def pixel_size(self, model, args: tuple, kwargs: dict) -> tuple[int, int]:
        x = self.latent_of(model, args, kwargs)
        return x.shape[-2] * self.vae_spatial_scale, x.shape[-1] * self.vae_spatial_scale

    def output_latent(self, output: Any) -> torch.Tensor:
        return output["x"] if isinstance(output, dict) else output

    def build_output(self, model, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        return_dict = args[8] if len(args) > 8 else kwargs.get("return_dict", True)
        return {"x": latent} if return_dict else latent

    def describe_config(self, model) -> dict[str, Any]:
        return {"double_blocks": len(model.double_blocks), "single_blocks": len(model.single_blocks),
                "heads_num": getattr(model, "heads_num", None), "hidden_size": getattr(model, "hidden_size", None)}

    def detect_profiles(self, model):
        # Profiles name diffusers' config keys; upstream's are the block counts and heads_num.
        config = {"num_layers": len(model.double_blocks), "num_single_layers": len(model.single_blocks),
                  "num_attention_heads": getattr(model, "heads_num", None)}
        return match_profiles(self.family, config, type(model).__name__)
