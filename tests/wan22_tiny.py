"""Tiny random-weight diffusers Wan2.2 pipelines that build and run offline in well under a second: T2V-A14B and
I2V-A14B (two experts, ``transformer`` then ``transformer_2`` at ``boundary_ratio``) and TI2V-5B (one transformer,
``expand_timesteps``, the 48-channel VAE that downsamples by 16)."""
from __future__ import annotations

import torch

from wan_tiny import WAN_TINY, embeds, tiny_vae

# Wan2.2's boundaries (Wan-Video/Wan2.2 wan/configs/wan_{t2v,i2v}_A14B.py; diffusers' boundary_ratio)
BOUNDARY = {"t2v": 0.875, "i2v": 0.9}


def tiny_vae22():
    """The Wan2.2 VAE's layout (z_dim 48, 2x2 patchified RGB in, residual blocks, 16x spatial), tiny."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=4, decoder_base_dim=4, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16,
                            latents_mean=[0.0] * 48, latents_std=[1.0] * 48)


def _transformer(seed: int, **overrides):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**WAN_TINY, **overrides})


def build_a14b(kind: str = "t2v", seed: int = 0, shift: float = 12.0, **overrides):
    """Two experts with different weights (seeds ``seed`` and ``seed + 1``), as diffusers loads Wan2.2 A14B."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    channels = {"in_channels": 16 if kind == "t2v" else 36, **overrides}
    experts = dict(transformer=_transformer(seed, **channels), transformer_2=_transformer(seed + 1, **channels))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    if kind == "t2v":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=scheduler,
                           boundary_ratio=BOUNDARY[kind], **experts)
    else:
        pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), scheduler=scheduler,
                                       boundary_ratio=BOUNDARY[kind], image_encoder=None, image_processor=None,
                                       **experts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_ti2v(image: bool = False, seed: int = 0, **overrides):
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    transformer = _transformer(seed, **{"in_channels": 48, "out_channels": 48, **overrides})
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    cls = WanImageToVideoPipeline if image else WanPipeline
    extra = dict(image_encoder=None, image_processor=None) if image else {}
    pipe = cls(tokenizer=None, text_encoder=None, vae=tiny_vae22(), scheduler=scheduler, transformer=transformer,
               expand_timesteps=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps=12, height=32, width=32, frames=5, guidance=5.0, seed=0, prompt_seed=1, **kw):
    """Latents of one generation; an image-to-video pipeline gets a random first frame."""
    from diffusers import WanImageToVideoPipeline
    if isinstance(pipe, WanImageToVideoPipeline):
        kw["image"] = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(100 + seed))
    out = pipe(height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **embeds(prompt_seed), **kw)
    return out.frames


BUILD = {"t2v-a14b": lambda: build_a14b("t2v"), "i2v-a14b": lambda: build_a14b("i2v", shift=5.0),
         "ti2v": lambda: build_ti2v(False), "ti2v-i2v": lambda: build_ti2v(True)}
PROFILES = {"t2v-a14b": "wan2.2-t2v-a14b", "i2v-a14b": "wan2.2-i2v-a14b", "ti2v": "wan2.2-ti2v-5b",
            "ti2v-i2v": "wan2.2-ti2v-5b-i2v"}


def save_a14b_folder(path, seed: int = 0):
    """A complete local two-expert WanPipeline folder (tokenizer, text encoder, VAE, both experts, scheduler,
    boundary_ratio in model_index.json), as Wan2.2-T2V-A14B-Diffusers is laid out."""
    from wan_tiny import tiny_text_stack
    pipe = build_a14b("t2v", seed)
    pipe.tokenizer, pipe.text_encoder = tiny_text_stack()
    pipe.register_modules(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    pipe.save_pretrained(path)
    return path
