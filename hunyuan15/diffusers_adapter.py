"""diffusers ``HunyuanVideo15Transformer3DModel``: where its blocks are and where each method's signal lives.

The block stack is ``transformer_blocks`` alone (54 dual-stream blocks; the model has no single-stream ones). Each
block takes and returns the image and the text tokens as HunyuanVideo 1.0's dual-stream blocks do, so this adapter
is that one's with this model's stack, sizes and calls: after the stack the output head reads the image tokens
only, so the cached residual covers the image tokens and the text tokens pass a reused pass untouched (as
ComfyUI-MagCache's HunyuanVideo 1.5 forward does), and the TeaCache signal is block 0's modulated image input.

diffusers runs classifier-free guidance as two calls per step, in ``cache_context("pred_cond")`` then
``cache_context("pred_uncond")`` (the guider's names), so each gets its own state; the distilled checkpoints
(guidance 1.0) make one call, ``pred_cond``. diffusers ships no context-parallel plan for this model.

Design notes: docs/hunyuanvideo15.md
"""
from __future__ import annotations

from ..hunyuan.diffusers_adapter import HunyuanVideoDiffusersAdapter


class HunyuanVideo15DiffusersAdapter(HunyuanVideoDiffusersAdapter):
    family = "hunyuanvideo1.5"
    vae_spatial_scale = 16  # AutoencoderKLHunyuanVideo15: 16x spatial, 4x temporal, 32 channels
    return_dict_index = 9
    config_keys = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "task_type",
                   "target_size")
    sequence_sharded = frozenset()  # no context parallelism in diffusers for this model: nothing is a shard
    model_name = "HunyuanVideo 1.5 transformer"

    @staticmethod
    def blocks(model) -> list:
        return list(model.transformer_blocks)

    def check_parallel(self, model) -> None:
        config = getattr(model, "_parallel_config", None)
        if config is not None and getattr(config, "context_parallel_config", None) is not None:
            raise ValueError("HunyuanVideo 1.5 has no context-parallel plan in diffusers, so stepcache cannot tell "
                             "which of its measurements are shards; run it on one GPU")

    def detect_profiles(self, model):
        # The published tables were measured on the text-to-video model; an image-to-video checkpoint (its own
        # weights, the same layers) has none: calibrate one.
        if model.config.get("task_type") != "t2v":
            return []
        return super(HunyuanVideoDiffusersAdapter, self).detect_profiles(model)
