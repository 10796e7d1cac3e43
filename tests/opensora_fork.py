"""The VideoSys fork's Open-Sora code (the checkout ``OPENSORA_REPO`` points to: Zehong-Ma/MagCache or
ali-vilab/TeaCache; gated by helpers.opensora_checkout) on CPU with a tiny random ``STDiT3``, for tests only.

What stands in, and nothing else; none of it changes the computation:

* ``videosys/__init__.py`` is skipped (it imports every pipeline and torchvision): a bare package module
  ``videosys`` whose ``__path__`` is the checkout's ``videosys/`` lets the Open-Sora modules themselves import;
* colossalai (no CPU install beside this torch) is a module holding a placeholder ``ProcessGroupMesh``, used only
  as the never-instantiated base class of ``ParallelManager``; the model gets a manager with every size 1
  instead of ``enable_parallel()``, so no split/gather/all-to-all branch runs;
* timm (every release imports torchvision) is a module holding ``Mlp`` written to timm's definition
  (fc1 -> act -> drop1 -> norm (Identity) -> fc2 -> drop2, same parameter names) and ``DropPath`` (only built when
  drop_path > 0, never at inference).

The colossalai and timm stand-ins exist only while the fork's modules import; the names they bound stay in those
modules. The transformer, its blocks, attention, embeddings and the RFlow sampler are the checkout's files.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import types

import torch
from torch import nn

TRANSFORMER = "videosys.models.transformers.open_sora_transformer_3d"
SCHEDULER = "videosys.schedulers.scheduling_rflow_open_sora"
EVAL_SCRIPT = os.path.join("eval", "magcache", "experiments", "opensora.py")
TINY = dict(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16)
TEXT_LEN = 10


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # diffusers' find_spec() needs one
    module.__dict__.update(attrs)
    return module


class Mlp(nn.Module):
    """timm.layers.mlp.Mlp's computation and parameter names (timm 1.0.x)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, norm_layer=None,
                 bias=True, drop=0.0, use_conv=False):
        super().__init__()
        hidden = hidden_features or in_features
        out = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.norm = norm_layer(hidden) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden, out, bias=bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class _ProcessGroupMesh:  # the base class ParallelManager names; never instantiated here
    pass


@contextlib.contextmanager
def _import_stand_ins(extra: dict[str, types.ModuleType] | None = None):
    stand_ins = {
        "colossalai": _module("colossalai"),
        "colossalai.cluster": _module("colossalai.cluster"),
        "colossalai.cluster.process_group_mesh": _module("colossalai.cluster.process_group_mesh",
                                                         ProcessGroupMesh=_ProcessGroupMesh),
        "timm": _module("timm"),
        "timm.models": _module("timm.models"),
        "timm.models.layers": _module("timm.models.layers", DropPath=None),
        "timm.models.vision_transformer": _module("timm.models.vision_transformer", Mlp=Mlp),
        **(extra or {}),
    }
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        yield
    finally:
        for name, before in saved.items():
            if before is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = before


_LOADED: dict[str, types.ModuleType] = {}


def load(repo: str) -> tuple[types.ModuleType, types.ModuleType]:
    """(the fork's transformer module, its RFlow scheduler module)."""
    if "transformer" in _LOADED:
        return _LOADED["transformer"], _LOADED["scheduler"]
    import diffusers.models.attention  # noqa: F401  (their import-time probes run before any stand-in exists)
    import transformers  # noqa: F401

    package = sys.modules.get("videosys")
    if package is None or list(getattr(package, "__path__", [])) != [os.path.join(repo, "videosys")]:
        package = _module("videosys")
        package.__path__ = [os.path.join(repo, "videosys")]
        sys.modules["videosys"] = package
    with _import_stand_ins():
        transformer = importlib.import_module(TRANSFORMER)
        scheduler = importlib.import_module(SCHEDULER)
    _LOADED.update(transformer=transformer, scheduler=scheduler)
    return transformer, scheduler


def single_process_manager():
    return types.SimpleNamespace(cp_size=1, sp_size=1, dp_size=1)


def tiny_model(repo: str, seed: int = 0, dtype=torch.float32, std: float = 0.05) -> nn.Module:
    """A tiny fork STDiT3 with every parameter re-randomized (the constructor zeroes the temporal blocks'
    output projections, which would make them identities)."""
    transformer, _ = load(repo)
    torch.manual_seed(seed)
    model = transformer.STDiT3(transformer.STDiT3Config(**TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    manager = single_process_manager()
    for module in model.modules():
        if hasattr(module, "parallel_manager"):
            module.parallel_manager = manager
    return model.to(dtype)


def model_args(n: int = 1, seed: int = 1, dtype=torch.float32, height: int = 480, width: int = 854,
               num_frames: int = 51):
    """What the pipeline's prepare_multi_resolution_info + encode_prompt hand to RFLOW.sample. The pixel size and
    frame count only shape the timestep schedule (and the positional-embedding scale), so the published 480p,
    51 frames are given with a tiny latent: the schedule is the published one (last timestep 143.1, not an
    integer in float32)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, TINY["model_max_length"], dtype=torch.long)
    mask[:, TEXT_LEN:] = 0
    return {"y": torch.randn(n, 1, TINY["model_max_length"], TINY["caption_channels"], generator=g).to(dtype),
            "mask": mask, "height": torch.full((n,), float(height)), "width": torch.full((n,), float(width)),
            "num_frames": torch.full((n,), float(num_frames)), "fps": torch.full((n,), 24.0),
            "ar": torch.full((n,), height / width)}


def sample(repo: str, model, z, args, steps: int = 30, outputs: list | None = None):
    """The fork's own ``RFLOW(use_timestep_transform=True).sample`` (the published sampler settings)."""
    _, scheduler = load(repo)
    rflow = scheduler.RFLOW(use_timestep_transform=True, num_sampling_steps=steps, cfg_scale=7.0)
    y_null = model.y_embedder.y_embedding[None].repeat(z.shape[0], 1, 1)[:, None]
    handle = None
    if outputs is not None:
        handle = model.register_forward_hook(lambda m, a, o: outputs.append(o.clone()))
    try:
        with torch.no_grad():
            return rflow.sample(model, z=z.clone(), model_args=dict(args), y_null=y_null, device="cpu",
                                progress=False)
    finally:
        if handle is not None:
            handle.remove()


def published_forwards(repo: str) -> types.ModuleType:
    """The published ``eval/magcache/experiments/opensora.py`` (its ``teacache_forward`` and ``magcache_forward``),
    imported without its engine: ``videosys.OpenSoraConfig`` / ``VideoSysEngine`` and its ``utils`` helpers are
    placeholders during the import, since only the two forward functions are used."""
    if "published" in _LOADED:
        return _LOADED["published"]
    load(repo)
    package = sys.modules["videosys"]
    path = os.path.join(repo, EVAL_SCRIPT)
    spec = importlib.util.spec_from_file_location("published_opensora_eval", path)
    module = importlib.util.module_from_spec(spec)
    placeholders = {"utils": _module("utils", generate_func=None, read_prompt_list=None)}
    had = {k: getattr(package, k) for k in ("OpenSoraConfig", "VideoSysEngine") if hasattr(package, k)}
    package.OpenSoraConfig = package.VideoSysEngine = None
    try:
        with _import_stand_ins(placeholders):
            spec.loader.exec_module(module)
    finally:
        for k in ("OpenSoraConfig", "VideoSysEngine"):
            if k in had:
                setattr(package, k, had[k])
            else:
                delattr(package, k)
    _LOADED["published"] = module
    return module


def published_model(repo: str, model: nn.Module, method: str, **settings) -> nn.Module:
    """A copy of ``model`` whose class runs the published forward with the published class attributes (as
    ``eval_teacache_*`` / ``eval_ours`` set them), on a subclass so the fork's STDiT3 itself stays untouched."""
    import numpy as np

    module = published_forwards(repo)
    ref = copy.deepcopy(model)
    if method == "teacache":
        attrs = dict(forward=module.teacache_forward, enable_teacache=True, rel_l1_thresh=settings["thresh"],
                     accumulated_rel_l1_distance=0, previous_modulated_input=None, previous_residual=None)
    else:
        from stepcache.profiles import load_profile

        # MC-OS:433's 29 values: the shipped profile holds them behind its padding 1.0.
        ratios = np.array(load_profile("opensora-1.2").method("magcache")["ratios"][1:]) ** 0.5
        attrs = dict(forward=module.magcache_forward, enable_magcache=True, magcache_thresh=settings["thresh"],
                     K=settings["K"], skip_time=6, t=0, residual_cache=None, accumulated_err=0, accumulated_sim=1,
                     accumulated_steps=0, skip_steps=0, cache_time=4, ratio=ratios)
    ref.__class__ = type(f"Published{method}STDiT3", (type(model),), attrs)
    return ref
