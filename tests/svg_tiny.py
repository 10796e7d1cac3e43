"""Sparse VideoGen's copy of HunyuanVideo (SVG1's ``svg.models.hyvideo``) on the CPU, for tests/test_hunyuan_svg.py:
the opt-in gate on a checkout (SPARSE_VIDEOGEN_REPO), SVG's modules imported with stand-ins for the two
CUDA-only packages they import, and a tiny random-weight model driven through SVG's own sampler with the stub
text encoders and VAE of the HunyuanVideo tests.

The stand-ins exist only while SVG's modules are imported and are taken out of ``sys.modules`` right after:
``flash_attn`` (svg/models/hyvideo/modules/attenion.py:7 imports it outside its try block) and ``triton``
(placement.py:2-3, for ``@triton.jit`` and ``tl.constexpr`` annotations). Nothing in them is ever called: the
reference (stepcache.hunyuan.svg_reference) replaces the functions that would call them, and the flash stand-in's
function is None so that a call would fail loudly.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import torch

import hunyuan_tiny as T
from helpers import StubVAE, upstream_checkout

SPARSE_VIDEOGEN = dict(env_name="SPARSE_VIDEOGEN_REPO", marker_file="svg/models/hyvideo/config.py",
                       requirements=("einops", "loguru", "diffusers", "transformers", "imageio"),
                       what="a svg-project/Sparse-VideoGen checkout with SVG1's HunyuanVideo (commit 5efea72 or "
                            "earlier; checked against 5efea724f4b44579dae3f3e130648c3148131d90)")
EASYCACHE = dict(env_name="EASYCACHE_REPO", marker_file="EasyCache4HunyuanVideo/hyvideo_svg_easycache.py",
                 what="an H-EmbodVis/EasyCache checkout")
PACKAGE = "svg.models.hyvideo"

# A video whose SVG masks are not trivial: 3 latent frames of 16x16 tokens (256 per frame, two of SVG's 128-token
# blocks), and the stub encoder's 7 text tokens, 2 of them padding.
SIZE, FRAMES, STEPS = 256, 9, 8
SEQ = 3 * 256 + T.TEXT_LEN


def sparse_videogen_checkout() -> Path:
    return upstream_checkout(**SPARSE_VIDEOGEN)


def easycache_checkout() -> Path:
    return upstream_checkout(**EASYCACHE)


def _stand_ins() -> dict[str, types.ModuleType]:
    modules = {}
    if importlib.util.find_spec("flash_attn") is None:
        flash = types.ModuleType("flash_attn")
        interface = types.ModuleType("flash_attn.flash_attn_interface")
        interface.flash_attn_varlen_func = None
        interface._flash_attn_forward = None
        flash.flash_attn_interface = interface
        flash.__version__ = "0"
        modules.update({"flash_attn": flash, "flash_attn.flash_attn_interface": interface})
    if importlib.util.find_spec("triton") is None:
        triton = types.ModuleType("triton")
        language = types.ModuleType("triton.language")
        triton.jit = lambda fn: fn
        language.constexpr = type("constexpr", (), {})
        triton.language = language
        modules.update({"triton": triton, "triton.language": language})
    return modules


def import_svg(root: Path) -> types.SimpleNamespace:
    """SVG's modules from the checkout at ``root``, imported on the CPU."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # Imported before the stand-ins exist: they probe for flash_attn and triton themselves (diffusers, dynamo and
    # inductor at import; SVG's attenion.py compiles flex_attention at import, which imports inductor).
    import diffusers.models  # noqa: F401
    import torch._dynamo
    import torch._inductor.compile_fx  # noqa: F401
    limits = (torch._dynamo.config.cache_size_limit, torch._dynamo.config.accumulated_cache_size_limit)
    stand_ins = _stand_ins()
    sys.modules.update(stand_ins)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # custom_models: "Could not import RoPE / Norm kernels!" (falls back)
            modules = types.SimpleNamespace(
                models=importlib.import_module(f"{PACKAGE}.modules.models"),
                attenion=importlib.import_module(f"{PACKAGE}.modules.attenion"),
                custom_models=importlib.import_module(f"{PACKAGE}.modules.custom_models"),
                utils=importlib.import_module(f"{PACKAGE}.modules.utils"),
                placement=importlib.import_module(f"{PACKAGE}.modules.placement"))
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        # attenion.py raises dynamo's recompile limits for the whole process at import; the other tests run with
        # the defaults
        torch._dynamo.config.cache_size_limit, torch._dynamo.config.accumulated_cache_size_limit = limits
    modules.inference = importlib.import_module(f"{PACKAGE}.inference")
    modules.text_encoder = importlib.import_module(f"{PACKAGE}.text_encoder")
    return modules


@contextlib.contextmanager
def svg_on_cpu(root: Path):
    """SVG imported from ``root``, with stepcache's CPU reference of its kernels installed while the context is
    open."""
    added = str(root) not in sys.path
    svg = import_svg(root)
    from stepcache.hunyuan.svg_reference import reference_kernels
    try:
        with reference_kernels():
            yield svg
    finally:
        if added and str(root) in sys.path:
            sys.path.remove(str(root))


def build_model(svg, seed: int = 0):
    """A tiny SVG ``HYVideoDiffusionTransformer`` (the tiny upstream config), every parameter perturbed as
    hunyuan_tiny.build_upstream_model does (upstream zero-initialises its modulation and final layers)."""
    torch.manual_seed(seed)
    model = svg.models.HYVideoDiffusionTransformer(
        types.SimpleNamespace(text_states_dim=T.TEXT_DIM, text_states_dim_2=T.TEXT_DIM_2), dtype=torch.float32,
        device="cpu", **T.TINY_UPSTREAM).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


class StubTextEncoder(T.StubTextEncoder):
    """hunyuan_tiny's stub encoder, returning SVG's copy of the encoder output class."""

    def encode(self, tokens, data_type="video", device=None, **kwargs):
        output = importlib.import_module(f"{PACKAGE}.text_encoder").TextEncoderModelOutput
        g = torch.Generator().manual_seed(sum(map(len, tokens)))
        if self.seq is None:
            return output(hidden_state=torch.randn(len(tokens), self.dim, generator=g))
        mask = torch.ones(len(tokens), self.seq, dtype=torch.long)
        mask[:, 5:] = 0
        return output(hidden_state=torch.randn(len(tokens), self.seq, self.dim, generator=g), attention_mask=mask)


def build_sampler(args, model):
    """SVG's HunyuanVideoSampler around ``model``, with the stub encoders and VAE (its __init__ loads nothing)."""
    inference = importlib.import_module(f"{PACKAGE}.inference")
    return inference.HunyuanVideoSampler(
        args, vae=StubVAE(4), vae_kwargs={"s_ratio": 8, "t_ratio": 4},
        text_encoder=StubTextEncoder(T.TEXT_DIM, T.TEXT_LEN), text_encoder_2=StubTextEncoder(T.TEXT_DIM_2, None),
        model=model, use_cpu_offload=False, device="cpu",
        parallel_args={"ulysses_degree": args.ulysses_degree, "ring_degree": args.ring_degree})


def tiny_argv(*extra: str, pattern: str = "SVG", steps: int = STEPS) -> list[str]:
    """A tiny run's flags: hunyuan_tiny's, at SIZE and FRAMES, with SVG's flags. The sparsity keeps a band of one
    128-token block at this size (at the published 0.2 it would be empty here: the flags refuse it), the first
    layer of each stack and the first timesteps stay dense, as the published first_*_fp do on the real model."""
    svg_flags = ["--text-len", str(T.TEXT_LEN), "--pattern", pattern, "--output_path", "unused.mp4"]
    if pattern == "SVG":
        svg_flags += ["--num_sampled_rows", "64", "--sparsity", "0.5", "--first_layers_fp", "0.02",
                      "--first_times_fp", "0.03"]
    return T.tiny_argv(*svg_flags, *extra, steps=steps, size=SIZE, frames=FRAMES)


def check_documented_command(method: str, argv: list[str]) -> None:
    """For tests/test_readme.py: a documented ``hyvideo_svg_*.py`` command parses. Our cache flags always (nothing
    that looks like one is left for SVG's parser); with SPARSE_VIDEOGEN_REPO set, SVG's own parser, its sanity check
    and both plans, as the script runs them (a value that cannot run raises)."""
    import argparse
    import os

    from stepcache.hunyuan import official, sparse_videogen
    if not os.environ.get(SPARSE_VIDEOGEN["env_name"]):
        parser = official.add_cache_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False), method)
        _, rest = parser.parse_known_args(argv)
        cache_like = [w for w in rest if w.startswith(("--cache", "--magcache", "--teacache", "--easycache",
                                                       "--retention"))]
        assert not cache_like, f"cache flags the SVG drop-ins lack: {cache_like}"
        return
    import_svg(sparse_videogen_checkout())
    sparse_videogen.parse_args(method, argv, sparse_videogen.import_svg())
