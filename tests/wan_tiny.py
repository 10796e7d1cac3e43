"""Tiny random-weight diffusers Wan2.1 pipelines (T2V and I2V) that build and run offline in milliseconds."""
from __future__ import annotations

import torch
from torch import nn

WAN_TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=3, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def tiny_vae():
    from diffusers import AutoencoderKLWan
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def build_t2v(seed: int = 0, **overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**WAN_TINY, **overrides})
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Pixels(dict):
    def to(self, device):
        return self


class TinyImageProcessor:
    """Stands in for CLIP's processor: the pipeline only needs a dict of tensors back."""

    def __call__(self, images, return_tensors="pt"):
        return _Pixels(pixel_values=torch.as_tensor(images, dtype=torch.float32).reshape(1, -1)[:, :12])


class TinyImageEncoder(nn.Module):
    """Stands in for CLIP's vision tower: hidden_states[-2] is what the Wan I2V pipeline reads."""

    def __init__(self, dim: int = 4, tokens: int = 3):
        super().__init__()
        self.proj = nn.Linear(12, dim * tokens)
        self.dim, self.tokens = dim, tokens

    @property
    def device(self):
        return self.proj.weight.device

    @property
    def dtype(self):
        return self.proj.weight.dtype

    def forward(self, pixel_values, output_hidden_states=True):
        hidden = self.proj(pixel_values).reshape(1, self.tokens, self.dim)
        return type("Out", (), {"hidden_states": [hidden, hidden * 0.5, hidden]})()


def build_i2v(seed: int = 0):
    """I2V pipeline: 36 input channels (latent + mask + image latent) and image tokens through image_dim."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**WAN_TINY, "in_channels": 36, "image_dim": 4})
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=transformer,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_encoder=TinyImageEncoder(), image_processor=TinyImageProcessor())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(seed: int = 1, seq: int = 8, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, seq, dim, generator=g),
                negative_prompt_embeds=torch.randn(1, seq, dim, generator=g))


def run_t2v(pipe, steps=12, height=32, width=32, frames=5, guidance=5.0, seed=0, prompt_seed=1):
    out = pipe(height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator().manual_seed(seed), output_type="latent", **embeds(prompt_seed))
    return out.frames


def run_i2v(pipe, steps=12, height=32, width=32, frames=5, guidance=5.0, seed=0, prompt_seed=1):
    g = torch.Generator().manual_seed(100 + seed)
    image = torch.rand(1, 3, height, width, generator=g)
    out = pipe(image=image, height=height, width=width, num_frames=frames, num_inference_steps=steps,
               guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="latent",
               **embeds(prompt_seed))
    return out.frames


def tiny_text_stack(words=("a", "red", "blue", "ball", "cube", "moves", "left", "right", "on", "grass")):
    """A word-level tokenizer and a 1-layer UMT5 encoder, built offline, that WanPipeline loads like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>", model_max_length=16)
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=32, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8))
    return tokenizer, encoder


def save_t2v_folder(path, seed: int = 0):
    """A complete local WanPipeline folder (tokenizer, text encoder, VAE, transformer, scheduler)."""
    pipe = build_t2v(seed)
    pipe.tokenizer, pipe.text_encoder = tiny_text_stack()
    pipe.register_modules(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    pipe.save_pretrained(path)
    return path


def save_i2v_folder(path, seed: int = 0):
    """A complete local WanImageToVideoPipeline folder: the T2V parts plus a tiny CLIP vision tower and its image
    processor (8-wide image tokens, 32 px crops), all standard transformers classes."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**{**WAN_TINY, "in_channels": 36, "image_dim": 8})
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=32, patch_size=8))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer, text_encoder = tiny_text_stack()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_vae(),
                                   transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   image_encoder=encoder.eval(), image_processor=processor)
    pipe.save_pretrained(path)
    return path
