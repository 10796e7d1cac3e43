"""Tiny random-weight HunyuanVideo 1.5 pipelines for the tests (diffusers' own classes, offline): text-to-video and
image-to-video (a tiny SigLIP vision tower), prompts given as embeddings (no text encoders). Block work is counted
by helpers.BlockWork over ``STACKS``."""
from __future__ import annotations

import torch

TINY = dict(num_attention_heads=2, attention_head_dim=8, num_layers=3, num_refiner_layers=1, mlp_ratio=2.0,
            patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=12,
            rope_axes_dim=(2, 2, 4), target_size=32)
LATENT = 4
STACKS = ("transformer_blocks",)


def tiny_vae():
    from diffusers import AutoencoderKLHunyuanVideo15
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo15(latent_channels=LATENT, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                       spatial_compression_ratio=8, temporal_compression_ratio=4)


def transformer(task: str = "t2v", seed: int = 0, **overrides):
    from diffusers import HunyuanVideo15Transformer3DModel
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(**{**TINY, "in_channels": 2 * LATENT + 1, "out_channels": LATENT,
                                               "task_type": task, **overrides}).eval()


def build_t2v(seed: int = 0, guidance: float = 6.0, **overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer("t2v", seed, **overrides),
                                  vae=tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                  text_encoder_2=None, tokenizer_2=None,
                                  guider=ClassifierFreeGuidance(guidance_scale=guidance))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_i2v(seed: int = 0, guidance: float = 6.0):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(seed + 1)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=TINY["image_embed_dim"], intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                                  patch_size=8)).eval()
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=transformer("i2v", seed), vae=tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=None, tokenizer_2=None,
        guider=ClassifierFreeGuidance(guidance_scale=guidance), image_encoder=vision,
        feature_extractor=SiglipImageProcessor(size={"height": 16, "width": 16}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed: int = 1, negative: bool = True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, 6)
    mask[:, 4:] = 0  # padded text tokens, as real prompts have
    out = dict(prompt_embeds=torch.randn(1, 6, TINY["text_embed_dim"], generator=g), prompt_embeds_mask=mask,
               prompt_embeds_2=torch.randn(1, 4, TINY["text_embed_2_dim"], generator=g),
               prompt_embeds_mask_2=torch.ones(1, 4))
    if negative:
        out.update(negative_prompt_embeds=torch.randn(1, 6, TINY["text_embed_dim"], generator=g),
                   negative_prompt_embeds_mask=torch.ones(1, 6),
                   negative_prompt_embeds_2=torch.randn(1, 4, TINY["text_embed_2_dim"], generator=g),
                   negative_prompt_embeds_mask_2=torch.ones(1, 4))
    return out


def image(seed: int = 3, size: int = 32):
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def run_t2v(pipe, steps: int = 12, frames: int = 5, size: int = 32, seed: int = 0, prompt_seed: int = 1):
    out = pipe(height=size, width=size, num_frames=frames, num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(seed),
               **embeds(prompt_seed, negative=pipe.guider.num_conditions > 1))
    return out.frames


def run_i2v(pipe, first_frame, steps: int = 12, frames: int = 5, seed: int = 0, prompt_seed: int = 1):
    out = pipe(image=first_frame, num_frames=frames, num_inference_steps=steps, output_type="latent",
               generator=torch.Generator().manual_seed(seed),
               **embeds(prompt_seed, negative=pipe.guider.num_conditions > 1))
    return out.frames
