"""Upstream Wan2.1 (the checkout ``WAN21_REPO`` points to, gated by helpers.wan21_checkout) on CPU with tiny
random weights, for tests only.

What stands in for GPU- or checkpoint-bound code, and nothing else:

* ``wan/__init__.py`` and the other package ``__init__``s are skipped (they import every pipeline, T5's default
  argument calls ``torch.cuda.current_device()``); the modules themselves are upstream's files;
* torchvision (no wheel loads against the CPU torch) is a stub module during the imports only;
* ``flash_attention`` (asserts CUDA) is an SDPA reference with the same key-padding mask, inside
  :func:`cpu_attention` only;
* ``WanT2V`` / ``WanI2V`` are built with ``object.__new__`` around a tiny ``WanModel`` and stub T5 / VAE / CLIP, so
  that upstream's ``generate()`` sampling loop runs unchanged;
* upstream's ``generate.py`` is imported as is; its ``wan.WanT2V`` / ``wan.WanI2V`` names give those samplers, and a
  test replaces ``cache_video`` (torchvision's ``make_grid``) by ``torch.save``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from helpers import StubVAE, sdpa, wan21_checkout

TINY_SIZE = "64*64"  # added to upstream's size tables by the tests: the published sizes need GBs of attention
T2V_TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=32, ffn_dim=48, freq_dim=32,
                text_dim=32, out_dim=16, num_heads=2, num_layers=3)
# I2V: 16 noise + 4 mask + 16 image-latent channels; text_len must stay 512 (upstream splits the I2V context there).
I2V_TINY = dict(T2V_TINY, model_type="i2v", text_len=512, in_dim=36)


class Upstream(types.SimpleNamespace):
    pass


_LOADED: Upstream | None = None


def _stub_torchvision() -> dict[str, types.ModuleType]:
    if importlib.util.find_spec("torchvision") is not None:
        return {}
    tv, tvt, tvf, tvu = (types.ModuleType(n) for n in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.utils"))
    tvf.to_tensor = lambda img: torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1) \
        .contiguous()
    tv.transforms, tv.utils, tvt.functional = tvt, tvu, tvf
    return {m.__name__: m for m in (tv, tvt, tvf, tvu)}


def load(repo: str) -> Upstream:
    """Import upstream's model, samplers, configs and generate.py once per process."""
    global _LOADED
    repo = str(repo)
    if _LOADED is not None:
        return _LOADED
    for name in ("wan", "wan.modules", "wan.utils", "wan.distributed"):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [os.path.join(repo, *name.split("."))]
            sys.modules[name] = package
    # Libraries that probe for torchvision with find_spec (which fails on a stub) are imported before the stub.
    import diffusers.configuration_utils  # noqa: F401
    import diffusers.models.modeling_utils  # noqa: F401
    import diffusers.schedulers  # noqa: F401
    import transformers
    transformers.AutoTokenizer  # noqa: B018  (resolves the lazy import now)
    stubs = _stub_torchvision()
    sys.modules.update(stubs)
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    sys.path.insert(0, repo)
    try:
        model = importlib.import_module("wan.modules.model")
        text2video = importlib.import_module("wan.text2video")
        image2video = importlib.import_module("wan.image2video")
        configs = importlib.import_module("wan.configs")
        importlib.import_module("wan.utils.utils")
        try:
            importlib.import_module("wan.utils.prompt_extend")
        except ImportError:  # it imports dashscope at module level; generate.py only names its two classes
            stub = types.ModuleType("wan.utils.prompt_extend")
            stub.DashScopePromptExpander = stub.QwenPromptExpander = type("PromptExpanderStub", (), {})
            sys.modules[stub.__name__] = stub
        generate = importlib.import_module("generate")
    finally:
        sys.path.remove(repo)
        torch.cuda.current_device = current_device
        for name in stubs:
            sys.modules.pop(name, None)
    _LOADED = Upstream(repo=repo, model=model, WanModel=model.WanModel, WanT2V=text2video.WanT2V,
                       WanI2V=image2video.WanI2V, configs=configs, generate=generate, wan=sys.modules["wan"])
    return _LOADED


def flash_attention_sdpa(q, k, v, q_lens=None, k_lens=None, dropout_p=0., softmax_scale=None, q_scale=None,
                         causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                         version=None):
    """Upstream's padded flash_attention signature around helpers.sdpa: keys at index >= k_lens[b] are masked
    out."""
    assert q_lens is None and window_size == (-1, -1)
    if q_scale is not None:
        q = q * q_scale
    mask = None
    if k_lens is not None:
        mask = (torch.arange(k.size(1))[None, :] < k_lens.long()[:, None])[:, None, None, :]
    return sdpa(q, k, v, mask, dropout_p=dropout_p, scale=softmax_scale, causal=causal).type(q.dtype)


@contextlib.contextmanager
def cpu_attention(up: Upstream):
    saved = up.model.flash_attention
    up.model.flash_attention = flash_attention_sdpa
    try:
        yield
    finally:
        up.model.flash_attention = saved


@contextlib.contextmanager
def upstream_on_cpu(repo):
    """Upstream imported (:func:`load`) with its attention on the CPU (:func:`cpu_attention`)."""
    up = load(repo)
    with cpu_attention(up):
        yield up


@pytest.fixture(scope="module")
def up():
    """The test modules' fixture (``from wan_official_tiny import up``): :func:`upstream_on_cpu` of the checkout."""
    with upstream_on_cpu(wan21_checkout()) as upstream:
        yield upstream


def tiny_model(up: Upstream, kind: str = "t2v", seed: int = 0) -> nn.Module:
    """A tiny WanModel with every parameter perturbed: upstream zero-initialises the head, so an unperturbed model
    outputs exactly 0 and every comparison would pass."""
    torch.manual_seed(seed)
    model = up.WanModel(**(T2V_TINY if kind == "t2v" else I2V_TINY)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


class StubT5:
    """``T5EncoderModel.__call__(texts, device)`` -> list of [L, text_dim]; depends only on the text."""
    model = nn.Identity()

    def __call__(self, texts, device):
        return [torch.randn(6 + len(s) % 7, 32, generator=torch.Generator().manual_seed(len(s))).to(device)
                for s in texts]


class StubCLIP:
    model = nn.Identity()

    def visual(self, videos):
        return torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(1)) * 0.1


def bare_sampler(up: Upstream, kind: str, model: nn.Module):
    """A ``WanT2V`` / ``WanI2V`` instance without ``__init__`` (which loads checkpoints onto cuda:N)."""
    cls, task = (up.WanT2V, "t2v-1.3B") if kind == "t2v" else (up.WanI2V, "i2v-14B")
    cfg = up.configs.WAN_CONFIGS[task]
    sampler = object.__new__(cls)
    sampler.__dict__.update(
        device=torch.device("cpu"), config=cfg, rank=0, t5_cpu=True, use_usp=False, sp_size=1,
        num_train_timesteps=cfg.num_train_timesteps, param_dtype=torch.float32, vae_stride=cfg.vae_stride,
        patch_size=cfg.patch_size, sample_neg_prompt=cfg.sample_neg_prompt, text_encoder=StubT5(), model=model,
        vae=StubVAE(16))
    if kind == "i2v":
        sampler.clip = StubCLIP()
    return sampler


def make_image(path, size=(64, 64), seed=0):
    from PIL import Image
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return str(path)


def run_t2v(sampler, steps=6, frames=5, seed=0, **kw):
    return sampler.generate("a cat", size=(64, 64), frame_num=frames, shift=5.0, sample_solver="unipc",
                            sampling_steps=steps, guide_scale=5.0, seed=seed, offload_model=False, **kw)


def run_i2v(sampler, image, steps=6, frames=5, seed=0, **kw):
    from PIL import Image
    return sampler.generate("a cat", Image.open(image).convert("RGB"), max_area=64 * 64, frame_num=frames,
                            shift=3.0, sample_solver="unipc", sampling_steps=steps, guide_scale=5.0, seed=seed,
                            offload_model=False, **kw)


def checkpoint_layout(folder, config) -> str:
    """The files and folders a downloaded checkpoint for ``config`` (upstream's WAN_CONFIGS entry) has, as empty
    placeholders: what the scripts look for before upstream's loaders run (the tiny samplers load none of them)."""
    os.makedirs(folder, exist_ok=True)
    files = [config.t5_checkpoint, config.vae_checkpoint, "config.json", "diffusion_pytorch_model.safetensors"]
    folders = [config.t5_tokenizer]
    if "clip_checkpoint" in config:
        files.append(config.clip_checkpoint)
        folders.append(config.clip_tokenizer)
    for name in folders:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    for name in files:
        with open(os.path.join(folder, name), "wb"):
            pass
    return str(folder)


def fake_constructors(up: Upstream, made: list, seed: int = 0, wrap=None):
    """Stand-ins for ``wan.WanT2V(config=..., checkpoint_dir=..., ...)`` / ``wan.WanI2V(...)`` that build the tiny
    samplers (each a fresh model with the same weights) and remember them in ``made``."""
    def constructor(kind):
        def build(config, checkpoint_dir, device_id=0, rank=0, t5_fsdp=False, dit_fsdp=False, use_usp=False,
                  t5_cpu=False, **_):
            sampler = bare_sampler(up, kind, tiny_model(up, kind, seed))
            if wrap is not None:
                sampler.model = wrap(sampler.model)
            made.append(sampler)
            return sampler
        return build
    return {"WanT2V": constructor("t2v"), "WanI2V": constructor("i2v")}
