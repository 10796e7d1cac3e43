"""Helpers every test file shares: the block-work counter, the gate of the opt-in tests against upstream
checkouts, the CPU attention stand-in and the stub VAE that the upstream pipelines call.

Imported explicitly (``from helpers import ...``; pytest puts tests/ on sys.path for rootdir-less test folders).
"""
from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------ counting work
class BlockWork:
    """Real work inside the block stacks of ``model``, counted by forward pre-hooks on the ``nn.Linear`` layers
    inside the blocks: a skipped block never reaches them, whatever the cache does to intercept blocks (it wraps
    or replaces forwards, or calls the blocks and returns early), so a count of zero on a reused pass is an
    observation, not our own bookkeeping.

    ``model`` is the transformer and ``stacks`` the qualified names of its block lists (``"blocks"``,
    ``"double_blocks"``, ``"module.blocks"``...); ``exclude`` names Linear layers not to count as block work
    (TeaCache's signal is block 0's modulation on HunyuanVideo, which the method evaluates on every pass by design).

    * ``calls``: Linear calls inside the stacks so far; ``per_pass``: the Linear layers inside the stacks, which is
      the calls of one full pass where each layer runs once per pass (a model that calls a layer more often, as
      opensora_tiny's per-sample cross-attention does, compares ``block`` entries instead); ``passes``:
      ``calls / per_pass``;
    * per call of ``model`` (a pre-hook on it): ``block[i]`` the Linear calls inside the stacks during call i and
      ``total[i]`` those in the whole model; ``ran()``: per call, whether any block did work ("C") or none (".").
    """

    def __init__(self, model: nn.Module, stacks: tuple[str, ...] = ("blocks",), exclude: tuple[str, ...] = ()):
        self.block: list[int] = []
        self.total: list[int] = []
        self.calls = 0
        self.per_pass = 0
        self.handles = [model.register_forward_pre_hook(self._start)]
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                in_stack = any(name.startswith(f"{s}.") for s in stacks) and name not in exclude
                self.per_pass += in_stack
                self.handles.append(module.register_forward_pre_hook(self._count(in_stack)))
        if not self.per_pass:
            raise ValueError(f"no nn.Linear inside {stacks} of {type(model).__name__}: nothing would be counted")

    def _start(self, *_):
        self.block.append(0)
        self.total.append(0)

    def _count(self, in_stack: bool):
        def hook(*_):
            self.calls += in_stack
            if self.block:
                self.total[-1] += 1
                self.block[-1] += in_stack
        return hook

    @property
    def passes(self) -> float:
        return self.calls / self.per_pass

    def ran(self) -> str:
        return "".join("C" if n else "." for n in self.block)

    def remove(self):
        for h in self.handles:
            h.remove()


def cached_run(pipe, method: str, run, **options):
    """(``run(pipe)``'s output, the stats) with ``method`` enabled on ``pipe`` by ``options`` (profile, parameters),
    its warnings silenced, and the method removed afterwards however the run ended."""
    import warnings

    import stepcache
    stepcache.enable(pipe, method, **options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return run(pipe), stepcache.stats(pipe)
    finally:
        stepcache.disable(pipe)


# ------------------------------------------------------------------------------------- upstream checkouts
INSTALL_LINE = 'pip install -e ".[upstream-tests]"'

HUNYUANVIDEO = dict(env_name="HUNYUANVIDEO_REPO", marker_file="hyvideo/modules/models.py",
                    requirements=("einops", "loguru"),
                    what="a Tencent/HunyuanVideo checkout (checked against fa14b001c18f37191c938a9ef6baad3b9b472759)")
HUNYUANVIDEO15 = dict(env_name="HUNYUANVIDEO15_REPO",
                      marker_file="hyvideo/models/transformers/hunyuanvideo_1_5_transformer.py",
                      requirements=("einops", "loguru", "imageio", "omegaconf", "diffusers"),
                      what="a Tencent-Hunyuan/HunyuanVideo-1.5 checkout (checked against "
                           "60783e704160023913bee78f0b47036d393d4dfa)")
WAN21 = dict(env_name="WAN21_REPO", marker_file="wan/modules/model.py",
             requirements=("easydict", "einops", "ftfy", "regex", "PIL", "imageio", "diffusers"),
             what="a Wan-Video/Wan2.1 checkout")
# wan/textimage2video.py (WanTI2V) is Wan2.2's alone: a Wan2.1 checkout under WAN22_REPO is told apart.
WAN22 = dict(env_name="WAN22_REPO", marker_file="wan/textimage2video.py",
             requirements=("easydict", "einops", "ftfy", "regex", "PIL", "imageio", "diffusers"),
             what="a Wan-Video/Wan2.2 checkout (checked against 42bf4cfaa384bc21833865abc2f9e6c0e67233dc)")
OPENSORA = dict(env_name="OPENSORA_REPO", marker_file="videosys/models/transformers/open_sora_transformer_3d.py",
                requirements=("rotary_embedding_torch", "omegaconf", "einops", "rich", "diffusers"),
                what="a Zehong-Ma/MagCache or ali-vilab/TeaCache checkout (its videosys/ fork holds Open-Sora 1.2's "
                     "STDiT3)")
# What the fork's OpenSoraPipeline module imports besides its transformer (caption cleaning, data helpers, saving).
OPENSORA_PIPELINE = ("bs4", "ftfy", "requests", "PIL", "imageio")


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent that fails to import, or a module without a spec
        return True


def upstream_checkout(env_name: str, marker_file: str, requirements=(), what: str = "an upstream checkout") -> Path:
    """The checkout ``env_name`` points to, or a pytest skip (of the module when called at import time) saying why
    not: the variable to set, the file a checkout has, or the Python modules to install, with the install line."""
    import pytest

    root = os.environ.get(env_name)
    if not root:
        pytest.skip(f"set {env_name} to the root of {what} to run the opt-in upstream tests "
                    f"(they need `{INSTALL_LINE}`)", allow_module_level=True)
    if not (Path(root) / marker_file).is_file():
        pytest.skip(f"{env_name}={root} is not {what} (no {marker_file})", allow_module_level=True)
    missing = [m for m in requirements if _missing(m)]
    if missing:
        pytest.skip(f"the upstream code under {env_name} imports {', '.join(missing)}, which is not installed: "
                    f"{INSTALL_LINE}", allow_module_level=True)
    return Path(root)


def hunyuanvideo_checkout() -> Path:
    return upstream_checkout(**HUNYUANVIDEO)


def hunyuanvideo15_checkout() -> Path:
    return upstream_checkout(**HUNYUANVIDEO15)


def wan21_checkout() -> Path:
    return upstream_checkout(**WAN21)


def wan22_checkout() -> Path:
    return upstream_checkout(**WAN22)


def opensora_checkout(pipeline: bool = False) -> Path:
    """``pipeline``: the test runs the fork's ``OpenSoraPipeline`` too, which imports more."""
    spec = dict(OPENSORA)
    if pipeline:
        spec["requirements"] = (*spec["requirements"], *OPENSORA_PIPELINE)
    return upstream_checkout(**spec)


# ------------------------------------------------------------------------------------- attention on CPU
def sdpa(q, k, v, mask=None, dropout_p: float = 0.0, scale=None, causal: bool = False):
    """The CPU stand-in for the CUDA attention kernels upstream calls: ``[B, S, heads, dim]`` in and out (the
    flash-attn layout), SDPA in between; ``mask`` a boolean ``[B, 1, 1, S_k]`` key mask or None.

    The upstream entry points it stands in for differ only in how they pack the sequences, so each keeps a thin
    adapter of its own signature around this: Wan2.1's padded ``flash_attention(q, k, v, q_lens, k_lens, ...)``
    (wan_official_tiny), HunyuanVideo's packed ``flash_attn_varlen_func(q, k, v, cu_q, cu_k, ...)`` (hunyuan_tiny)
    and the xDiT long-context attention of the multi-GPU worker (multigpu_official_worker). The one attention
    stand-in kept apart is multigpu_worker's op for diffusers' ring attention, which must also return the
    log-sum-exp (SDPA does not; CPU aten's flash op does)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, scale=scale, is_causal=causal)
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------- the VAE
class StubVAE(nn.Module):
    """Stands in for the three upstream VAEs (a checkpoint-free run), deterministic and cheap. Each upstream
    pipeline calls its VAE its own way, so the stub has each of those interfaces:

    * HunyuanVideo (``HunyuanVideoSampler``): ``config`` (block_out_channels, scaling_factor, shift_factor),
      ``enable_tiling()`` and ``decode(latents, return_dict=False, generator=None)`` -> ``(video,)``;
    * Wan2.1 (``WanT2V`` / ``WanI2V``, which pass lists): ``model.z_dim``, ``encode([video])`` (I2V's image latent,
      ``[3, F, h, w] -> [z, (F-1)//4+1, h/8, w/8]``) and ``decode([latent])``, the identity, so that a generation
      returns its final latent;
    * the Open-Sora fork (``OpenSoraPipeline``): ``out_channels``, ``get_latent_size(input_size)`` and the call
      ``vae(z, decode_only=True, num_frames=N)`` -> a ``[B, 3, N, H, W]`` video in [-1, 1].

    A decoded video is the latent's first three channels (Open-Sora's in [-1, 1] through tanh, upsampled 2x and
    stretched to ``num_frames``).
    """

    config = types.SimpleNamespace(block_out_channels=[1, 1, 1, 1], scaling_factor=0.476986, shift_factor=None)

    def __init__(self, z_dim: int = 16):
        super().__init__()
        self.model = types.SimpleNamespace(z_dim=z_dim)
        self.out_channels = z_dim
        self.register_buffer("_anchor", torch.zeros(()))  # .device / .dtype follow .to()

    @property
    def device(self):
        return self._anchor.device

    @property
    def dtype(self):
        return self._anchor.dtype

    def enable_tiling(self):
        pass

    def encode(self, videos):
        v = videos[0]
        lat = F.avg_pool3d(v[None], (1, 8, 8))[0]
        lat = torch.cat([lat[:, :1], lat[:, 1::4]], dim=1)
        return [lat.repeat(6, 1, 1, 1)[: self.model.z_dim]]

    def decode(self, z, return_dict=False, generator=None):
        if isinstance(z, list):  # Wan2.1
            return [x.clone() for x in z]
        return (z[:, :3],)

    def get_latent_size(self, input_size):
        frames, height, width = input_size
        return [(frames - 1) // 17 * 5 + 1 if frames > 1 else 1, height // 8, width // 8]

    def forward(self, z, decode_only=True, num_frames=None):
        video = torch.tanh(self.decode(z.float())[0])
        video = F.interpolate(video, scale_factor=(1, 2, 2))
        return video.repeat_interleave(max(num_frames // video.shape[2], 1), dim=2)[:, :, :num_frames]
