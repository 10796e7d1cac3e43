"""The drop-in scripts for Tencent-Hunyuan/HunyuanVideo-1.5's ``generate.py``: ``magcache_generate.py``,
``teacache_generate.py`` and ``easycache_generate.py`` all run :func:`main`.

A user copies a script into the root of a checkout and runs it with ``generate.py``'s own flags plus ours. Our flags
are taken out first (exact names only) and checked, with the upstream flags they depend on, before anything loads;
then upstream's ``generate.main()`` runs as published, with three seams:

- ``HunyuanVideo_1_5_Pipeline.create_pipeline`` is wrapped to get the pipeline instance, and its instance's
  ``apply_infer_optimization`` to install the cache on ``pipe.transformer`` after upstream's own set-up (compile,
  offloading). The instance, never the class: the super-resolution pipeline's transformer is another instance of
  the same class, and is not cached.
- ``pipe.cache_helper``, the slot upstream's own caches (``--enable_cache``) use, tells the cache where a generation
  starts and with how many steps and which guidance (``clear_states()``, called once per generation after the
  timesteps exist). So the two exclude each other: ``--enable_cache`` with a stepcache method is refused.
- ``generate.generate_video`` is wrapped to read upstream's parsed arguments and time the run.

Under ``torchrun`` (upstream's sequence parallelism: ``generate.py`` makes the degree the world size and each rank
holds a shard of the image tokens) the cache is given upstream's sequence-parallel group: TeaCache's signal, block
0's modulated input of the shard, is reduced to the full-sequence mean over it, MagCache's ratios come from the
table, EasyCache measures the transformer's input and gathered output, which every rank holds whole; and every pass
ends with one agreement, so ranks skip or compute alike. Cached residuals stay per rank (a shard each).

Design notes: docs/hunyuanvideo15.md#the-official-repository
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cliargs import help_text
from ..errors import InputError, run_cli
from ..methods import PARAMETERS, PREDICT_HELP, PREDICTIONS, MethodConfig, resolve_method
from ..outputs import check_output_file, write_json
from ..policies import ParameterError
from ..profiles import Profile, ProfileError, check_profile_family, load_profile
from ..storage import STORAGE_FLAGS, CacheStorage, add_storage_arguments, storage_of_args

METHODS = ("magcache", "teacache", "easycache")
FAMILY = "hunyuanvideo1.5"
SCRIPTS = {method: f"{method}_generate.py" for method in METHODS}
# Our flags that set a method parameter: flag -> (method, parameter)
METHOD_FLAGS = {"--magcache_thresh": ("magcache", "thresh"), "--magcache_K": ("magcache", "K"),
                "--retention_ratio": ("magcache", "retention_ratio"), "--teacache_thresh": ("teacache", "thresh"),
                "--easycache_thresh": ("easycache", "thresh")}


class CacheFlagError(InputError):
    """A value of the script's flags (ours, or upstream's that ours depend on) that cannot run."""


class UpstreamImportError(InputError):
    """Upstream's generate.py, or one of its requirements, cannot be imported."""


def _dest(flag: str) -> str:
    return flag.lstrip("-")


def cache_parser(method: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("stepcache (training-free step caching; HunyuanVideo 1.5 has published MagCache "
                                      "tables only: TeaCache and EasyCache need a calibrated --cache_profile)")
    group.add_argument("--cache_method", choices=[*METHODS, "none"], default=method,
                       help=f"caching method (default: {method}); 'none' runs upstream's generate.py uncached")
    for flag, (owner, parameter) in METHOD_FLAGS.items():
        kind = int if parameter == "K" else float
        group.add_argument(flag, type=kind, default=None, help=f"{owner}: {help_text(PARAMETERS[owner][parameter])}")
    group.add_argument("--cache_profile", default=None, metavar="NAME_OR_FILE",
                       help="a profile: shipped (text-to-video: hunyuanvideo1.5-t2v-20steps up to 20 steps, else "
                            "hunyuanvideo1.5-t2v, the default) or a file from `stepcache calibrate`")
    group.add_argument("--cache_preset", default=None, metavar="NAME",
                       help="a named setting of the profile (E006K2R02, E006K3R02; 20-step table: E003K1R025, "
                            "E003K2R025), in place of the method's flags")
    group.add_argument("--cache_predict", choices=PREDICTIONS, default=None, help=f"any method: {PREDICT_HELP}")
    add_storage_arguments(group, sep="_")
    group.add_argument("--cache_stats", default=None, metavar="PATH",
                       help="where to write the run's stats as JSON (default: next to the video, <video>.stats.json)")
    return parser


def upstream_view(argv: list[str]) -> argparse.Namespace:
    """The upstream flags our checks depend on, read as generate.py reads them (its own parser runs later)."""
    def flag(text):
        return str(text).lower().strip() in ("true", "1", "yes", "on")
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--resolution", default=None)
    parser.add_argument("--image_path", default=None)
    parser.add_argument("--num_inference_steps", type=int, default=None)
    parser.add_argument("--output_path", default=None)
    for name in ("enable_cache", "enable_step_distill", "cfg_distilled", "sparse_attn"):
        parser.add_argument(f"--{name}", type=flag, nargs="?", const=True, default=False)
    return parser.parse_known_args(argv)[0]


def transformer_version(view) -> str:
    """Upstream's name of the transformer the run loads (its pipeline's get_transformer_version)."""
    from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline
    task = "i2v" if view.image_path and view.image_path.lower() != "none" else "t2v"
    return HunyuanVideo_1_5_Pipeline.get_transformer_version(view.resolution, task, view.cfg_distilled,
                                                              view.enable_step_distill, view.sparse_attn)


def version_and_steps(view) -> tuple[str, int]:
    """The transformer version the run loads and its step count, as generate.py will take them (its config's
    steps where --num_inference_steps is not given)."""
    if view.resolution is None:
        raise CacheFlagError("--resolution is required (480p or 720p), as generate.py requires it")
    from hyvideo.commons import PIPELINE_CONFIGS
    version = transformer_version(view)
    return version, view.num_inference_steps or PIPELINE_CONFIGS.get(version, {}).get("num_inference_steps", 50)


@dataclass
class CachePlan:
    """What to install, decided from the flags alone, before any model exists."""

    method: str | None
    profile: Profile | None = None
    config: MethodConfig | None = None
    params: dict[str, Any] = field(default_factory=dict)  # what the flags set (the rest: the profile and preset)
    preset: str | None = None
    storage: CacheStorage = field(default_factory=CacheStorage)
    stats_path: str | None = None
    notes: list[str] = field(default_factory=list)  # printed before the run, kept in the stats


def plan_cache(ours, view) -> CachePlan:
    method = None if ours.cache_method == "none" else ours.cache_method
    given = {flag: getattr(ours, _dest(flag)) for flag in METHOD_FLAGS if getattr(ours, _dest(flag)) is not None}
    extra = [*given] + [f"--{k}" for k in ("cache_profile", "cache_preset", "cache_predict", *STORAGE_FLAGS,
                                            "cache_stats") if getattr(ours, k) is not None]
    if method is None:
        if extra:
            raise CacheFlagError(f"{extra[0]}: not used with --cache_method none")
        return CachePlan(None)
    for flag in given:
        owner = METHOD_FLAGS[flag][0]
        if owner != method:
            raise CacheFlagError(f"{flag} sets a {owner} parameter, but this run uses {method} (pass --cache_method "
                                 f"{owner})")
    if view.enable_cache:
        raise CacheFlagError(f"--enable_cache turns on upstream's own cache, and this run caches with {method}: "
                             f"they use the same slot of the pipeline; drop one (--cache_method none runs "
                             f"upstream's alone)")
    version, steps = version_and_steps(view)
    notes: list[str] = []
    if steps < 2:
        raise CacheFlagError(f"--num_inference_steps {steps}: caching needs at least 2 steps")
    try:
        if ours.cache_profile:
            profile = load_profile(ours.cache_profile)
            check_profile_family(profile, FAMILY)
        else:
            profile = _shipped_profile(version, method, steps)
            if version not in PLAIN_TEXT_TO_VIDEO:
                notes.append(f"the shipped table {profile.name!r} was calibrated on the 720p text-to-video "
                             f"checkpoint with CFG (guidance 6); this run loads {version}, whose magnitudes may "
                             f"differ: calibrate one for it (`stepcache calibrate` on its diffusers pipeline) and "
                             f"pass --cache_profile FILE")
        params = {parameter: given[flag] for flag, (owner, parameter) in METHOD_FLAGS.items() if flag in given}
        if ours.cache_predict is not None:
            params["predict"] = ours.cache_predict
        config = resolve_method(method, profile, ours.cache_preset, **params)
        config.spec.validate(config, steps)
        storage = storage_of_args(ours)
    except (ProfileError, ParameterError) as exc:
        raise CacheFlagError(str(exc)) from exc
    if ours.cache_stats:
        check_output_file(ours.cache_stats, "--cache_stats", (".json",))
    return CachePlan(method, profile, config, params, ours.cache_preset, storage, ours.cache_stats, notes)


# The checkpoints the shipped tables fit: the undistilled text-to-video ones (ComfyUI-MagCache calibrated the 720p one).
PLAIN_TEXT_TO_VIDEO = ("480p_t2v", "720p_t2v")
# The shipped tables are text-to-video ones (every released checkpoint has the same layers), and ComfyUI-MagCache's
# rule picks between its two: the 20-step one for runs of at most 20 steps, else the 40-step one.
TEXT_TO_VIDEO, TWENTY_STEPS = "hunyuanvideo1.5-t2v", "hunyuanvideo1.5-t2v-20steps"


def _shipped_profile(version: str, method: str, steps: int) -> Profile:
    if "_i2v" in version:
        raise ProfileError(f"no shipped profile for the {version} model: the published tables are text-to-video "
                           f"ones; calibrate one (`stepcache calibrate` on its diffusers pipeline) and pass "
                           f"--cache_profile FILE")
    profile = load_profile(TWENTY_STEPS if steps <= 20 else TEXT_TO_VIDEO)
    if not profile.has(method):
        raise ProfileError(f"profile {profile.name!r} has no {method} table (HunyuanVideo 1.5 has published MagCache "
                           f"tables only); calibrate one (`stepcache calibrate` on its diffusers pipeline) and pass "
                           f"--cache_profile FILE")
    return profile


def sequence_group():
    """Upstream's sequence-parallel group (``get_parallel_state()``, set up when generate.py is imported), or None
    on one process."""
    from hyvideo.commons.parallel_states import get_parallel_state

    from ..distributed import SequenceGroup
    dims = get_parallel_state()
    if not dims.sp_enabled:
        return None
    return SequenceGroup(dims.sp_group, f"HunyuanVideo-1.5 sequence parallel ({dims.sp} ranks)")


class GenerationNotifier:
    """Sits in the pipeline's ``cache_helper`` slot: upstream calls ``clear_states()`` once per generation, after
    its timesteps exist, and sets ``cur_timestep`` before each step's transformer call."""

    def __init__(self, pipe, cached):
        self.pipe, self.cached = pipe, cached
        self.cur_timestep = None

    def clear_states(self) -> None:
        guidance = getattr(self.pipe, "guidance_scale", None)
        self.cached.start_generation(self.pipe.num_timesteps, guidance if isinstance(guidance, (int, float))
                                     else None)


def attach(pipe, method: str, profile: Profile, preset: str | None, params: dict, storage: CacheStorage):
    """Install ``method`` on the pipeline's transformer instance and tell it where generations start (through the
    ``cache_helper`` slot); returns the cached model (``remove()`` takes it off; then clear the slot)."""
    from ..api import StepClock, install
    from .official_adapter import HYVideo15Adapter
    cached = install([pipe.transformer], HYVideo15Adapter(), method, profile, StepClock(), preset=preset,
                     params=params, parallel=sequence_group(), storage=storage)
    pipe.cache_helper = GenerationNotifier(pipe, cached)
    return cached


def find_checkout() -> None:
    """Put the checkout this script was copied into (its folder, else the working directory) on the import path."""
    for where in (str(Path(sys.argv[0]).resolve().parent), os.getcwd()):
        if (Path(where) / "generate.py").is_file() and (Path(where) / "hyvideo").is_dir():
            if where not in sys.path:
                sys.path.insert(0, where)
            return
    raise UpstreamImportError("generate.py and hyvideo/ of a HunyuanVideo-1.5 checkout were not found next to this "
                              "script nor in the working directory: copy the script into the checkout's root and run "
                              "it there")


def import_upstream(name: str):
    try:
        import importlib
        return importlib.import_module(name)
    except ImportError as exc:
        raise UpstreamImportError(f"upstream's {name} does not import: {exc} (install the checkout's "
                                  f"requirements.txt)") from exc


def _run(method: str, argv: list[str]) -> int:
    ours, rest = cache_parser(method).parse_known_args(argv)
    asks_help = any(a in ("-h", "--help") for a in argv)
    if asks_help:
        cache_parser(method).print_help()
        print("\nupstream generate.py's flags follow:\n")
    find_checkout()
    import_upstream("hyvideo.pipelines.hunyuan_video_pipeline")
    view = upstream_view(rest)
    plan = CachePlan(None) if asks_help else plan_cache(ours, view)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in plan.notes:
            print(f"stepcache note: {note}", file=sys.stderr, flush=True)
    generate = import_upstream("generate")
    from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline
    state: dict[str, Any] = {}
    rank = int(os.environ.get("RANK", "0"))  # upstream saves the video on rank 0; so do we the stats
    create = HunyuanVideo_1_5_Pipeline.create_pipeline   # bound as upstream calls it

    def create_pipeline(*args, **kwargs):
        pipe = create(*args, **kwargs)
        if plan.method is None or "pipe" in state:
            return pipe
        apply = pipe.apply_infer_optimization

        def apply_infer_optimization(*a, **k):
            result = apply(*a, **k)
            if pipe.cache_helper is not None:
                raise CacheFlagError("upstream set its own cache on the pipeline (--enable_cache); it and "
                                     f"{plan.method} exclude each other")
            cached = attach(pipe, plan.method, plan.profile, plan.preset, plan.params, plan.storage)
            state.update(pipe=pipe, cached=cached)
            if rank == 0:
                print(f"stepcache: {plan.config.describe()}", flush=True)
            return result
        pipe.apply_infer_optimization = apply_infer_optimization
        return pipe

    generate_video = generate.generate_video

    def timed_generate_video(args):
        state["args"] = args
        start = time.perf_counter()
        result = generate_video(args)
        state["seconds"] = time.perf_counter() - start
        return result

    try:
        run_generate(generate, rest, [(HunyuanVideo_1_5_Pipeline, "create_pipeline", staticmethod(create_pipeline)),
                                      (generate, "generate_video", timed_generate_video)])
    finally:
        if "cached" in state:
            state["cached"].remove()
    if "cached" in state and rank == 0:
        write_stats(state, plan)
    return 0


def run_generate(generate, argv: list[str], seams: list[tuple[Any, str, Any]]) -> None:
    """Upstream's ``generate.main()`` on ``argv`` with each seam ``(owner, name, value)`` set, and everything put back
    afterwards however it ends (the attributes as they were, ``sys.argv``)."""
    saved = [(owner, name, vars(owner)[name]) for owner, name, _ in seams]
    saved_argv = sys.argv
    for owner, name, value in seams:
        setattr(owner, name, value)
    sys.argv = [saved_argv[0], *argv]
    try:
        generate.main()
    finally:
        sys.argv = saved_argv
        for owner, name, value in saved:
            setattr(owner, name, value)


def write_stats(state: dict, plan: CachePlan) -> None:
    cached, args = state["cached"], state.get("args")
    print(cached.stats.summary())
    video = getattr(args, "output_path", None)
    target = plan.stats_path or (str(Path(video).with_suffix(".stats.json")) if video else "stepcache.stats.json")
    record = cached.stats.to_dict()
    record.update({"settings": plan.config.describe(), "profile": plan.profile.name, "video": video,
                   "notes": [*record.get("notes", []), *plan.notes],
                   "seconds": state.get("seconds"),
                   "upstream": {k: getattr(args, k, None) for k in ("resolution", "image_path", "num_inference_steps",
                                                                    "video_length", "aspect_ratio", "seed", "prompt",
                                                                    "cfg_distilled", "enable_step_distill")}})
    write_json(target, record)
    print(f"stepcache stats saved to: {target}")


def main(method: str, argv: list[str] | None = None) -> int:
    """Run one drop-in script (``method`` is its default). Returns the exit status: 0, or 2 after one line for bad
    input."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _run(method, argv), prog=SCRIPTS[method])


def run_script(method: str) -> None:
    """Entry point of the drop-in scripts."""
    sys.exit(main(method))
