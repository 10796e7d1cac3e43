"""Upstream ``HunyuanVideo_1_5_DiffusionTransformer`` (Tencent-Hunyuan/HunyuanVideo-1.5): where its blocks are
and where each method's signal lives.

The same dual-stream blocks as HunyuanVideo 1.0's upstream model, called with keywords (``img=``, ``txt=``,
``vec=``, ...) and returning ``(img, txt)``, so this adapter is :class:`stepcache.hunyuan.official_adapter.
HYVideoAdapter` with this model's differences: ``double_blocks`` alone (the released models have no single
blocks), a 2C+1-channel input of which the first C are the latent, 16x spatial compression, a ``(img, None)``
tuple out, and ``modulate`` at its new place. Upstream's pipeline batches CFG as [uncond, cond] in one call, so
every pass is the one branch ``cond`` and one decision serves both halves (block 0's modulated input, the TeaCache
signal, is the same for both: it depends on the latent and the timestep only).

Design notes: docs/hunyuanvideo15.md#the-official-repository
"""
from __future__ import annotations

from typing import Any

import torch

from ..hunyuan.official_adapter import HYVideoAdapter
from ..profiles import match_profiles


class HYVideo15Adapter(HYVideoAdapter):
    family = "hunyuanvideo1.5"
    modulate_module = "hyvideo.models.transformers.modules.modulate_layers"
    model_name = "HunyuanVideo 1.5 transformer (double blocks)"
    vae_spatial_scale = 16

    def latent_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        return x[:, : model.out_channels]  # the noisy latent; the image condition and mask channels follow it

    def timestep_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return args[1] if len(args) > 1 else kwargs.get("timestep")

    def output_latent(self, output: Any) -> torch.Tensor:
        return output[0]

    def build_output(self, model, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        return latent, None  # upstream's return with return_dict=False (features off)

    def describe_config(self, model) -> dict[str, Any]:
        config = getattr(model, "config", {}) or {}
        return {"double_blocks": len(model.double_blocks), "heads_num": config.get("heads_num"),
                "hidden_size": config.get("hidden_size"), "ideal_task": config.get("ideal_task")}

    def detect_profiles(self, model):
        # Profiles name diffusers' config keys; the published tables are text-to-video ones.
        config = getattr(model, "config", {}) or {}
        heads = config.get("heads_num") or 1
        return match_profiles(self.family, {"num_layers": len(model.double_blocks), "num_attention_heads": heads,
                                            "attention_head_dim": (config.get("hidden_size") or 0) // heads,
                                            "task_type": config.get("ideal_task")}, type(model).__name__)
