"""The front door: enable a method on a loaded pipeline or transformer, read its stats, disable it.

    import stepcache
    stepcache.enable(pipe, METHOD)                     # profile detected from the model's config
    stepcache.enable(pipe, METHOD, profile=NAME_OR_FILE, thresh=...)   # or a profile and single values
    video = pipe(...).frames[0]
    print(stepcache.stats(pipe).summary())
    stepcache.disable(pipe)                            # the original forward, exactly

``METHOD`` is one of ``stepcache.methods.names()``; docs/diffusers.md has real commands. The cache state belongs
to the model instance it is enabled on (``model._stepcache``), never to its class.

Under sequence parallelism (``torchrun``, diffusers' ``enable_parallelism`` with a ``ContextParallelConfig``)
enable it on every rank, before or after ``enable_parallelism``: each rank caches its own shard, and decisions
that depend on a shard are reduced over the context-parallel group, found on the model at each pass
(``parallel="auto"``), and every pass ends with one agreement over it. See :mod:`stepcache.distributed`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable

import torch
from torch import nn

from . import families, methods
from .compiling import around_graph, compiled_inner, outside_graph, whole_model_compiler
from .distributed import MEASUREMENTS, as_group, resolve_parallel
from .methods import EXPERTS, VIDEO_MARK, MethodConfig, resolve_method
from .patching import InstalledPatch, install_forward
from .policies import ParameterError
from .profiles import (Profile, ProfileError, ProfileFitWarning, check_profile_family, check_profile_fit,
                       choose_by_resolution, known_profiles, load_profile, warn_resolution)
from .runner import CacheRunner, RunStats
from .storage import CacheStorage

# Which adapter serves which model class, and which pipelines' denoising loops we know (one call per CFG branch,
# wrapped in cache_context(name)), come from the families (stepcache.families); adapters are imported only for
# the model that needs them.


class UnsupportedModelError(TypeError):
    pass


def adapter_for(model: nn.Module, pipeline: Any = None):
    """The adapter for ``model``: one a family claims for this ``pipeline`` (a pipeline class two families
    share, e.g. Wan2.1's and Wan2.2's), else the one registered for the model's class."""
    if pipeline is not None:
        claimed = families.claim(type(pipeline).__name__, getattr(pipeline, "config", None),
                                 getattr(model, "config", None))
        if claimed is not None:
            return families.load_object(claimed[0].claimed_adapter)(pipeline)
    name = type(model).__name__
    known = families.adapters()
    if name not in known:
        raise UnsupportedModelError(
            f"stepcache has no adapter for {name}; supported transformers: {', '.join(known)}")
    return families.load_object(known[name])()


class StepClock:
    """Where the denoising loop is, for each pass: (branch name, step index, number of steps).

    The branch is the name the pipeline gives with ``cache_context``; the step and step count come from that
    context when the pipeline passes them, else from the pipeline's scheduler, else from a per-branch pass
    counter over ``num_steps`` given by the caller (a bare transformer driven by the caller's own loop).

    With the counter, a new generation is recognised without the caller's help when a branch's timestep goes
    back up (denoising runs it down), so a generation aborted part-way is never continued by the next one.
    Reading the timestep costs one host synchronisation per pass, in counter mode only, and only until the caller
    marks a generation itself with :meth:`CachedModel.start_generation` (the official-repo drivers mark every
    one): from then on the caller says where generations start, and no timestep is read. A loop whose timesteps do
    not fall (or that runs one generation's steps at two different step counts) marks each generation that way.
    """

    def __init__(self, pipeline: Any = None, num_steps: int | None = None):
        self.pipeline = pipeline
        self.num_steps = num_steps
        self.context: dict[str, Any] | None = None
        self.counters: dict[str, int] = {}
        self.last_timestep: dict[str, float] = {}
        self.given_guidance: float | None = None
        self.marked_by_caller = False  # the caller marks every generation: no timestep need be read

    def install(self, patch: InstalledPatch, model: nn.Module) -> None:
        original = getattr(model, "cache_context", None)
        if original is None:
            return

        @contextlib.contextmanager
        def cache_context(name: str, **kwargs):
            outer, self.context = self.context, {"name": name, **kwargs}
            try:
                with original(name, **kwargs):
                    yield
            finally:
                self.context = outer

        patch.set(model, "cache_context", cache_context)

    def start_generation(self, num_steps: int | None = None, guidance: float | None = None,
                         by_caller: bool = False) -> None:
        """A new generation: marked ``by_caller`` (entry points that wrap every generation, the official-repo
        scripts), or by stepcache itself when one ended or failed."""
        self.marked_by_caller = self.marked_by_caller or by_caller
        self.counters.clear()
        self.last_timestep.clear()
        if num_steps is not None:
            self.num_steps = int(num_steps)
        if guidance is not None:
            self.given_guidance = float(guidance)

    def guidance(self) -> float | None:
        """The guidance scale of the running generation: what a diffusers pipeline keeps while it runs
        (``_guidance_scale``, or its guider's scale), else what the entry point gave :meth:`start_generation`, else
        None (unknown)."""
        value = getattr(self.pipeline, "_guidance_scale", None)
        if value is None:
            value = getattr(getattr(self.pipeline, "guider", None), "guidance_scale", None)
        if isinstance(value, (int, float)):
            return float(value)
        return self.given_guidance

    def now(self, branch_hint: str | None = None,
            timestep: Callable[[], torch.Tensor | None] = lambda: None) -> tuple[str, int, int]:
        context = self.context or {}
        branch = context.get("name") or branch_hint or "default"
        scheduler = getattr(self.pipeline, "scheduler", None)
        num_steps = context.get("num_inference_steps")
        if num_steps is None and scheduler is not None and getattr(scheduler, "timesteps", None) is not None:
            num_steps = len(scheduler.timesteps)
        num_steps = num_steps or self.num_steps
        if num_steps is None:
            raise ParameterError("stepcache cannot tell the number of denoising steps: enable it on the pipeline, "
                                 "or pass num_steps= when enabling it on a bare transformer")
        step = context.get("step_index")
        if step is None and scheduler is not None and hasattr(scheduler, "step_index"):
            step = scheduler.step_index
            if step is None:
                step = getattr(scheduler, "begin_index", None) or 0
        if step is None:
            step = self._counted_step(branch, num_steps, timestep)
        return branch, int(step), int(num_steps)

    def _counted_step(self, branch: str, num_steps: int, timestep: Callable[[], torch.Tensor | None]) -> int:
        timestep = None if self.marked_by_caller else timestep()
        if timestep is not None:
            value = float(timestep.detach().float().max())  # per-token timesteps: the noisiest token's
            previous = self.last_timestep.get(branch)
            if previous is not None and value > previous:
                self.start_generation()  # denoising went back up: a new generation began
            self.last_timestep[branch] = value
        return self.counters.get(branch, 0) % num_steps

    def tick(self, branch: str) -> None:
        self.counters[branch] = self.counters.get(branch, 0) + 1


class CachedModel:
    """One model instance with a cache method installed."""

    def __init__(self, model: nn.Module, adapter, method: str, profile: Profile | list[Profile] | None,
                 preset: str | None, params: dict[str, Any], clock: StepClock, parallel: Any = "auto", runner=None,
                 cfg_parallel: Any = None, per_video: bool = False, expert: str | None = None,
                 switch_step: Callable[[], int | None] | None = None, owner: CachedModel | None = None,
                 whole_compiler: Callable[[Callable], Callable] | None = None,
                 storage: CacheStorage = CacheStorage()):
        """``expert``: which expert of a two-expert model this is (``stepcache.methods.EXPERTS``), and
        ``switch_step()`` where the run hands over to the second one (asked once per generation). A second
        expert is installed with ``owner``, the first one's CachedModel, whose runner, clock and stats it
        shares: one runner sees both experts' passes, keyed by expert when experts="separate"."""
        self.model = model
        self.adapter = adapter
        self.method = method
        self.preset = preset
        self.params = params
        self.clock = clock
        self.per_video = per_video
        self.expert = expert
        self.switch_step = switch_step
        self.storage = storage
        self.owner = owner or self
        self.partners: list[CachedModel] = []  # the other experts installed with this one as their owner
        # The group sharded measurements are reduced over, asked at each pass (parallelism may come later).
        self.group_of = resolve_parallel(parallel, model)
        self.cfg_group = as_group(cfg_parallel)  # ranks that run different CFG branches of one step, if any
        # Which measurements are shards under sequence parallelism; an adapter that says nothing gets every
        # measurement reduced (correct either way; a rank-invariant one then costs a needless all-reduce).
        self.sharded = frozenset(getattr(adapter, "sequence_sharded", MEASUREMENTS))
        self.candidates = profile if isinstance(profile, list) else None
        self._picked_for: tuple[int, int] | None = None
        self.runner: CacheRunner | None = None
        self.config: MethodConfig | None = None
        # Stats outlive runner rebuilds, so that stats() reports every generation since enable().
        self.stats = RunStats(method)
        if owner is not None:
            self.stats = owner.stats
        elif runner is not None:  # a measuring runner (calibration) instead of a cache method
            self.runner = runner
            self.stats = runner.stats
        elif self.candidates is None:
            self._build(profile)
        else:  # validate the parameters now against the first candidate; pick by resolution at the first pass
            resolve_method(method, self.candidates[0], preset, **params)
        self.patch = InstalledPatch()
        clock.install(self.patch, model)
        self._install_end_of_call(model)
        try:
            install_forward(self.patch, model, self._forward)
            runner_now = self.owner.runner
            wants_signal = runner_now.wants_signal if runner_now is not None else methods.get(method).wants_signal
            adapter.install(self.patch, model, lambda: self.owner.runner, wants_signal, self._signal_name)
        except BaseException:
            self.patch.restore()  # a half-installed cache must not stay on the model
            raise
        # A model compiled whole (before enable, or by model.compile() after it) is compiled block by block the
        # same way, its own code between the blocks eager: the cache's decisions are graph breaks inside the block
        # loop, where dynamo would give up on the whole forward (stepcache.compiling).
        self.eager_model = False
        whole_compiler = whole_compiler or whole_model_compiler(model)
        if whole_compiler is not None:
            self._compile_by_blocks(whole_compiler)
        self.patch.set(model, "compile", self._compile_after_enable)
        if owner is not None:
            owner.partners.append(self)

    def _compile_by_blocks(self, compiler: Callable[[Callable], Callable]) -> None:
        if self.patch.compile_blocks is None:
            return
        self.patch.compile_blocks(compiler)
        blocks = {id(b) for b in self.adapter.blocks(self.model)}
        for child in self.model.children():   # the embeddings and the output head, compiled the same way
            if id(child) in blocks or isinstance(child, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                continue
            if child.__dict__.get("_compiled_call_impl") is None:
                self.patch.set(child, "_compiled_call_impl", compiler(child._call_impl))
        if self.model.__dict__.get("_compiled_call_impl") is not None:
            self.patch.set(self.model, "_compiled_call_impl", None)
        self.eager_model = True

    def _compile_after_enable(self, *args, **kwargs) -> None:
        """``model.compile(...)`` with the cache installed: its blocks are compiled with these options; the model
        is compiled as asked once the cache is removed."""
        self._compile_by_blocks(lambda fn: torch.compile(fn, *args, **kwargs))
        self.patch.after_restore(lambda: nn.Module.compile(self.model, *args, **kwargs))

    def _install_end_of_call(self, model: nn.Module) -> None:
        """diffusers pipelines call the denoiser's ``_reset_stateful_cache`` when a call ends (in
        ``maybe_free_model_hooks``): end the generation there too, so nothing stays cached through VAE decoding."""
        original = getattr(model, "_reset_stateful_cache", None)
        if original is None:
            return

        def _reset_stateful_cache(*args, **kwargs):
            self.end_generation()
            return original(*args, **kwargs)

        self.patch.set(model, "_reset_stateful_cache", _reset_stateful_cache)

    def _signal_name(self) -> str | None:
        owner = self.owner
        return owner.config.signal_name if owner.config else getattr(owner.runner, "signal_name", None)

    def _build(self, profile: Profile) -> None:
        self.config = resolve_method(self.method, profile, self.preset, **self.params)
        self.runner = CacheRunner(self.config, group=self.group_of, sharded=self.sharded, cfg_group=self.cfg_group,
                                  storage=self.storage)
        self.runner.stats = self.stats
        self.runner.guidance_of = self.clock.guidance

    # The forward runs model code (``original``) between stepcache's own steps; those steps are ``outside_graph``
    # and the frames around ``original`` are ``around_graph``, so a compiled model stays compiled and no decision is
    # ever traced (stepcache.compiling).
    @around_graph
    def _forward(self, original, args, kwargs):
        latent, videos = self._batch_of(args, kwargs)
        if not self.per_video or videos == 1:
            return self._forward_batch(original, args, kwargs, latent, None, videos)
        # One decision per video: each runs as its own pass with its own state (branch "NAME#i").
        outputs = [self._forward_batch(original, a, k, self._batch_of(a, k)[0], i, 1)
                   for i, (a, k) in enumerate(self._split(args, kwargs, videos))]
        return self._joined(outputs, args, kwargs)

    @outside_graph
    def _batch_of(self, args, kwargs) -> tuple[torch.Tensor, int]:
        latent = self.adapter.latent_of(self.model, args, kwargs)
        return latent, getattr(self.adapter, "videos_in_batch", lambda x: x.shape[0])(latent)

    @outside_graph
    def _split(self, args, kwargs, videos: int) -> list:
        return list(self.adapter.split_batch(args, kwargs, videos))

    @outside_graph
    def _joined(self, outputs: list, args, kwargs):
        latent = torch.cat([self.adapter.output_latent(o) for o in outputs])
        return self.adapter.build_output(self.model, latent, args, kwargs)

    @around_graph
    def _forward_batch(self, original, args, kwargs, latent: torch.Tensor, video: int | None, videos: int):
        try:
            branch, ctx = self._begin_pass(args, kwargs, latent, video, videos)
            if ctx.reused_output is not None:
                output = self._reused(ctx, args, kwargs)
            else:
                output = self._eager(original, args, kwargs) if self.eager_model else original(*args, **kwargs)
                self._computed(output)
        except BaseException:
            self._abort()
            raise
        self._tick(branch, video)
        return output

    @outside_graph
    def _begin_pass(self, args, kwargs, latent: torch.Tensor, video: int | None, videos: int):
        owner = self.owner
        if owner.candidates is not None:
            size = self.adapter.pixel_size(self.model, args, kwargs)
            if size != owner._picked_for:  # first pass, or a generation at another size: its own table
                profile, warning = choose_by_resolution(owner.candidates, *size, self.method)
                warn_resolution(warning, stacklevel=6)
                owner._picked_for = size
                if owner.config is None or profile.name != owner.config.profile.name:
                    owner._build(profile)
        check_parallel = getattr(self.adapter, "check_parallel", None)
        if check_parallel is not None:
            check_parallel(self.model)
        branch_of = getattr(self.adapter, "branch_of", None)
        branch, step, num_steps = self.clock.now(branch_of(self.model, args, kwargs) if branch_of else None,
                                                 lambda: self.adapter.timestep_of(self.model, args, kwargs))
        runner = owner.runner
        ctx = runner.begin_pass(branch if video is None else f"{branch}{VIDEO_MARK}{video}", step, num_steps,
                                latent, self.expert, self.switch_step)
        if videos > 1:
            runner.note(f"a batch of {videos} videos takes one decision per pass for all of them, as the "
                        f"published code does; per_video=True decides for each video")
        return branch, ctx

    @staticmethod
    @outside_graph
    def _eager(original, args, kwargs):
        """The model's own code, not traced (its blocks run their own compiled code)."""
        return original(*args, **kwargs)

    @outside_graph
    def _reused(self, ctx, args, kwargs):
        output = self.adapter.build_output(self.model, ctx.reused_output, args, kwargs)
        self.owner.runner.end_pass(None)
        return output

    @outside_graph
    def _computed(self, output) -> None:
        self.owner.runner.end_pass(self.adapter.output_latent(output))

    @outside_graph
    def _abort(self) -> None:
        """The generation cannot go on: release its tensors now, and let the next call start afresh."""
        runner = self.owner.runner
        if runner is not None:
            runner.abort_pass()
        self.clock.start_generation()
        forget = getattr(self.adapter, "start_generation", None)   # where an adapter tracks the generation itself
        if forget is not None:
            forget()

    @outside_graph
    def _tick(self, branch: str, video: int | None) -> None:
        if video is None or video == 0:
            self.clock.tick(branch)

    def end_generation(self) -> None:
        """The pipeline call ended (diffusers' ``_reset_stateful_cache``), however it went: release the tensors."""
        if self.owner.runner is not None:
            self.owner.runner.reset()
        self.clock.start_generation()

    def start_generation(self, num_steps: int | None = None, guidance: float | None = None) -> None:
        """Mark the start of a generation explicitly (entry points that wrap upstream's sampling call); the
        guidance scale, when given, is checked against a tuned profile's."""
        if self.owner.runner is not None:
            self.owner.runner.reset()
        self.clock.start_generation(num_steps, guidance, by_caller=True)

    def remove(self) -> None:
        """Take the cache off this model and every expert installed with it."""
        if self.owner.runner is not None:
            self.owner.runner.reset()
        for partner in self.partners:
            partner.remove()
        self.partners.clear()
        self.patch.restore()
        if self.model.__dict__.get("_stepcache") is self:
            del self.model._stepcache


def _resolve_target(target: Any) -> tuple[nn.Module, Any]:
    """(transformer, pipeline or None) for a pipeline or a bare transformer; a transformer compiled with
    ``torch.compile(model)`` is the module inside the compiled wrapper."""
    if isinstance(target, nn.Module):
        return compiled_inner(target), None
    transformer = compiled_inner(getattr(target, "transformer", None))
    known = families.pipelines()
    supported = ", ".join(sorted(known))
    if transformer is None or not isinstance(transformer, nn.Module):
        raise UnsupportedModelError(
            f"{type(target).__name__} is neither a transformer nor a pipeline with a .transformer; supported "
            f"pipelines: {supported}")
    if type(target).__name__ not in known:
        raise UnsupportedModelError(
            f"unsupported pipeline class {type(target).__name__}; supported: {supported} "
            f"(or enable the method on the bare transformer with num_steps=)")
    return transformer, target


def _experts_of(pipeline: Any) -> list[nn.Module] | None:
    """The two experts of a two-expert pipeline in run order (diffusers' Wan2.2 A14B: ``transformer`` while the
    timestep is at or above ``boundary_ratio * num_train_timesteps``, then ``transformer_2``), or None. Without a
    ``boundary_ratio`` the pipeline never calls ``transformer_2``."""
    second = compiled_inner(getattr(pipeline, "transformer_2", None))
    config = getattr(pipeline, "config", None) or {}
    if second is None or config.get("boundary_ratio") is None:
        return None
    if not isinstance(second, nn.Module):
        raise UnsupportedModelError(f"{type(pipeline).__name__}.transformer_2 is a {type(second).__name__}, not a "
                                    f"transformer")
    return [compiled_inner(pipeline.transformer), second]


def targets_of(model: nn.Module, pipeline: Any) -> tuple[list[nn.Module], Callable[[], int] | None]:
    """(the models to install on, the switch step of a two-expert pipeline or None): both experts of a two-expert
    pipeline with where it hands over, else the one model."""
    experts = _experts_of(pipeline)
    return (experts, _pipeline_switch_step(pipeline)) if experts else ([model], None)


def _pipeline_switch_step(pipeline: Any) -> Callable[[], int]:
    """Where a two-expert pipeline hands over, read off its scheduler as its loop decides it: the number of
    timesteps at or above the boundary (one host read per generation)."""
    def switch_step() -> int:
        scheduler = pipeline.scheduler
        boundary = pipeline.config["boundary_ratio"] * scheduler.config.num_train_timesteps
        return int((scheduler.timesteps >= boundary).sum())
    return switch_step


def _profile_for(adapter, model: nn.Module, profile: str | Profile | None) -> Profile | list[Profile]:
    if profile is not None:
        loaded = load_profile(profile)
        check_profile_family(loaded, adapter.family)
        for note in check_profile_fit(loaded, model):
            warnings.warn(note, ProfileFitWarning, stacklevel=3)
        return loaded
    found = adapter.detect_profiles(model)
    if not found:
        raise ProfileError(
            f"no shipped profile matches this {type(model).__name__} (config "
            f"{adapter.describe_config(model)}); pass profile=NAME for a known model, or calibrate one with "
            f"`stepcache calibrate` and pass the file. Known profiles: "
            f"{', '.join(known_profiles())}")
    return found[0] if len(found) == 1 else found


def enable(target: Any, method: str, profile: str | Profile | None = None, *, preset: str | None = None,
           num_steps: int | None = None, parallel: Any = "auto", cfg_parallel: Any = None, per_video: bool = False,
           cache_dtype: Any = None, cache_device: Any = None, **params) -> CachedModel:
    """Install ``method`` (one of ``stepcache.methods.names()``) on a pipeline or transformer.

    ``profile`` is a shipped profile name or a profile file; without it the profile is matched on the model's
    config. ``preset`` picks one of the profile's published settings; keyword ``params`` override single values
    (``thresh``, ``K``, ``retention_ratio``, ``variant``, ``warmup_steps``, ...). Enabling again replaces the
    previous method. Raises before touching the model when any value is out of range.

    ``parallel`` is the sequence-parallel group over which a measurement taken on a rank's shard is reduced
    (a sum and a count per rank, one all-reduce), so that every rank takes the same decision: ``"auto"`` (the
    default) finds diffusers' context-parallel group on the model at each pass, so the cache may be enabled
    before or after ``enable_parallelism``; or a ``torch.distributed`` process group, an xfuser group
    coordinator, ``"world"``, or ``None`` for no reduction. Measurements the adapter says are whole on every
    rank need no reduction; every pass under a group still ends with one 1-element agreement on the compute
    flag. ``cfg_parallel`` is the group of ranks that run different CFG branches of the same step, one branch
    per rank (CFG parallelism): a method's follower branches (``decide_on``) then take the leader branch's
    decision from its rank. See docs/multi-gpu.md.

    A batch of several videos takes one decision per pass for the whole batch, as the published code does (the
    stats say so). ``per_video=True`` (diffusers models) runs each video of a batch as its own pass with its own
    state instead, so each video gets the pattern and output it would get alone, at the price of batch-1 passes.

    ``cache_dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype) and ``cache_device`` (``"cpu"``,
    ``"cuda:N"``) say where the cached residuals are kept between passes: by default in the dtype and on the device
    they are computed in; ``cache_device="cpu"`` frees their GPU memory at one copy per pass
    (:mod:`stepcache.storage`).

    A bare transformer driven by your own loop: pass ``num_steps=`` and wrap each call in
    ``transformer.cache_context(BRANCH)``. A new generation is recognised when the timestep goes back up; call
    ``stepcache.enable(...).start_generation()`` before each generation when your timesteps do not fall.
    """
    storage = CacheStorage.of(cache_dtype, cache_device)
    compilers = _whole_model_compilers(target)
    model, pipeline = _resolve_target(target)
    models, switch_step = targets_of(model, pipeline)
    adapter = adapter_for(model, pipeline)
    if num_steps is not None and (int(num_steps) != num_steps or num_steps < 2):
        raise ParameterError(f"num_steps={num_steps!r} must be an integer >= 2")
    if not isinstance(per_video, bool):
        raise ParameterError(f"per_video={per_video!r} is not allowed; allowed: True or False")
    if per_video and not getattr(adapter, "can_split_batch", False):
        raise ParameterError(f"per_video=True needs a model whose batch stepcache can split (the diffusers "
                             f"transformers); {type(model).__name__} cannot")
    resolved = _profile_for(adapter, model, profile)
    return install(models, adapter, method, resolved, StepClock(pipeline, num_steps), preset=preset, params=params,
                   parallel=parallel, cfg_parallel=cfg_parallel, per_video=per_video, switch_step=switch_step,
                   compilers=compilers, storage=storage)


def _whole_model_compilers(target: Any) -> dict[int, Callable]:
    """Per model (by id of the module stepcache installs on), how it was compiled whole, when it was: read before
    a ``torch.compile(model)`` wrapper is looked through."""
    wrappers = [target] if isinstance(target, nn.Module) else [getattr(target, name, None)
                                                               for name in ("transformer", "transformer_2")]
    found = {}
    for wrapper in wrappers:
        compiler = whole_model_compiler(wrapper) if isinstance(wrapper, nn.Module) else None
        if compiler is not None:
            found[id(compiled_inner(wrapper))] = compiler
    return found


def install(models: list[nn.Module], adapter, method: str, profile: Profile | list[Profile] | None, clock: StepClock,
            *, preset: str | None = None, params: dict[str, Any] | None = None, parallel: Any = "auto",
            cfg_parallel: Any = None, per_video: bool = False,
            switch_step: Callable[[], int | None] | None = None, runner=None,
            compilers: dict[int, Callable] | None = None, storage: CacheStorage = CacheStorage()) -> CachedModel:
    """Install ``method`` (or a measuring ``runner``) on one model, or on the two experts of a two-expert model
    in run order, sharing one runner, clock and stats; ``switch_step()`` says where the second expert starts,
    once per generation. Entry points that drive their own loop (the official-repo drop-ins) call this with their
    adapter; :func:`enable` is the front door. Replaces whatever was installed on those models before."""
    params = dict(params or {})
    if len(models) not in (1, len(EXPERTS)):
        raise ValueError(f"install() takes one model or the {len(EXPERTS)} experts of a two-expert model")
    if len(models) == 1 and "experts" in params:
        raise ParameterError(f"experts={params['experts']!r} applies to two-expert models (Wan2.2 A14B: install on "
                             f"the pipeline, with transformer_2 and a boundary_ratio), and this is one model; leave "
                             f"it out")
    for installed in models:
        if getattr(installed, "_stepcache", None) is not None:
            disable(installed)
    experts = EXPERTS if len(models) > 1 else (None,)
    cached = None
    try:
        for model, expert in zip(models, experts):
            installed = CachedModel(model, adapter, method, profile, preset, params, clock, parallel,
                                    runner=runner, cfg_parallel=cfg_parallel, per_video=per_video, expert=expert,
                                    switch_step=switch_step, owner=cached,
                                    whole_compiler=(compilers or {}).get(id(model)), storage=storage)
            model._stepcache = installed
            cached = cached or installed
    except BaseException:
        if cached is not None:
            disable(cached.model)
        raise
    return cached


def _cached(target: Any) -> CachedModel | None:
    """The installation on a pipeline or transformer (for either expert of a two-expert model: the first's)."""
    model = compiled_inner(target if isinstance(target, nn.Module) else getattr(target, "transformer", None))
    cached = getattr(model, "_stepcache", None)
    return None if cached is None else cached.owner


def disable(target: Any) -> None:
    """Remove the cache (from both experts of a two-expert model) and restore each model's original forward
    exactly. A no-op when none is installed."""
    cached = _cached(target)
    if cached is not None:
        cached.remove()


def stats(target: Any) -> RunStats:
    cached = _cached(target)
    if cached is None:
        raise ValueError("no stepcache method is enabled on this model")
    return cached.stats
