"""A cache method on a VideoSys Open-Sora pipeline or engine, and the DiT-only time of every video it makes.

:func:`attach` installs ``method`` (or nothing, for the uncached baseline) on the pipeline's ``STDiT3``
*instance* (``stepcache.enable``; never on its class, unlike the published scripts) and times every transformer
forward (CUDA-synchronised), so a video's DiT-only seconds exclude text encoding and VAE decoding.
:func:`build_engine` builds the fork's ``VideoSysEngine`` as the published ``experiments/opensora.py`` does.

Several GPUs: VideoSys's engine spawns one worker process per extra GPU in its constructor and builds a pipeline
inside each one (``VideoSysEngine._init_worker``), so nothing done to the engine afterwards reaches those pipelines.
What does reach them is the config's ``pipeline_cls``, pickled into each worker: :func:`build_engine` makes it a
:class:`CachingWorkers`, which builds the fork's pipeline and gives it two entry points the engine can call on every
rank (``_run_workers``): ``stepcache_attach`` (the method, with the pipeline's sequence-parallel group, so that all
ranks take one decision per pass) and ``stepcache_detach``. :func:`attach_engine` calls them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from ..timing import DiTTimer
from .adapter import MULTI_GPU_MESSAGE, MultiGPUNotSupported, STDiT3Adapter, check_parallel_setup

# The published runs' model ids (MC-OS eval_base; TeaCache relies on the same OpenSoraConfig defaults).
DEFAULT_MODELS = {"transformer": "hpcai-tech/OpenSora-STDiT-v3", "vae": "hpcai-tech/OpenSora-VAE-v1.2",
                  "text_encoder": "DeepFloyd/t5-v1_1-xxl"}
FORK_HINT = ("the VideoSys fork is not importable: clone Zehong-Ma/MagCache (or ali-vilab/TeaCache) and run "
             "`pip install -e .` in it, as its README says; stepcache.opensora targets that fork's videosys/")
ATTACH, DETACH, ATTACHMENT = "stepcache_attach", "stepcache_detach", "stepcache_attachment"


class CachingWorkers:
    """A ``pipeline_cls`` for ``VideoSysEngine``: builds ``pipeline_cls(config)`` in whichever process the engine
    asks (the driver, or a worker it spawned) and gives the pipeline ``stepcache_attach(method, profile, preset,
    params)`` and ``stepcache_detach()``, which the engine can run on every rank. Picklable, since the engine
    pickles it into its workers (spawned, not forked)."""

    def __init__(self, pipeline_cls):
        self.pipeline_cls = pipeline_cls

    def __call__(self, config):
        pipeline = self.pipeline_cls(config)
        pipeline.stepcache_attach = functools.partial(_attach_here, pipeline)
        pipeline.stepcache_detach = functools.partial(_detach_here, pipeline)
        return pipeline


def _attach_here(pipeline, method: str | None, profile=None, preset: str | None = None,
                 params: dict[str, Any] | None = None) -> None:
    _detach_here(pipeline)
    setattr(pipeline, ATTACHMENT, attach(pipeline, method, profile, preset, params))
    return None  # a worker's answer is pickled back to the driver: never the attachment (it holds the model)


def _detach_here(pipeline) -> None:
    attachment = getattr(pipeline, ATTACHMENT, None)
    if attachment is not None:
        attachment.remove()
        setattr(pipeline, ATTACHMENT, None)


def sequence_group(transformer: nn.Module):
    """The ranks VideoSys splits this transformer's frames over (``parallel_manager.sp_group``), or None."""
    from ..distributed import SequenceGroup
    manager = getattr(transformer, "parallel_manager", None)
    sp = int(getattr(manager, "sp_size", 1) or 1) if manager is not None else 1
    if sp <= 1:
        return None
    return SequenceGroup(manager.sp_group, f"VideoSys sequence parallel ({sp} ranks)")


def build_engine(transformer: str = DEFAULT_MODELS["transformer"], vae: str = DEFAULT_MODELS["vae"],
                 text_encoder: str = DEFAULT_MODELS["text_encoder"], num_sampling_steps: int = 30,
                 cfg_scale: float = 7.0, num_gpus: int = 1, enable_flash_attn: bool = False):
    """The fork's ``VideoSysEngine(OpenSoraConfig(...))`` (the published runs' setup); with ``num_gpus > 1`` its
    pipelines are built by :class:`CachingWorkers`, before the engine spawns its workers."""
    try:
        from videosys import OpenSoraConfig, VideoSysEngine
    except ImportError as exc:
        raise ImportError(f"{FORK_HINT} ({exc})") from exc
    config = OpenSoraConfig(transformer=transformer, vae=vae, text_encoder=text_encoder, num_gpus=num_gpus,
                            num_sampling_steps=num_sampling_steps, cfg_scale=cfg_scale,
                            enable_flash_attn=enable_flash_attn)
    if num_gpus > 1:
        config.pipeline_cls = CachingWorkers(config.pipeline_cls)
    return VideoSysEngine(config)


def pipeline_of(engine: Any):
    """The pipeline that runs in this process: a ``VideoSysEngine``'s driver worker, or a pipeline itself. An engine
    with workers must have been built with :class:`CachingWorkers` (:func:`build_engine`)."""
    workers = getattr(engine, "workers", None)
    pipeline = getattr(engine, "driver_worker", engine)
    if workers and not callable(getattr(pipeline, ATTACH, None)):
        raise MultiGPUNotSupported(f"this VideoSysEngine has {len(workers)} worker process(es) built without "
                                   f"stepcache: {MULTI_GPU_MESSAGE}")
    return pipeline


def attach_engine(engine: Any, method: str | None = None, profile=None, preset: str | None = None,
                  params: dict[str, Any] | None = None) -> "Attachment":
    """:func:`attach` on every rank of ``engine`` (a ``VideoSysEngine`` or a pipeline); the driver's attachment,
    whose :meth:`Attachment.remove` detaches every rank again."""
    pipeline = pipeline_of(engine)
    if not getattr(engine, "workers", None):
        return attach(pipeline, method, profile, preset, params)
    engine._run_workers(ATTACH, method, profile, preset, params)  # the driver's call runs here, in-process
    attachment = getattr(pipeline, ATTACHMENT)
    attachment.after_remove.append(lambda: engine._run_workers(DETACH))
    return attachment


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
    after_remove: list[Callable[[], Any]] = field(default_factory=list)  # the other ranks' detaching

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
        actions, self.after_remove = self.after_remove, []
        for action in actions:
            action()


def attach(pipeline: Any, method: str | None = None, profile=None, preset: str | None = None,
           params: dict[str, Any] | None = None) -> Attachment:
    """Install ``method`` (None: nothing, the baseline) on ``pipeline.transformer`` and time its forwards. Under
    sequence parallelism (this process is one rank of a VideoSys engine) the cache gets the sequence-parallel
    group: call it on every rank alike (:func:`attach_engine`)."""
    transformer = pipeline.transformer
    STDiT3Adapter.check(transformer)
    group = sequence_group(transformer)
    if method is not None:
        check_parallel_setup(transformer, group)
    attachment = Attachment(pipeline, transformer)
    if method is not None:
        import stepcache
        attachment.cached = stepcache.enable(transformer, method, profile=profile, preset=preset, parallel=group,
                                             **(params or {}))
    attachment.timer = DiTTimer(transformer)
    attachment._handles.append(attachment.timer)
    return attachment
