"""The stepcache demo model as a diffusers pipeline: Wan2.1's ``WanPipeline``, at the demo's sizes.

This file is written into a pipeline folder by ``stepcache demo --save-pipeline DIR`` and imports only torch
and diffusers, so that the folder loads without stepcache:

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
    frames = pipe("a red square moving right on a dark background", output_type="np").frames[0]  # 8 x 32 x 32

The denoising loop is ``WanPipeline``'s own; only the defaults differ: 32x32 pixels, 8 frames, 30 steps,
guidance 2.5 (the demo fragments objects at Wan's 5.0), and 12 prompt tokens (the length it was trained with:
Wan's default of 512 would add 500 padding tokens its cross-attention never saw).
"""
from diffusers import WanPipeline

SIZE = 32
FRAMES = 8
STEPS = 30
GUIDANCE = 2.5
MAX_TOKENS = 12
# WanPipeline turns a frame count into latent frames with Wan's 4x temporal VAE arithmetic, (n - 1) // 4 + 1;
# the demo codec shows one frame per latent frame, so a call's ``num_frames`` is translated to Wan's count.
WAN_TEMPORAL = 4


class StepcacheDemoPipeline(WanPipeline):
    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio=None, expand_timesteps=False):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                         transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                         expand_timesteps=expand_timesteps)
        self.vae_scale_factor_temporal = WAN_TEMPORAL

    def __call__(self, prompt=None, negative_prompt=None, height=SIZE, width=SIZE, num_frames=FRAMES,
                 num_inference_steps=STEPS, guidance_scale=GUIDANCE, max_sequence_length=MAX_TOKENS, **kwargs):
        """``WanPipeline.__call__`` with the demo's defaults; ``num_frames`` is the number of frames out."""
        if int(num_frames) < 1:
            raise ValueError(f"num_frames={num_frames} must be at least 1")
        return super().__call__(prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                                num_frames=(int(num_frames) - 1) * WAN_TEMPORAL + 1,
                                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                max_sequence_length=max_sequence_length, **kwargs)
