"""Upstream ``hyvideo.modules.models.HYVideoDiffusionTransformer`` (Tencent/HunyuanVideo): where its blocks are
and where each method's signal lives.

Blocks in call order are ``double_blocks`` then ``single_blocks``. A double block takes ``(img, txt, vec, ...)``
and returns ``(img, txt)``; a single block takes the concatenated ``x = [img; txt]`` with ``txt_len`` and
returns ``x``. The cached residual covers the image tokens only, as in the reference (TC-HY:119-153,
MC-HY:104-141): the image part of a single block's sequence is its first ``len(x) - txt_len`` tokens. On a
reused pass the text tokens pass through untouched; the model's forward keeps ``x[:, :img_seq_len]`` after the
last single block and its final layer reads only that.

Blocks are called positionally by upstream (``block(*double_block_args)``); keyword calls are also understood.

Every pass is the branch ``cond``: upstream's sampler runs either CFG-distilled (one call per step, guidance
embedded) or true CFG with cond and uncond batched into one call, so there is one decision per step either way,
as in the reference. The name is the one the diffusers pipeline and the docs use for the conditional branch.

The TeaCache signal is the reference's (TC-HY:82-97): ``modulate(img_norm1(img), shift1, scale1)`` with the
first two of the six chunks of ``double_blocks[0].img_mod(vec)``, computed from block 0's call arguments.

Under xDiT (``--ulysses-degree`` / ``--ring-degree``), upstream's ``parallelize_transformer`` binds an instance
``forward`` that cuts ``x`` (and RoPE) to this rank's image-token shard, calls the original forward and all-gathers
the output. The cache is installed after it, so its own ``forward`` wraps that wrapper (EasyCache sees the whole
latent and the gathered output, the same on every rank), while the blocks inside see the shard: the TeaCache
signal is a shard and is summed over xDiT's sequence-parallel group (``sequence_sharded``), and the cached
residual is this rank's shard.
"""
from __future__ import annotations

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


def block0_modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    from hyvideo.modules.modulate_layers import modulate  # upstream's own function, as the reference uses

    img = args[0] if args else kwargs["img"]
    vec = args[2] if len(args) > 2 else kwargs["vec"]
    shift, scale = block.img_mod(vec).chunk(6, dim=-1)[:2]
    return modulate(block.img_norm1(img), shift=shift, scale=scale)


class HYVideoAdapter:
    family = "hunyuanvideo"
    sequence_sharded = frozenset({SIGNAL})  # block 0's input is the image-token shard under xDiT

    def install(self, patch, model, runner_of, wants_signal: bool, signal_name) -> None:
        signal_of = first_block_signal(model.double_blocks, block0_modulated_input, wants_signal, signal_name,
                                       "block0_modulated", "HunyuanVideo transformer (double blocks)")
        install_stack(patch, runner_of, [*model.double_blocks, *model.single_blocks], stack_io(), signal_of=signal_of)

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
        return x.shape[-2] * VAE_SPATIAL_SCALE, x.shape[-1] * VAE_SPATIAL_SCALE

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
