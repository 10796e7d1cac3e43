"""The VideoSys fork's own ``VideoSysEngine`` (``videosys/core/engine.py`` of the checkout ``OPENSORA_REPO`` points to)
on CPU, building the tiny ``OpenSoraPipeline`` of opensora_fork_pipeline.py, for tests only. A script sees it as the
package ``videosys`` (opensora_sitecustomize/ installs it when ``videosys`` is first imported).

:func:`install` returns that package module, holding (besides the fork's modules opensora_fork.load imports):

* ``VideoSysEngine``: the fork's class, unchanged. Its module's ``torch`` is a namespace whose only member,
  ``cuda.device_count()``, answers :data:`DEVICES`: the engine reads it once, in ``assert world_size <=
  torch.cuda.device_count()``, and nothing else of torch;
* ``OpenSoraConfig``: the fork's class with one change, ``pipeline_cls`` = :func:`tiny_pipeline` (the fork's
  ``OpenSoraPipeline`` around a tiny random STDiT3, fake T5 and :class:`CoarseVAE`, built from the config the
  engine passes: its steps and cfg scale) instead of ``OpenSoraPipeline``, which would load the published
  checkpoints;
* ``initialize``: the fork's ``videosys.initialize`` with gloo for nccl and without ``torch.cuda.set_device``;
* ``videosys.core.comm._gather_sequence_func``: :func:`cpu_gather_sequence`, the same contract (all-gather the
  ranks' slices along ``dim``, concatenate, drop the padding at the end) without the fork's ``assert
  input_.device.type == "cuda"``; the split, the all-to-alls and everything else of comm.py are the fork's;
* ``set_seed`` of the pipeline module: the fork's, with the seed tensor it broadcasts from rank 0 kept on the CPU
  (the fork moves it to CUDA first; only with several processes).

Every pipeline the engine builds is recorded (:data:`BUILT`: the config values, which function called
``pipeline_cls``, the process's rank), per transformer call which blocks ran ("C") or none (".", a
helpers.BlockWork on the tiny STDiT3) and the model output's float64 sum, and per cache installed the signal the
method measured at each pass (stepcache's stats), written as JSON to ``STEPCACHE_TEST_OPENSORA_TRACE.<pid>``
after every call when that variable is set.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import opensora_fork  # noqa: E402
import opensora_fork_pipeline  # noqa: E402
from helpers import StubVAE  # noqa: E402

DEVICES = 2
BUILT: list[dict] = []
CONFIG_FIELDS = ("transformer", "vae", "text_encoder", "num_gpus", "num_sampling_steps", "cfg_scale",
                 "enable_flash_attn")
_INSTALLED: dict[str, types.ModuleType] = {}


def _repo() -> str:
    return os.environ["OPENSORA_REPO"]


class CoarseVAE(StubVAE):
    """StubVAE with a far smaller latent (3 frames, about 1/128 of the height and width, even sizes), so that the
    published 480p, 9:16, 51 frames take 54 tokens on CPU; the frame count is odd, so two ranks split it with the
    fork's padding. The pipeline still passes the published pixel size and frame count to the model, and those
    alone shape the timestep schedule; the video has the requested frames."""

    def get_latent_size(self, input_size):
        frames, height, width = input_size
        return [3 if frames > 1 else 1, max(2, height // 128 * 2), max(2, width // 128 * 2)]

    def forward(self, z, decode_only=True, num_frames=None):
        video = torch.tanh(z.float()[:, :3])
        return F.interpolate(video, size=(num_frames, video.shape[3] * 8, video.shape[4] * 8), mode="nearest")


def _engine_caller() -> str | None:
    """The VideoSysEngine method up the stack that asked for the pipeline (stepcache's CachingWorkers sits between
    under several GPUs), else the direct caller's name."""
    frame = sys._getframe(2)
    direct = frame.f_code.co_qualname
    while frame is not None:
        if frame.f_code.co_qualname.startswith("VideoSysEngine."):
            return frame.f_code.co_qualname
        frame = frame.f_back
    return direct


def tiny_pipeline(config):
    """``pipeline_cls(config)`` as the engine calls it (module level, so that a spawned worker can unpickle it)."""
    from helpers import BlockWork
    entry = {"caller": _engine_caller(), **{k: getattr(config, k, None) for k in CONFIG_FIELDS}}
    pipeline = opensora_fork_pipeline.build_pipeline(_repo(), config=config, vae=CoarseVAE(4))
    entry.update(rank=dist.get_rank(), world=dist.get_world_size(), passes="", sums=[], signals=[])
    work = BlockWork(pipeline.transformer, ("spatial_blocks", "temporal_blocks"))
    runs = []  # the RunStats of each cache installed on this transformer (they outlive the cache)

    def record(module, args, output):
        entry["passes"] = work.ran()
        entry["sums"].append(float(output.double().sum()))
        cached = getattr(module, "_stepcache", None)
        if cached is not None and not any(r is cached.stats for r in runs):
            runs.append(cached.stats)
        entry["signals"] = [[p.signal for p in r.of()] for r in runs]
        _write_trace()  # at every call: a worker process ends without running atexit handlers

    pipeline.transformer.register_forward_hook(record)
    BUILT.append(entry)
    return pipeline


def cpu_gather_sequence(input_, pg, dim: int, pad: int):
    input_ = input_.contiguous()
    size = dist.get_world_size(pg)
    if size == 1:
        return input_
    parts = [torch.empty_like(input_) for _ in range(size)]
    dist.all_gather(parts, input_, group=pg)
    output = torch.cat(parts, dim=dim)
    return output.narrow(dim, 0, output.size(dim) - pad) if pad > 0 else output


def cpu_set_seed(original):
    def set_seed(seed, dp_rank=None):
        if dp_rank is None:
            return original(seed)
        seed = torch.tensor(seed, dtype=torch.int64)
        if dist.get_world_size() > 1:
            dist.broadcast(seed, 0)
        return original(int(seed + dp_rank))
    return set_seed


def initialize(rank=0, world_size=1, init_method=None):
    """The fork's ``videosys.core.parallel_mgr.initialize`` on CPU: the same group, over gloo."""
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo", init_method=init_method, world_size=world_size, rank=rank)


def install(repo: str | None = None) -> types.ModuleType:
    if "videosys" in _INSTALLED:
        return _INSTALLED["videosys"]
    repo = repo or _repo()
    opensora_fork.load(repo)
    fork_pipeline = opensora_fork_pipeline.pipeline_module(repo)
    import importlib
    engine_module = importlib.import_module("videosys.core.engine")
    engine_module.torch = types.SimpleNamespace(cuda=types.SimpleNamespace(device_count=lambda: DEVICES))

    class OpenSoraConfig(fork_pipeline.OpenSoraConfig):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pipeline_cls = tiny_pipeline

    OpenSoraConfig.__module__, OpenSoraConfig.__qualname__ = __name__, "OpenSoraConfig"  # pickled by reference
    globals()["OpenSoraConfig"] = OpenSoraConfig
    fork_pipeline.set_seed = cpu_set_seed(fork_pipeline.set_seed)
    importlib.import_module("videosys.core.comm")._gather_sequence_func = cpu_gather_sequence
    package = sys.modules["videosys"]
    package.OpenSoraConfig = OpenSoraConfig
    package.OpenSoraPipeline = fork_pipeline.OpenSoraPipeline
    package.VideoSysEngine = engine_module.VideoSysEngine
    package.initialize = initialize
    _INSTALLED["videosys"] = package
    return package


def __getattr__(name):
    # A spawned worker unpickles the engine's config (an OpenSoraConfig of this module) before anything has
    # imported videosys in it: installing on that first lookup makes the class exist there too.
    if name == "OpenSoraConfig":
        install()
        return globals()[name]
    raise AttributeError(name)


@atexit.register
def _write_trace():
    path = os.environ.get("STEPCACHE_TEST_OPENSORA_TRACE")
    if path and BUILT:
        target = f"{path}.{os.getpid()}"
        with open(f"{target}.tmp", "w") as handle:
            json.dump({"pid": os.getpid(), "pipelines": BUILT}, handle)
        os.replace(f"{target}.tmp", target)
