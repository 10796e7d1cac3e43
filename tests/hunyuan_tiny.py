"""Tiny random-weight HunyuanVideo models for the tests: a diffusers pipeline (offline, no text encoders) and an
upstream Tencent/HunyuanVideo model driven through upstream's own sampler (needs HUNYUANVIDEO_REPO, gated by
helpers.hunyuanvideo_checkout). Block work is counted by helpers.BlockWork over the stacks named here.
"""
from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import torch
from torch import nn

from helpers import StubVAE, sdpa
from stepcache.hunyuan.svg_reference import get_cu_seqlens  # upstream's arithmetic on the mask's device

# ---------------------------------------------------------------------------------------------- diffusers
HY_TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
               num_single_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
               text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))


def tiny_vae():
    from diffusers import AutoencoderKLHunyuanVideo
    torch.manual_seed(0)
    return AutoencoderKLHunyuanVideo(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, act_fn="silu", norm_num_groups=4,
        scaling_factor=0.476986, spatial_compression_ratio=8, temporal_compression_ratio=4,
        mid_block_add_attention=True)


def build_pipeline(seed: int = 0, **overrides):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(**{**HY_TINY, **overrides})
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                transformer=transformer, vae=tiny_vae(),
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeds(pipe, seed: int = 1, seq: int = 6, negative: bool = False):
    """Prompt embeddings (the pipeline has no text encoders). Negative ones only for true CFG."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config
    mask = torch.ones(1, seq)
    mask[:, seq - 2:] = 0  # padded text tokens, as real prompts have
    out = dict(prompt_embeds=torch.randn(1, seq, c.text_embed_dim, generator=g),
               pooled_prompt_embeds=torch.randn(1, c.pooled_projection_dim, generator=g),
               prompt_attention_mask=mask)
    if negative:
        out.update(negative_prompt_embeds=torch.randn(1, seq, c.text_embed_dim, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(1, c.pooled_projection_dim, generator=g),
                   negative_prompt_attention_mask=torch.ones(1, seq))
    return out


def run(pipe, steps: int = 10, height: int = 32, width: int = 32, frames: int = 9, true_cfg: float = 1.0,
        guidance: float = 6.0, seed: int = 0, prompt_seed: int = 1) -> torch.Tensor:
    """Final latents of one generation: distilled (embedded guidance only) or, with ``true_cfg > 1``, two
    branches per step."""
    out = pipe(height=height, width=width, num_frames=frames, num_inference_steps=steps, guidance_scale=guidance,
               true_cfg_scale=true_cfg, generator=torch.Generator().manual_seed(seed), output_type="latent",
               **embeds(pipe, seed=prompt_seed, negative=true_cfg > 1))
    return out.frames


# ------------------------------------------------------------------------------------------ counting work
# The block stacks that helpers.BlockWork counts in each model.
DIFFUSERS_STACKS = ("transformer_blocks", "single_transformer_blocks")
OFFICIAL_STACKS = ("double_blocks", "single_blocks")


# ------------------------------------------------------------------------------------------------ upstream
def flash_varlen_sdpa(q, k, v, cu_q, cu_k, max_q=None, max_k=None, dropout_p=0.0, softmax_scale=None,
                      causal=False, **_):
    """flash_attn_varlen_func's signature around helpers.sdpa: q/k/v packed as [total, heads, dim], attention per
    cu_seqlens segment."""
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        a, b, c, d = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        if b > a:
            out[a:b] = sdpa(q[None, a:b], k[None, c:d], v[None, c:d], dropout_p=dropout_p, scale=softmax_scale,
                            causal=causal)[0]
    return out


@contextlib.contextmanager
def upstream_on_cpu(root: Path):
    """Import upstream with its two CUDA-only attention pieces replaced by CPU equivalents (upstream-cpu.md §1),
    and undo both afterwards."""
    sys.path.insert(0, str(root))
    try:
        import hyvideo.modules.attenion as hy_attn  # (sic) upstream's file name
        saved = hy_attn.flash_attn_varlen_func, hy_attn.get_cu_seqlens.__code__
        hy_attn.flash_attn_varlen_func = flash_varlen_sdpa
        # In place, because models.py imported the function object itself.
        hy_attn.get_cu_seqlens.__code__ = get_cu_seqlens.__code__
        try:
            yield
        finally:
            hy_attn.flash_attn_varlen_func, hy_attn.get_cu_seqlens.__code__ = saved
    finally:
        sys.path.remove(str(root))


TEXT_DIM, TEXT_DIM_2, TEXT_LEN = 32, 24, 7
TINY_UPSTREAM = dict(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=64, heads_num=4,
                     mlp_width_ratio=2.0, mm_double_blocks_depth=2, mm_single_blocks_depth=2, rope_dim_list=[4, 6, 6],
                     guidance_embed=True)


def build_upstream_model(seed: int = 0):
    """A tiny HYVideoDiffusionTransformer with every parameter perturbed: upstream zero-initialises the
    modulation and final layers, and a model that outputs exact zeros makes every comparison pass."""
    from hyvideo.modules.models import HYVideoDiffusionTransformer
    torch.manual_seed(seed)
    model = HYVideoDiffusionTransformer(types.SimpleNamespace(text_states_dim=TEXT_DIM, text_states_dim_2=TEXT_DIM_2),
                                        dtype=torch.float32, device="cpu", **TINY_UPSTREAM).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


class StubTextEncoder(nn.Module):
    """Stands in for upstream's TextEncoder (LLM, or CLIP-L when ``seq`` is None): deterministic per prompt."""

    def __init__(self, dim: int, seq: int | None):
        super().__init__()
        self.dim, self.seq = dim, seq
        self.dtype, self.device = torch.float32, torch.device("cpu")

    def text2tokens(self, text, data_type="video"):
        return text

    def encode(self, tokens, data_type="video", device=None, **kwargs):
        from hyvideo.text_encoder import TextEncoderModelOutput
        g = torch.Generator().manual_seed(sum(map(len, tokens)))
        if self.seq is None:
            return TextEncoderModelOutput(hidden_state=torch.randn(len(tokens), self.dim, generator=g))
        mask = torch.ones(len(tokens), self.seq, dtype=torch.long)
        mask[:, 5:] = 0
        return TextEncoderModelOutput(hidden_state=torch.randn(len(tokens), self.seq, self.dim, generator=g),
                                      attention_mask=mask)


def build_sampler(args, model):
    """Upstream's HunyuanVideoSampler around ``model``, with stub encoders and VAE (its __init__ loads nothing)."""
    from hyvideo.inference import HunyuanVideoSampler
    return HunyuanVideoSampler(args, vae=StubVAE(4), vae_kwargs={"s_ratio": 8, "t_ratio": 4},
                               text_encoder=StubTextEncoder(TEXT_DIM, TEXT_LEN),
                               text_encoder_2=StubTextEncoder(TEXT_DIM_2, None), model=model,
                               use_cpu_offload=False, device="cpu",
                               parallel_args={"ulysses_degree": args.ulysses_degree,
                                              "ring_degree": args.ring_degree})


def tiny_argv(*extra: str, steps: int = 8, size: int = 64, frames: int = 9) -> list[str]:
    """Flags of a tiny run: the published command's shape, at a size a CPU runs in milliseconds."""
    return ["--video-size", str(size), str(size), "--video-length", str(frames), "--infer-steps", str(steps),
            "--prompt", "A cat walks on the grass, realistic style.", "--flow-reverse", "--precision", "fp32",
            "--seed", "0", "--text-states-dim", str(TEXT_DIM), "--text-states-dim-2", str(TEXT_DIM_2), *extra]


class Calls:
    """Every output of a model's forward, in call order (a forward hook, outside any cache wrapper)."""

    def __init__(self, model: nn.Module, key=None):
        self.outputs: list[torch.Tensor] = []
        self.key = key or (lambda out: out["x"] if isinstance(out, dict) else (out[0] if isinstance(out, tuple)
                                                                                 else out.sample))
        self.handle = model.register_forward_hook(lambda m, a, out: self.outputs.append(self.key(out).clone()))

    def remove(self):
        self.handle.remove()


def save_folder(path, seed: int = 0, words=("a", "red", "blue", "ball", "cube", "moves", "left", "right", "on",
                                            "grass")):
    """A complete local HunyuanVideoPipeline folder with tiny text encoders (a 2-layer LLaMA whose width is the
    transformer's text_embed_dim, a 1-layer CLIP text model whose width is its pooled_projection_dim) and
    word-level tokenizers, all standard transformers classes, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast)
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}

    def tokenizer(max_length):
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                       eos_token="</s>", model_max_length=max_length)
    pipe = build_pipeline(seed)
    c = pipe.transformer.config
    torch.manual_seed(seed + 1)
    llama = LlamaModel(LlamaConfig(vocab_size=len(vocab), hidden_size=c.text_embed_dim, intermediate_size=32,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=512))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=c.pooled_projection_dim,
                                        intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        max_position_embeddings=77, eos_token_id=1, pad_token_id=0))
    pipe.register_modules(text_encoder=llama.eval(), tokenizer=tokenizer(512), text_encoder_2=clip.eval(),
                          tokenizer_2=tokenizer(77))
    pipe.save_pretrained(path)
    return path
