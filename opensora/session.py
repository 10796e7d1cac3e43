"""A cache method on a VideoSys Open-Sora pipeline, and the DiT-only time of every video it makes.

:func:`attach` installs ``method`` (or nothing, for the uncached baseline) on the pipeline's ``STDiT3``
*instance* (``stepcache.enable``; never on its class, unlike the published scripts) and times every transformer
forward (CUDA-synchronised), so a video's DiT-only seconds exclude text encoding and VAE decoding.
:func:`build_engine` builds the fork's ``VideoSysEngine`` as the published ``experiments/opensora.py`` does, and
refuses more than one GPU before anything loads (see :data:`stepcache.opensora.adapter.MULTI_GPU_MESSAGE`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..timing import DiTTimer
from .adapter import MULTI_GPU_MESSAGE, MultiGPUNotSupported, STDiT3Adapter, check_single_process

# The published runs' model ids (MC-OS eval_base; TeaCache relies on the same OpenSoraConfig defaults).
DEFAULT_MODELS = {"transformer": "hpcai-tech/OpenSora-STDiT-v3", "vae": "hpcai-tech/OpenSora-VAE-v1.2",
                  "text_encoder": "DeepFloyd/t5-v1_1-xxl"}
FORK_HINT = ("the VideoSys fork is not importable: clone Zehong-Ma/MagCache (or ali-vilab/TeaCache) and run "
             "`pip install -e .` in it, as its README says; stepcache.opensora targets that fork's videosys/")


def refuse_multi_gpu(num_gpus: int) -> None:
    if int(num_gpus) != 1:
        raise MultiGPUNotSupported(f"--num-gpus {num_gpus}: {MULTI_GPU_MESSAGE}")


def build_engine(transformer: str = DEFAULT_MODELS["transformer"], vae: str = DEFAULT_MODELS["vae"],
                 text_encoder: str = DEFAULT_MODELS["text_encoder"], num_sampling_steps: int = 30,
                 cfg_scale: float = 7.0, num_gpus: int = 1, enable_flash_attn: bool = False):
    """The fork's ``VideoSysEngine(OpenSoraConfig(...))`` with one GPU (the published runs' setup)."""
    refuse_multi_gpu(num_gpus)
    try:
        from videosys import OpenSoraConfig, VideoSysEngine
    except ImportError as exc:
        raise ImportError(f"{FORK_HINT} ({exc})") from exc
    config = OpenSoraConfig(transformer=transformer, vae=vae, text_encoder=text_encoder, num_gpus=1,
                            num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                            enable_flash_attn=enable_flash_attn)
    return VideoSysEngine(config)


def pipeline_of(engine: Any):
    """The pipeline that runs in this process: a ``VideoSysEngine``'s driver worker, or a pipeline itself."""
    workers = getattr(engine, "workers", None)
    if workers:
        raise MultiGPUNotSupported(f"this VideoSysEngine has {len(workers)} worker process(es): {MULTI_GPU_MESSAGE}")
    return getattr(engine, "driver_worker", engine)


@dataclass
class VideoRecord:
    dit_seconds: float = 0.0
    dit_calls: int = 0
    computed_passes: int | None = None
    total_passes: int | None = None
    pattern: str | None = None


@dataclass
class Attachment:
    """What :func:`attach` installed on one pipeline; :meth:`remove` takes all of it off again."""

    pipeline: Any
    transformer: nn.Module
    cached: Any = None  # stepcache.api.CachedModel, None for the uncached baseline
    videos: list[VideoRecord] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _open: VideoRecord | None = None
    timer: Any = None  # stepcache.timing.DiTTimer on the transformer
    _timer_before: tuple[float, int] = (0.0, 0)
    _generations_before: set[int] = field(default_factory=set)

    def begin_video(self) -> VideoRecord:
        self._open = VideoRecord()
        self._timer_before = (self.timer.seconds, self.timer.calls)
        self._generations_before = set(self.cached.stats.generation_ids()) if self.cached is not None else set()
        return self._open

    def end_video(self) -> VideoRecord:
        record, self._open = self._open, None
        if record is None:
            raise RuntimeError("end_video() without begin_video()")
        record.dit_seconds = self.timer.seconds - self._timer_before[0]
        record.dit_calls = self.timer.calls - self._timer_before[1]
        if self.cached is not None:
            if self.cached.runner is not None:
                self.cached.runner.reset()  # close the generation (its NothingCachedWarning, if any, is raised now)
            stats = self.cached.stats
            new = [g for g in stats.generation_ids() if g not in self._generations_before]
            counts = [stats.counts(g) for g in new]
            record.computed_passes = sum(c for c, _ in counts)
            record.total_passes = sum(t for _, t in counts)
            record.pattern = " ".join(stats.pattern(g) for g in new)
        else:
            record.computed_passes = record.total_passes = record.dit_calls
            record.pattern = "C" * record.dit_calls
        self.videos.append(record)
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.cached is not None:
            import stepcache
            stepcache.disable(self.transformer)
            self.cached = None


def attach(pipeline: Any, method: str | None = None, profile=None, preset: str | None = None,
           params: dict[str, Any] | None = None) -> Attachment:
    """Install ``method`` (None: nothing, the baseline) on ``pipeline.transformer`` and time its forwards."""
    transformer = pipeline.transformer
    STDiT3Adapter.check(transformer)
    check_single_process(transformer)
    attachment = Attachment(pipeline, transformer)
    if method is not None:
        import stepcache
        attachment.cached = stepcache.enable(transformer, method, profile=profile, preset=preset, **(params or {}))
    attachment.timer = DiTTimer(transformer)
    attachment._handles.append(attachment.timer)
    return attachment
