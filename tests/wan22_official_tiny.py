"""Upstream Wan2.2 (the checkout ``WAN22_REPO`` points to, gated by helpers.wan22_checkout) on CPU with tiny
random weights, for tests only. Modeled on wan_official_tiny (Wan2.1); checked against Wan-Video/Wan2.2@42bf4cf.

What stands in for GPU- or checkpoint-bound code, and nothing else:

* ``wan/__init__.py`` and the other package ``__init__``s are skipped (they import every pipeline, S2V and Animate
  included, and T5's default argument calls ``torch.cuda.current_device()``, answered with 0 during the imports);
  the modules themselves are upstream's files: ``wan.modules.model``, ``wan.text2video``, ``wan.image2video``,
  ``wan.textimage2video``, ``wan.configs``, ``wan.utils.utils`` and the root ``generate.py``;
* torchvision, when not installed, is a stub module during the imports only (I2V / TI2V keep its ``to_tensor``);
  ``wan.utils.prompt_extend`` is a stub when it cannot be imported (dashscope), generate.py only names its classes;
* ``flash_attention`` (asserts CUDA) is an SDPA reference with the same key-padding mask, inside
  :func:`cpu_attention` only;
* ``WanT2V`` / ``WanI2V`` (two experts, ``high_noise_model`` / ``low_noise_model``, switched at ``boundary``) and
  ``WanTI2V`` (one ``model``) are built with ``object.__new__`` around tiny ``WanModel``s and a stub T5 and VAE: the
  Wan2.1 VAE stub (helpers.StubVAE, z_dim 16, stride (4, 8, 8)) for the A14B tasks and :class:`StubVAE22` (z_dim 48,
  stride (4, 16, 16)) for TI2V, so that upstream's ``generate()`` sampling loops run unchanged with
  ``self.device`` = cpu (``torch.amp.autocast('cuda', ...)`` only warns there; the offload paths' ``.to('cpu')`` /
  ``.to(self.device)`` moves of the experts are no-ops, and ``torch.cuda.empty_cache()`` is one too);
* ``torch.cuda.synchronize()``, which upstream calls under ``offload_model=True`` (every sampler) and
  unconditionally at the end of generate.py's ``generate(args)``, raises on a CPU build: it is a no-op inside
  :func:`cuda_sync_noop` only (the run_* functions enter it when they offload; an end-to-end test enters it around
  ``generate(args)``);
* upstream's ``generate.py`` is imported as is; its ``wan.WanT2V`` / ``wan.WanI2V`` / ``wan.WanTI2V`` names give the
  tiny samplers (:func:`fake_constructors`), :func:`tiny_sizes` adds :data:`TINY_SIZE` to its size tables, and a
  test replaces its ``save_video`` (torchvision's ``make_grid`` and imageio) by :func:`save_video_with_torch`.

Upstream's modules are imported with any other ``wan`` / ``generate`` modules (the Wan2.1 harness's) set aside and
are taken out of ``sys.modules`` afterwards, so both harnesses can load in one process without one importing the
other's files.
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
import torch.nn.functional as F
from torch import nn

from helpers import StubVAE, wan22_checkout
# What runs upstream Wan on the CPU is the same for Wan2.1 and Wan2.2 (the same flash_attention signature and
# torchvision imports): one implementation, in the Wan2.1 harness.
from wan_official_tiny import _stub_torchvision, cpu_attention, flash_attention_sdpa  # noqa: F401

TINY_SIZE = "64*64"  # added to upstream's size tables by tiny_sizes(): the published sizes need GBs of attention
TASKS = {"t2v": "t2v-A14B", "i2v": "i2v-A14B", "ti2v": "ti2v-5B"}  # kind -> upstream's WAN_CONFIGS key
T2V_TINY = dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, dim=32, ffn_dim=48, freq_dim=32,
                text_dim=32, out_dim=16, num_heads=2, num_layers=3)
# I2V: 16 noise + 4 mask + 16 image-latent channels (Wan2.2's I2V has no CLIP, so no 512-token context split).
I2V_TINY = dict(T2V_TINY, model_type="i2v", in_dim=36)
# TI2V: the 48 channels of the Wan2.2 VAE in and out; the image enters as the first latent frame, not as y.
TI2V_TINY = dict(T2V_TINY, model_type="ti2v", in_dim=48, out_dim=48)
TINY = {"t2v": T2V_TINY, "i2v": I2V_TINY, "ti2v": TI2V_TINY}
_OWNED = ("wan", "generate")  # the top-level names upstream's modules live under


class Upstream(types.SimpleNamespace):
    pass


_LOADED: Upstream | None = None


def _owned(name: str) -> bool:
    return any(name == top or name.startswith(f"{top}.") for top in _OWNED)


def load(repo: str) -> Upstream:
    """Import upstream's model, samplers, configs, utils and generate.py once per process."""
    global _LOADED
    repo = str(repo)
    if _LOADED is not None:
        if _LOADED.repo != repo:
            raise RuntimeError(f"upstream Wan2.2 is already loaded from {_LOADED.repo}, not {repo}")
        return _LOADED
    # Libraries that probe for torchvision with find_spec (which fails on a stub) are imported before the stub.
    import diffusers.configuration_utils  # noqa: F401
    import diffusers.models.modeling_utils  # noqa: F401
    import diffusers.schedulers  # noqa: F401
    import transformers
    transformers.AutoTokenizer  # noqa: B018  (resolves the lazy import now)
    others = {name: sys.modules.pop(name) for name in list(sys.modules) if _owned(name)}  # e.g. Wan2.1's
    for name in ("wan", "wan.modules", "wan.utils", "wan.distributed"):  # wan.configs' own __init__ holds the tables
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(repo, *name.split("."))]
        sys.modules[name] = package
    stubs = _stub_torchvision()
    sys.modules.update(stubs)
    current_device = torch.cuda.current_device
    torch.cuda.current_device = lambda: 0
    sys.path.insert(0, repo)
    try:
        model = importlib.import_module("wan.modules.model")
        text2video = importlib.import_module("wan.text2video")
        image2video = importlib.import_module("wan.image2video")
        textimage2video = importlib.import_module("wan.textimage2video")
        configs = importlib.import_module("wan.configs")
        utils = importlib.import_module("wan.utils.utils")
        solvers = importlib.import_module("wan.utils.fm_solvers")
        unipc = importlib.import_module("wan.utils.fm_solvers_unipc")
        try:
            importlib.import_module("wan.utils.prompt_extend")
        except ImportError:  # it imports dashscope at module level; generate.py only names its two classes
            stub = types.ModuleType("wan.utils.prompt_extend")
            stub.DashScopePromptExpander = stub.QwenPromptExpander = type("PromptExpanderStub", (), {})
            sys.modules[stub.__name__] = stub
        generate = importlib.import_module("generate")
        wan = sys.modules["wan"]
    finally:
        sys.path.remove(repo)
        torch.cuda.current_device = current_device
        for name in stubs:
            sys.modules.pop(name, None)
        for name in [n for n in sys.modules if _owned(n)]:
            del sys.modules[name]
        sys.modules.update(others)
    assert generate.__file__ == os.path.join(repo, "generate.py"), generate.__file__
    _LOADED = Upstream(repo=repo, model=model, WanModel=model.WanModel, WanT2V=text2video.WanT2V,
                       WanI2V=image2video.WanI2V, WanTI2V=textimage2video.WanTI2V, configs=configs, utils=utils,
                       solvers=solvers, unipc=unipc, generate=generate, wan=wan)
    return _LOADED


@contextlib.contextmanager
def cuda_sync_noop():
    """``torch.cuda.synchronize`` a no-op on a build without CUDA (it raises there), inside the block only: the
    samplers call it under ``offload_model=True`` and generate.py at its end."""
    if torch.cuda.is_available():
        yield
        return
    saved = torch.cuda.synchronize
    torch.cuda.synchronize = lambda *a, **k: None
    try:
        yield
    finally:
        torch.cuda.synchronize = saved


@contextlib.contextmanager
def upstream_on_cpu(repo):
    """Upstream imported (:func:`load`) with its attention on the CPU (:func:`cpu_attention`)."""
    up = load(repo)
    with cpu_attention(up):
        yield up


@pytest.fixture(scope="module")
def up():
    """The test modules' fixture (``from wan22_official_tiny import up``): :func:`upstream_on_cpu` of the
    checkout."""
    with upstream_on_cpu(wan22_checkout()) as upstream:
        yield upstream


def tiny_model(up: Upstream, kind: str = "t2v", seed: int = 0) -> nn.Module:
    """A tiny WanModel of ``kind`` (t2v / i2v / ti2v) with every parameter perturbed: upstream zero-initialises the
    head, so an unperturbed model outputs exactly 0 and every comparison would pass."""
    torch.manual_seed(seed)
    model = up.WanModel(**TINY[kind]).eval().requires_grad_(False)
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


class StubVAE22(StubVAE):
    """``Wan2_2_VAE`` as WanTI2V calls it: ``model.z_dim`` 48, ``encode([video])`` (TI2V's image, ``[3, 1, H, W]``;
    any ``[3, T, H, W] -> [48, (T-1)//4+1, H/16, W/16]``) and ``decode([latent])``, the identity (helpers.StubVAE),
    so that a generation returns its final latent."""

    def __init__(self):
        super().__init__(48)

    def encode(self, videos):
        out = []
        for v in videos:
            lat = F.avg_pool3d(v[None].float(), (1, 16, 16))[0]
            lat = torch.cat([lat[:, :1], lat[:, 1::4]], dim=1)
            out.append(lat.repeat(16, 1, 1, 1)[: self.model.z_dim])
        return out


def bare_sampler(up: Upstream, kind: str, high: nn.Module | None = None, low: nn.Module | None = None,
                 model: nn.Module | None = None, seed: int = 0, t5_cpu: bool = True, init_on_cpu: bool = True):
    """A ``WanT2V`` / ``WanI2V`` (``kind`` t2v / i2v: the experts ``high`` and ``low``, tiny models of seeds ``seed``
    and ``seed + 1`` when not given) or ``WanTI2V`` (ti2v: ``model``) without ``__init__`` (which loads checkpoints
    onto cuda:N), with the attributes ``__init__`` sets, from upstream's config for the task (``boundary`` 0.875 for
    t2v-A14B and 0.900 for i2v-A14B, ``num_train_timesteps`` 1000). ``init_on_cpu`` is upstream's default (True):
    generate.py never passes it."""
    task = TASKS[kind]
    cfg = up.configs.WAN_CONFIGS[task]
    cls = {"t2v": up.WanT2V, "i2v": up.WanI2V, "ti2v": up.WanTI2V}[kind]
    sampler = object.__new__(cls)
    sampler.__dict__.update(
        device=torch.device("cpu"), config=cfg, rank=0, t5_cpu=t5_cpu, init_on_cpu=init_on_cpu, sp_size=1,
        num_train_timesteps=cfg.num_train_timesteps, param_dtype=torch.float32, vae_stride=cfg.vae_stride,
        patch_size=cfg.patch_size, sample_neg_prompt=cfg.sample_neg_prompt, text_encoder=StubT5())
    if kind == "ti2v":
        if high is not None or low is not None:
            raise TypeError("WanTI2V has one model: pass model=, not high=/low=")
        sampler.__dict__.update(model=model if model is not None else tiny_model(up, kind, seed), vae=StubVAE22())
    else:
        if model is not None:
            raise TypeError(f"{cls.__name__} has two experts: pass high= and low=, not model=")
        sampler.__dict__.update(
            boundary=cfg.boundary, vae=StubVAE(16),
            high_noise_model=high if high is not None else tiny_model(up, kind, seed),
            low_noise_model=low if low is not None else tiny_model(up, kind, seed + 1))
    return sampler


def make_image(path, size=(64, 64), seed=0):
    from PIL import Image
    rng = np.random.RandomState(seed)
    Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8")).save(path)
    return str(path)


def _image(image):
    from PIL import Image
    return image if isinstance(image, Image.Image) else Image.open(image).convert("RGB")


def _generate(sampler, *args, offload_model=False, **kw):
    with cuda_sync_noop() if offload_model else contextlib.nullcontext():
        return sampler.generate(*args, offload_model=offload_model, **kw)


def run_t2v(sampler, steps=6, frames=5, seed=0, size=(64, 64), shift=None, guide_scale=None, **kw):
    """Upstream's ``WanT2V.generate``; ``shift`` / ``guide_scale`` default to the task's config (12.0 and
    (3.0, 4.0): low-noise, high-noise), as generate.py passes them."""
    cfg = sampler.config
    return _generate(sampler, "a cat", size=size, frame_num=frames,
                     shift=cfg.sample_shift if shift is None else shift, sample_solver="unipc",
                     sampling_steps=steps, guide_scale=cfg.sample_guide_scale if guide_scale is None else guide_scale,
                     seed=seed, **kw)


def run_i2v(sampler, image, steps=6, frames=5, seed=0, max_area=64 * 64, shift=None, guide_scale=None, **kw):
    """Upstream's ``WanI2V.generate`` on ``image`` (a path or a PIL image); config defaults as in :func:`run_t2v`
    (5.0 and (3.5, 3.5))."""
    cfg = sampler.config
    return _generate(sampler, "a cat", _image(image), max_area=max_area, frame_num=frames,
                     shift=cfg.sample_shift if shift is None else shift, sample_solver="unipc",
                     sampling_steps=steps, guide_scale=cfg.sample_guide_scale if guide_scale is None else guide_scale,
                     seed=seed, **kw)


def run_ti2v(sampler, image=None, steps=4, frames=5, seed=0, size=(64, 64), shift=None, guide_scale=None, **kw):
    """Upstream's ``WanTI2V.generate``: its t2v path without ``image``, its i2v path (the image's latent as the first
    frame, per-token timesteps 0 there) with one, at ``max_area`` = the size's area as generate.py passes it."""
    cfg = sampler.config
    return _generate(sampler, "a cat", img=None if image is None else _image(image), size=size,
                     max_area=size[0] * size[1], frame_num=frames, shift=cfg.sample_shift if shift is None else shift,
                     sample_solver="unipc", sampling_steps=steps,
                     guide_scale=cfg.sample_guide_scale if guide_scale is None else guide_scale, seed=seed, **kw)


def sampling_timesteps(up: Upstream, sampler, steps: int, shift: float, solver: str = "unipc") -> torch.Tensor:
    """The timesteps upstream's ``generate()`` loops over, built as it builds them."""
    n = sampler.num_train_timesteps
    if solver == "unipc":
        scheduler = up.unipc.FlowUniPCMultistepScheduler(num_train_timesteps=n, shift=1, use_dynamic_shifting=False)
        scheduler.set_timesteps(steps, device=sampler.device, shift=shift)
        return scheduler.timesteps
    scheduler = up.solvers.FlowDPMSolverMultistepScheduler(num_train_timesteps=n, shift=1, use_dynamic_shifting=False)
    timesteps, _ = up.solvers.retrieve_timesteps(scheduler, device=sampler.device,
                                                 sigmas=up.solvers.get_sampling_sigmas(steps, shift))
    return timesteps


def high_noise_steps(up: Upstream, sampler, steps: int, shift: float | None = None, solver: str = "unipc") -> int:
    """How many leading steps upstream's boundary rule gives the high-noise expert: ``t >= boundary *
    num_train_timesteps`` (``_prepare_model_for_timestep``); the timesteps only decrease."""
    shift = sampler.config.sample_shift if shift is None else shift
    boundary = sampler.boundary * sampler.num_train_timesteps
    return sum(t.item() >= boundary for t in sampling_timesteps(up, sampler, steps, shift, solver))


@contextlib.contextmanager
def expert_trace(sampler):
    """The experts' calls in order, one letter each: "H" (``high_noise_model``) or "L" (``low_noise_model``), from
    forward pre-hooks; yields the list it appends to."""
    trace: list[str] = []
    handles = [getattr(sampler, name).register_forward_pre_hook(lambda *_, letter=letter: trace.append(letter))
               for name, letter in (("high_noise_model", "H"), ("low_noise_model", "L"))]
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------- generate.py, end to end
@contextlib.contextmanager
def tiny_sizes(up: Upstream):
    """:data:`TINY_SIZE` (64*64) in upstream's SIZE_CONFIGS / MAX_AREA_CONFIGS and SUPPORTED_SIZES of the three
    tasks, inside the block (generate.py imported those dicts from wan.configs: the same objects). Needed before
    :func:`parse_args`, whose ``--size`` choices are SIZE_CONFIGS' keys when the parser is built."""
    c = up.configs
    saved = {t: c.SUPPORTED_SIZES[t] for t in TASKS.values()}
    c.SIZE_CONFIGS[TINY_SIZE] = (64, 64)
    c.MAX_AREA_CONFIGS[TINY_SIZE] = 64 * 64
    for task, sizes in saved.items():
        c.SUPPORTED_SIZES[task] = tuple(sizes) + (TINY_SIZE,)
    try:
        yield
    finally:
        c.SIZE_CONFIGS.pop(TINY_SIZE, None)
        c.MAX_AREA_CONFIGS.pop(TINY_SIZE, None)
        c.SUPPORTED_SIZES.update(saved)


def parse_args(up: Upstream, argv: list[str], prog: str = "generate.py"):
    """Upstream's ``_parse_args`` (which reads ``sys.argv`` and runs ``_validate_args``) on ``argv``. Its defaults
    to override for a tiny run: ``--frame_num`` (81; 121 for ti2v-5B), ``--sample_steps`` (40; 50), ``--size``
    (1280*720, which ti2v-5B rejects), ``--base_seed`` (-1: random) and ``--ckpt_dir`` (asserted given)."""
    saved = sys.argv
    sys.argv = [prog, *argv]
    try:
        return up.generate._parse_args()
    finally:
        sys.argv = saved


def save_video_with_torch(tensor, save_file=None, fps=30, suffix=".mp4", nrow=8, normalize=True, value_range=(-1, 1)):
    """Stands in for upstream's ``wan.utils.utils.save_video`` (generate.py calls it with ``tensor=video[None]``):
    ``torch.save`` of the tensor to ``save_file``; returns None, as upstream's does."""
    os.makedirs(os.path.dirname(save_file) or ".", exist_ok=True)
    torch.save(tensor.clone(), save_file)


def fake_constructors(up: Upstream, made: list, seed: int = 0, wrap=None):
    """Stand-ins for ``wan.WanT2V(config=..., checkpoint_dir=..., ...)`` / ``wan.WanI2V(...)`` / ``wan.WanTI2V(...)``
    that build the tiny samplers (each with fresh models of the same weights, honouring ``t5_cpu``) and remember them
    in ``made``; ``wrap`` (a model -> model) is applied to each expert or model. Set them on ``up.wan``, the package
    generate.py names."""
    def constructor(kind):
        def build(config, checkpoint_dir, device_id=0, rank=0, t5_fsdp=False, dit_fsdp=False, use_sp=False,
                  t5_cpu=False, init_on_cpu=True, convert_model_dtype=False, **_):
            assert config is up.configs.WAN_CONFIGS[TASKS[kind]]
            sampler = bare_sampler(up, kind, seed=seed, t5_cpu=t5_cpu, init_on_cpu=init_on_cpu)
            if wrap is not None:
                for name in ("model",) if kind == "ti2v" else ("high_noise_model", "low_noise_model"):
                    setattr(sampler, name, wrap(getattr(sampler, name)))
            made.append(sampler)
            return sampler
        return build
    return {"WanT2V": constructor("t2v"), "WanI2V": constructor("i2v"), "WanTI2V": constructor("ti2v")}


# ------------------------------------------------------------------------- the parallel paths (Ulysses, FSDP)
def upstream_parallel(up: Upstream) -> types.SimpleNamespace:
    """Upstream's parallel code as ``wan/text2video.py`` imported it during :func:`load`: ``sp_dit_forward`` and
    ``sp_attn_forward`` (wan/distributed/sequence_parallel.py), ``shard_model`` (wan/distributed/fsdp.py) and the
    globals of wan/distributed/ulysses.py (its ``flash_attention`` name)."""
    names = up.WanT2V._configure_model.__globals__  # wan/text2video.py's module namespace
    sp_attn_forward = names["sp_attn_forward"]
    return types.SimpleNamespace(sp_dit_forward=names["sp_dit_forward"], sp_attn_forward=sp_attn_forward,
                                 shard_model=names["shard_model"],
                                 ulysses=sp_attn_forward.__globals__["distributed_attention"].__globals__)


def sp_flash_attention(q, k, v, q_lens=None, k_lens=None, **kw):
    """What Ulysses' ``distributed_attention`` calls once the heads are scattered: ``flash_attention`` on the
    bfloat16 q / k / v that ``sp_attn_forward``'s ``half()`` made. The attention of those values in float32,
    returned in float32: on GPU flash-attn's bfloat16 output meets ``self.o`` under ``autocast``; on the CPU,
    without autocast, a bfloat16 tensor cannot meet the float32 layer."""
    return flash_attention_sdpa(q.float(), k.float(), v.float(), q_lens, k_lens, **kw)


@contextlib.contextmanager
def sp_attention(up: Upstream):
    """:func:`sp_flash_attention` as wan/distributed/ulysses.py's ``flash_attention``, inside the block only."""
    ulysses = upstream_parallel(up).ulysses
    saved = ulysses["flash_attention"]
    ulysses["flash_attention"] = sp_flash_attention
    try:
        yield
    finally:
        ulysses["flash_attention"] = saved


def configure_parallel(up: Upstream, sampler, use_sp: bool = False, dit_fsdp: bool = False):
    """What ``WanT2V`` / ``WanI2V`` / ``WanTI2V.__init__`` does to its models for ``--ulysses_size N`` (``use_sp``)
    and ``--dit_fsdp``, with torch.distributed initialised: upstream's own ``_configure_model`` on each model (low
    noise first, as ``__init__``), which binds ``sp_attn_forward`` on every block's ``self_attn`` and
    ``sp_dit_forward`` as the model's instance ``forward``, then wraps it with ``shard_model``; and
    ``init_on_cpu`` / ``sp_size`` as ``__init__`` sets them. ``shard_model`` gets the CPU as its device, float32
    as its ``param_dtype`` (its bfloat16 default needs autocast) and ``sync_module_states=False`` (FSDP syncs only
    GPU tensors; the ranks build their tiny models from the same seed). Returns the sampler."""
    import functools
    parallel = upstream_parallel(up)
    shard_fn = functools.partial(parallel.shard_model, device_id=torch.device("cpu"), param_dtype=torch.float32,
                                 sync_module_states=False)
    if use_sp or dit_fsdp:
        sampler.init_on_cpu = False
    names = ("model",) if isinstance(sampler, up.WanTI2V) else ("low_noise_model", "high_noise_model")
    for name in names:
        setattr(sampler, name, sampler._configure_model(model=getattr(sampler, name), use_sp=use_sp,
                                                         dit_fsdp=dit_fsdp, shard_fn=shard_fn,
                                                         convert_model_dtype=False))
    sampler.sp_size = torch.distributed.get_world_size() if use_sp else 1
    return sampler
