"""A tiny stand-in for VideoSys's Open-Sora ``STDiT3``, an RFlow-style sampler and a pipeline, for tests that run
without the fork (``OPENSORA_REPO`` unset). Written for these tests; no fork code.

The stand-in has the fork's *interface* (what stepcache.opensora and the published patches read): the class name
``STDiT3``; ``forward(x, timestep, all_timesteps, y, mask=None, x_mask=None, fps=None, height=None, width=None)``
returning float32 ``[B, 2C, T, H, W]`` (pred_sigma); ``spatial_blocks`` / ``temporal_blocks`` zipped in the forward,
each block called as ``block(x, y, t_mlp, y_lens, x_mask, t0_mlp, T, S, timestep, all_timesteps=...)`` on
``[B, T*S, C]`` tokens with ``scale_shift_table`` and ``norm1``; ``x_embedder.proj``, ``t_block``, ``final_layer``,
``unpatchify``, ``in_channels``/``out_channels``, ``config`` and ``parallel_manager``. Its layers are simple
attention/MLP blocks of its own, enough for real step-to-step dynamics.

The sampler calls the model like the fork's ``RFLOW.sample``: one call per step on ``cat([z, z])`` (batched CFG),
with a new ``all_timesteps`` list per generation holding ``int()`` of the model-dtype timesteps.
"""
from __future__ import annotations

import math
import types

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CAPTION_CHANNELS = 16
TEXT_LEN = 8


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, y, y_lens):
        # y: [1, sum(y_lens), C] packed text tokens; each sample attends to its own slice.
        outs, offset = [], 0
        for i, n in enumerate(y_lens):
            tokens = y[:, offset:offset + n]
            offset += n
            q = self.q(x[i:i + 1])
            k, v = self.kv(tokens).chunk(2, dim=-1)
            h = self.heads
            q, k, v = (t.view(1, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, x.shape[1], -1))
        return self.proj(torch.cat(outs))


class Block(nn.Module):
    def __init__(self, dim, heads, temporal):
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.attn = Attention(dim, heads)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)
        self.parallel_manager = None

    def forward(self, x, y, t, mask=None, x_mask=None, t0=None, T=None, S=None, timestep=None, all_timesteps=None):
        b, n, c = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(b, 6, -1)).chunk(6, dim=1)
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        if self.temporal:  # attention over frames at each spatial position
            h = h.view(b, T, S, c).transpose(1, 2).reshape(b * S, T, c)
            h = self.attn(h).view(b, S, T, c).transpose(1, 2).reshape(b, n, c)
        else:  # attention over positions within each frame
            h = self.attn(h.reshape(b * T, S, c)).reshape(b, n, c)
        x = x + gate_msa * h
        x = x + self.cross_attn(x, y, mask)
        h = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * h


class TimestepEmbedding(nn.Module):
    def __init__(self, dim, freq_dim=32):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t, dtype):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(dtype))


class FinalLayer(nn.Module):
    def __init__(self, dim, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(dim, out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)

    def forward(self, x, t, x_mask=None, t0=None, T=None, S=None):
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class STDiT3(nn.Module):
    def __init__(self, depth=2, hidden_size=32, num_heads=4, in_channels=4, pred_sigma=True, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = types.SimpleNamespace(depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                                            in_channels=in_channels, pred_sigma=pred_sigma, skip_y_embedder=False)
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if pred_sigma else in_channels
        self.patch_size = (1, 2, 2)
        self.input_sq_size = 64
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv3d(in_channels, hidden_size, self.patch_size, self.patch_size)
        self.t_embedder = TimestepEmbedding(hidden_size)
        self.fps_embedder = nn.Linear(1, hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = nn.Linear(CAPTION_CHANNELS, hidden_size)
        self.y_null = nn.Parameter(torch.randn(TEXT_LEN, CAPTION_CHANNELS))
        self.spatial_blocks = nn.ModuleList([Block(hidden_size, num_heads, False) for _ in range(depth)])
        self.temporal_blocks = nn.ModuleList([Block(hidden_size, num_heads, True) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, int(np.prod(self.patch_size)) * self.out_channels)
        self.parallel_manager = types.SimpleNamespace(cp_size=1, sp_size=1, dp_size=1)
        for block in [*self.spatial_blocks, *self.temporal_blocks]:
            block.parallel_manager = self.parallel_manager

    def encode_text(self, y, mask):
        y = self.y_embedder(y)  # [B, 1, L, C]
        mask = mask.repeat(y.shape[0] // mask.shape[0], 1)
        y_lens = mask.sum(dim=1).tolist()
        y = y.squeeze(1).masked_select(mask.unsqueeze(-1) != 0).view(1, -1, y.shape[-1])
        return y, y_lens

    def unpatchify(self, x, T, H, W):
        b = x.shape[0]
        pt, ph, pw = self.patch_size
        x = x.view(b, T, H, W, pt, ph, pw, self.out_channels)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.out_channels, T * pt, H * ph, W * pw)

    def forward(self, x, timestep, all_timesteps, y, mask=None, x_mask=None, fps=None, height=None, width=None,
                **kwargs):
        dtype = self.x_embedder.proj.weight.dtype
        b = x.shape[0]
        x, timestep, y = x.to(dtype), timestep.to(dtype), y.to(dtype)
        t = self.t_embedder(timestep, dtype) + self.fps_embedder(fps[:, None].to(dtype))
        t_mlp = self.t_block(t)
        y, y_lens = self.encode_text(y, mask)
        x = self.x_embedder.proj(x)  # [B, C, T, H, W]
        _, c, T, H, W = x.shape
        S = H * W
        x = x.flatten(2).transpose(1, 2)  # [B, T*S, C]
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x, y, t_mlp, y_lens, x_mask, None, T, S, timestep, all_timesteps=all_timesteps)
            x = temporal(x, y, t_mlp, y_lens, x_mask, None, T, S, timestep, all_timesteps=all_timesteps)
        x = self.final_layer(x, t, x_mask, None, T, S)
        return self.unpatchify(x, T, H, W).to(torch.float32)


def model_args(n=1, frames=3, size=8, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, TEXT_LEN, dtype=torch.long)
    mask[:, 5:] = 0
    return {"y": torch.randn(n, 1, TEXT_LEN, CAPTION_CHANNELS, generator=g).to(dtype), "mask": mask,
            "fps": torch.full((n,), 24.0), "height": torch.full((n,), float(size * 8)),
            "width": torch.full((n,), float(size * 8)), "num_frames": torch.full((n,), float(frames))}


def timestep_shift(t, shift=3.0, num_timesteps=1000):
    """An RFlow-style resolution shift of the schedule (non-integral timesteps, like the fork's transform)."""
    t = t / num_timesteps
    return shift * t / (1 + (shift - 1) * t) * num_timesteps


def sample(model, z, args, steps=30, cfg_scale=7.0, shift=3.0, outputs=None):
    """The fork's RFLOW.sample calling convention, with our own arithmetic. ``outputs`` collects every model
    output. Returns the final latent."""
    args = dict(args)
    y_null = model.y_null[None, None].repeat(z.shape[0], 1, 1, 1).to(args["y"].dtype)
    args["y"] = torch.cat([args["y"], y_null], 0)
    num = [(1.0 - i / steps) * 1000 for i in range(steps)]
    timesteps = [timestep_shift(torch.tensor([t] * z.shape[0]), shift) for t in num]
    dtype = model.x_embedder.proj.weight.dtype
    all_timesteps = [int(t.to(dtype).item()) for t in timesteps]  # a new list per generation, as the fork does
    for i, t in enumerate(timesteps):
        z_in = torch.cat([z, z], 0)
        out = model(z_in, torch.cat([t, t], 0), all_timesteps, **args)
        if outputs is not None:
            outputs.append(out)
        pred = out.chunk(2, dim=1)[0]
        cond, uncond = pred.chunk(2, dim=0)
        v = uncond + cfg_scale * (cond - uncond)
        dt = (timesteps[i] - timesteps[i + 1] if i < steps - 1 else timesteps[i]) / 1000
        z = z + v * dt[:, None, None, None, None]
    return z


class Output:
    def __init__(self, video):
        self.video = video


class TinyPipeline:
    """Has what stepcache.opensora.generate_set uses of the fork's OpenSoraPipeline / VideoSysEngine:
    ``transformer``, ``generate(prompt, seed=, resolution=, aspect_ratio=, num_frames=, verbose=)`` returning
    ``.video[0]`` as ``[T, H, W, 3]`` uint8, and ``save_video(video, path)``."""

    def __init__(self, model=None, steps=30, interrupt_at=None):
        self.transformer = model or STDiT3().eval()
        self.steps = steps
        self.calls: list[tuple[str, int]] = []
        self.interrupt_at = interrupt_at

    @torch.no_grad()
    def generate(self, prompt, seed=0, resolution="480p", aspect_ratio="9:16", num_frames=51, verbose=True):
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        self.calls.append((prompt, seed))
        g = torch.Generator().manual_seed(seed * 1000 + sum(map(ord, prompt)) % 997)
        z = torch.randn(1, self.transformer.in_channels, 3, 8, 8, generator=g)
        z = sample(self.transformer, z, model_args(seed=len(prompt)), steps=self.steps)
        frames = torch.tanh(F.interpolate(z[:, :3], scale_factor=(1, 4, 4)))[0]  # [3, T, 32, 32]
        video = ((frames.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return Output([video])

    def save_video(self, video, path):
        import imageio
        imageio.mimwrite(path, video.numpy(), fps=8)
