"""The one implementation behind the drop-in scripts for the official HunyuanVideo repo (Tencent/HunyuanVideo).

``magcache_sample_video.py``, ``teacache_sample_video.py`` and ``easycache_sample_video.py`` are copied into the
root of an upstream checkout and run with exactly the flags of upstream's ``sample_video.py``; everything
upstream does stays upstream's. What is added: the method's flags, checked with every output path and input
file before anything loads; the cache on the transformer *instance* after upstream built it (so that it also
wraps the forward xDiT binds, where a class patch runs uncached); MagCache at any ``--video-size``; per-pass
stats; outputs written whole. Bad input ends the script with one line and exit status 2
(:func:`stepcache.errors.run_cli`). CFG with ``--cfg-scale > 1`` is batched by upstream: one branch.

Design notes: docs/hunyuanvideo.md#official-repository-tencenthunyuanvideo-drop-in-scripts
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..cliargs import help_text
from ..errors import InputError, run_cli
from ..methods import PARAMETERS, PREDICT_HELP, PREDICTIONS, MethodConfig, resolve_method
from ..policies import ParameterError
from ..outputs import atomic_path, check_output_dir, check_output_file, write_json
from ..profiles import Profile, ProfileError, check_profile_family, load_profile, match_profiles
from ..storage import STORAGE_FLAGS, CacheStorage, add_storage_arguments, storage_of_args
from .resolution import choose_by_resolution, warn_unpublished

FAMILY = "hunyuanvideo"
MODEL_CLASS = "HYVideoDiffusionTransformer"
METHODS = ("magcache", "teacache", "easycache")
REFERENCE_PROFILE = "hunyuanvideo-t2v-720p"  # where --help reads the published defaults from

# Our dash-style flags for method parameters: flag -> (method, parameter name in stepcache.methods.PARAMETERS).
METHOD_FLAGS = {
    "--teacache-thresh": ("teacache", "thresh"),
    "--magcache-thresh": ("magcache", "thresh"),
    "--magcache-K": ("magcache", "K"),
    "--retention-ratio": ("magcache", "retention_ratio"),
    "--easycache-thresh": ("easycache", "thresh"),
}


class CacheFlagError(InputError):
    """A value of the script's flags (ours or upstream's) that cannot run; the message names the flag."""


class MissingCheckpointError(InputError):
    """A weight file or folder upstream's loader would open does not exist."""


class UpstreamImportError(InputError):
    """Upstream's package, or one of its requirements, cannot be imported."""


def refuse(message: str):
    """The ``error`` callback of :func:`plan_cache`: one line, exit status 2 (through :func:`run_cli`)."""
    raise CacheFlagError(message)


STORAGE_OPTIONS = tuple("--" + dest.replace("_", "-") for dest in STORAGE_FLAGS)


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _import_upstream_config():
    try:
        from hyvideo import config as upstream_config
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing == "hyvideo" or missing.startswith("hyvideo."):
            raise UpstreamImportError(
                "upstream HunyuanVideo's hyvideo package is not importable: copy this script into the root of a "
                "Tencent/HunyuanVideo checkout and run it from there") from exc
        if missing:
            raise UpstreamImportError(
                f"upstream HunyuanVideo needs the Python module {missing!r}, which is not installed: pip install "
                f"{pip_name(missing)} (or pip install -r requirements.txt in the HunyuanVideo checkout)") from exc
        raise UpstreamImportError(f"upstream HunyuanVideo cannot be imported: {exc}") from exc
    return upstream_config


# Import names whose pip package has another name (what the "pip install" in the messages must say).
PIP_NAMES = {"PIL": "pillow", "cv2": "opencv-python", "yaml": "pyyaml", "sklearn": "scikit-learn"}


def pip_name(module: str) -> str:
    top = module.split(".")[0]
    return PIP_NAMES.get(top, top)


# ------------------------------------------------------------------------------------------------ arguments
def add_cache_args(parser: argparse.ArgumentParser, method: str) -> argparse.ArgumentParser:
    """Our flags, in upstream's dash style, as one more argument group."""
    reference = load_profile(REFERENCE_PROFILE)
    tea, mag, easy = (reference.method(m) for m in ("teacache", "magcache", "easycache"))
    group = parser.add_argument_group(
        title="stepcache args (training-free step caching; defaults are the published settings)")
    group.add_argument("--cache-method", choices=[*METHODS, "none"], default=method,
                       help=f"Caching method (default: {method}); 'none' runs upstream's sampler uncached, for a "
                            f"baseline with the same flags.")
    group.add_argument("--cache-profile", default=None, metavar="NAME_OR_FILE",
                       help="Profile with the method's tables: a shipped name (hunyuanvideo-t2v-720p, "
                            "hunyuanvideo-t2v-544p) or a calibrated profile file. Default: chosen from "
                            "--video-size by height (720 or 544 as published; any other height uses the nearest "
                            "published table and warns).")
    group.add_argument("--cache-preset", default=None, metavar="NAME",
                       help=f"A named published setting of the profile: MagCache "
                            f"{', '.join(mag.get('presets', {}))}; TeaCache {', '.join(tea.get('presets', {}))}.")
    group.add_argument("--teacache-thresh", type=float, default=None, metavar="FLOAT",
                       help=f"TeaCache: {PARAMETERS['teacache']['thresh']} (published: 0.1 for ~1.6x, 0.15 for "
                            f"~2.1x; default {tea['defaults']['thresh']}).")
    group.add_argument("--magcache-thresh", type=float, default=None, metavar="FLOAT",
                       help=f"MagCache: {PARAMETERS['magcache']['thresh']} (published: 0.12 or 0.24; default "
                            f"{mag['defaults']['thresh']}).")
    group.add_argument("--magcache-K", type=int, default=None, metavar="INT",
                       help=f"MagCache: {PARAMETERS['magcache']['K']} (published: 4 or 6; default "
                            f"{mag['defaults']['K']}).")
    group.add_argument("--retention-ratio", type=float, default=None, metavar="FLOAT",
                       help=f"MagCache: {PARAMETERS['magcache']['retention_ratio']} (default "
                            f"{mag['defaults']['retention_ratio']}).")
    group.add_argument("--easycache-thresh", type=float, default=None, metavar="FLOAT",
                       help=f"EasyCache: {help_text(PARAMETERS['easycache']['thresh'])} (default {easy['thresh']}; first "
                            f"{easy['warmup_steps']} steps always computed).")
    group.add_argument("--cache-predict", choices=PREDICTIONS, default=None,
                       help=f"Any method: {PREDICT_HELP}.")
    add_storage_arguments(group)
    group.add_argument("--magcache-calibration", default=None, metavar="PATH",
                       help="Calibrate MagCache instead of caching: run uncached, measure this model's magnitude "
                            "ratios at this --video-size and --infer-steps (one prompt, as the authors did) and "
                            "write them as a profile to PATH, for --cache-profile PATH.")
    group.add_argument("--cache-stats", default=None, metavar="PATH",
                       help="Write the per-pass stats (computed/reused, signal, accumulator) as JSON to PATH. "
                            "Default: next to each video, as <video>.stats.json.")
    return parser


def build_parser(method: str) -> argparse.ArgumentParser:
    """Upstream's parser, built from upstream's own argument groups (what ``hyvideo.config.parse_args`` does),
    plus ours."""
    cfg = _import_upstream_config()
    parser = argparse.ArgumentParser(
        description=f"HunyuanVideo inference script with {method} step caching (stepcache). All flags of "
                    f"upstream's sample_video.py work unchanged.")
    for add in (cfg.add_network_args, cfg.add_extra_models_args, cfg.add_denoise_schedule_args,
                cfg.add_inference_args, cfg.add_parallel_args):
        parser = add(parser)
    return add_cache_args(parser, method)


@dataclass
class CachePlan:
    """What to install, decided and validated from the flags alone, before any model exists."""

    method: str | None
    profile: Profile | None = None
    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config: MethodConfig | None = None
    warning: str | None = None  # the MagCache table is not calibrated at this resolution
    notes: list[str] = field(default_factory=list)
    calibrate: str | None = None  # write a MagCache profile measured in this (uncached) run here
    storage: CacheStorage = field(default_factory=CacheStorage)

    def enable(self, transformer, num_steps: int, parallel=None):
        """``parallel``: the sequence-parallel group TeaCache's shard signal is reduced over (None: one
        process)."""
        if self.method is None:
            return None
        from ..api import enable
        return enable(transformer, self.method, profile=self.profile, preset=self.preset, num_steps=num_steps,
                      parallel=parallel, cache_dtype=self.storage.dtype, cache_device=self.storage.device,
                      **self.overrides)


def video_size(args) -> tuple[int, int]:
    """(height, width) from ``--video-size`` (one value means square), as upstream's ``Inference.parse_size``."""
    size = list(args.video_size) if isinstance(args.video_size, (list, tuple)) else [args.video_size]
    if len(size) == 1:
        size = size * 2
    return int(size[0]), int(size[1])


def _model_config(model_name: str, package: str = "hyvideo") -> dict[str, Any]:
    """``package``: where upstream's model code is (``hyvideo``, or a copy of it: Sparse-VideoGen's
    ``svg.models.hyvideo``)."""
    import importlib
    c = importlib.import_module(f"{package}.modules.models").HUNYUAN_VIDEO_CONFIG.get(model_name, {})
    return {"num_layers": c.get("mm_double_blocks_depth"), "num_single_layers": c.get("mm_single_blocks_depth"),
            "num_attention_heads": c.get("heads_num")}


def plan_cache(args, error: Callable[[str], Any], package: str = "hyvideo") -> CachePlan:
    """Check our flags against each other, the method and the profile; ``error`` exits (argparse style).
    ``package``: where upstream's model code is (see :func:`_model_config`)."""
    method = None if args.cache_method == "none" else args.cache_method
    given = {flag: getattr(args, _dest(flag)) for flag in METHOD_FLAGS if getattr(args, _dest(flag)) is not None}
    if args.magcache_calibration:
        return _plan_calibration(args, given, error, package)
    if method is None:
        extra = [*given] + [f for f in ("--cache-profile", "--cache-preset", "--cache-predict", *STORAGE_OPTIONS)
                            if getattr(args, _dest(f))]
        if extra:
            error(f"argument {extra[0]}: not used with --cache-method none")
        return CachePlan(None)
    for flag in given:
        owner = METHOD_FLAGS[flag][0]
        if owner != method:
            error(f"argument {flag}: sets a {owner} parameter, but this run uses {method} "
                  f"(pass --cache-method {owner} to use {owner})")
    if len(args.video_size) not in (1, 2):
        error(f"argument --video-size: expected HEIGHT [WIDTH], got {args.video_size}")
    height, width = video_size(args)
    if args.infer_steps < 2:
        error(f"argument --infer-steps: caching needs at least 2 denoising steps, got {args.infer_steps}")
    notes = []
    if method == "teacache" and (args.ulysses_degree > 1 or args.ring_degree > 1):
        notes.append("teacache under sequence parallelism: each rank measures its signal on its own image-token "
                     "shard; the sums and counts are all-reduced over xDiT's sequence-parallel group before the "
                     "threshold (one small all-reduce per pass), so every rank takes the same decision")

    warning = None
    if args.cache_profile:
        try:
            profile = load_profile(args.cache_profile)
            check_profile_family(profile, FAMILY)
            profile.method(method)
        except (ProfileError, ParameterError) as exc:
            error(f"argument --cache-profile: {exc}")
    else:
        profile, warning = _default_profile(args, height, width, error, package)
        if method != "magcache":
            warning = None  # TeaCache's and EasyCache's settings do not depend on the resolution

    try:
        resolve_method(method, profile, args.cache_preset)
    except (ProfileError, ParameterError) as exc:
        error(f"argument --cache-preset: {exc}")
    overrides = {}
    for flag, value in given.items():
        parameter = METHOD_FLAGS[flag][1]
        try:
            resolve_method(method, profile, args.cache_preset, **{parameter: value})
        except (ProfileError, ParameterError) as exc:
            error(f"argument {flag}: {exc}")
        overrides[parameter] = value
    if args.cache_predict is not None:
        overrides["predict"] = args.cache_predict
    try:
        storage = storage_of_args(args)
    except ParameterError as exc:
        error(f"argument --cache-device: {exc}")  # --cache-dtype's choices are argparse's
    try:
        config = resolve_method(method, profile, args.cache_preset, **overrides)
        config.spec.validate(config, args.infer_steps)  # e.g. a table that cannot be fitted to --infer-steps
    except (ProfileError, ParameterError) as exc:
        error(f"argument --infer-steps: {exc}")
    return CachePlan(method, profile, args.cache_preset, overrides, config, warning, notes, storage=storage)


def _default_profile(args, height: int, width: int, error, package: str = "hyvideo") -> tuple[Profile, str | None]:
    candidates = match_profiles(FAMILY, _model_config(args.model, package), MODEL_CLASS)
    if not candidates:
        error(f"argument --cache-profile: no shipped profile matches --model {args.model}; pass a calibrated "
              f"profile file")
    return choose_by_resolution(candidates, height, width)


def _plan_calibration(args, given: dict, error, package: str = "hyvideo") -> CachePlan:
    extra = [*given] + [f for f in ("--cache-preset", "--cache-predict", *STORAGE_OPTIONS) if getattr(args, _dest(f))]
    if extra:
        error(f"argument {extra[0]}: not used with --magcache-calibration (a calibration run is uncached)")
    if args.ulysses_degree > 1 or args.ring_degree > 1:
        error("argument --magcache-calibration: calibrate on one GPU (under sequence parallelism each rank "
              "sees only its shard of the residual)")
    if args.infer_steps < 2:
        error(f"argument --infer-steps: calibration needs at least 2 denoising steps, got {args.infer_steps}")
    if args.cache_profile:
        try:
            base = load_profile(args.cache_profile)
            check_profile_family(base, FAMILY)
        except ProfileError as exc:
            error(f"argument --cache-profile: {exc}")
    else:
        base = _default_profile(args, *video_size(args), error, package)[0]
    return CachePlan(None, profile=base, calibrate=args.magcache_calibration)


def parse_args(method: str, argv: list[str] | None = None):
    """(upstream args namespace, CachePlan). A malformed flag exits through argparse (status 2); a value that
    cannot run raises :class:`CacheFlagError`."""
    cfg = _import_upstream_config()
    parser = build_parser(method)
    args = parser.parse_args(argv)
    try:
        args = cfg.sanity_check_args(args)
    except ValueError as exc:  # upstream's own check of --vae / --latent-channels
        raise CacheFlagError(str(exc)) from exc
    return args, plan_cache(args, refuse)


def save_folder(args) -> str:
    """Where upstream's sample_video.py saves the videos."""
    return args.save_path if args.save_path_suffix == "" else f"{args.save_path}_{args.save_path_suffix}"


def check_outputs(args, plan: CachePlan) -> None:
    """Every output path can be written; nothing is created (the save folder appears with the first video)."""
    check_output_dir(save_folder(args), "--save-path")
    if args.cache_stats:
        check_output_file(args.cache_stats, "--cache-stats", (".json",))
    if plan.calibrate:
        check_output_file(plan.calibrate, "--magcache-calibration", (".json",))


def check_checkpoints(args, constants=None) -> None:
    """Every file and folder upstream's ``sample_video.py`` and ``HunyuanVideoSampler.from_pretrained`` will open
    exists, before anything is built (upstream builds the 13B transformer before it looks for its weights).

    ``constants`` is upstream's ``hyvideo.constants``: the VAE and text encoders are found through its tables,
    which are rooted at the ``MODEL_BASE`` environment variable (default ``./ckpts``), not at ``--model-base``.
    """
    if constants is None:
        from hyvideo import constants
    if not Path(args.model_base).exists():
        raise MissingCheckpointError(f"--model-base {args.model_base!r} does not exist (upstream's sample_video.py "
                                     f"requires it)")
    dit_weight = Path(args.dit_weight)
    if dit_weight.is_dir():
        if not any(dit_weight.glob("*_model_states.pt")):
            raise MissingCheckpointError(
                f"--dit-weight {args.dit_weight!r} is a folder without a *_model_states.pt file (upstream loads "
                f"the first one in it); give the weight file itself")
    elif not dit_weight.is_file():
        raise MissingCheckpointError(f"--dit-weight {args.dit_weight!r} does not exist")
    if getattr(args, "use_fp8", False):
        fp8_map = str(args.dit_weight).replace(".pt", "_map.pt")  # how upstream's convert_fp8_linear names it
        if not os.path.isfile(fp8_map):
            raise MissingCheckpointError(f"--use-fp8 needs the fp8 map of --dit-weight, {fp8_map!r}, which does "
                                         f"not exist")
    where = (f"(upstream looks under the MODEL_BASE environment variable, now "
             f"{getattr(constants, 'MODEL_BASE', './ckpts')!r}, not under --model-base)")
    vae = Path(constants.VAE_PATH[args.vae])
    for needed in (vae / "config.json", vae / "pytorch_model.pt"):
        if not needed.is_file():
            raise MissingCheckpointError(f"--vae {args.vae}: {str(needed)!r} does not exist {where}")
    folders = [("--text-encoder", args.text_encoder, constants.TEXT_ENCODER_PATH, "config.json"),
               ("--tokenizer", args.tokenizer, constants.TOKENIZER_PATH, None)]
    if getattr(args, "text_encoder_2", None) is not None:
        folders += [("--text-encoder-2", args.text_encoder_2, constants.TEXT_ENCODER_PATH, "config.json"),
                    ("--tokenizer-2", args.tokenizer_2, constants.TOKENIZER_PATH, None)]
    for flag, name, table, needed in folders:
        folder = Path(table[name])
        path = folder / needed if needed else folder
        if not (path.is_file() if needed else path.is_dir()):
            raise MissingCheckpointError(f"{flag} {name}: {str(path)!r} does not exist {where}")


# ------------------------------------------------------------------------------------------------ running
def load_sampler(args):
    """Upstream's loading, exactly as its sample_video.py does it (after :func:`check_checkpoints`)."""
    from hyvideo.inference import HunyuanVideoSampler

    return HunyuanVideoSampler.from_pretrained(Path(args.model_base), args=args)


def save_video(sample, path: str) -> None:
    from hyvideo.utils.file_utils import save_videos_grid
    save_videos_grid(sample, path, fps=24)


def _log(message: str) -> None:
    try:
        from loguru import logger
        logger.info(message)
    except ImportError:
        print(message)


def _is_main_rank() -> bool:
    return "LOCAL_RANK" not in os.environ or int(os.environ["LOCAL_RANK"]) == 0


def stats_record(cached, plan: CachePlan, args, seconds: float, video: str | None) -> dict[str, Any]:
    record = cached.stats.to_dict()
    record.update({
        "settings": plan.config.describe() if plan.config else None,
        "profile": plan.profile.name if plan.profile else None,
        "profile_warning": plan.warning,
        "video": video,
        "seconds": seconds,
        "upstream": {k: getattr(args, k, None) for k in ("model", "video_size", "video_length", "infer_steps",
                                                         "cfg_scale", "embedded_cfg_scale", "flow_shift",
                                                         "flow_reverse", "seed", "prompt", "use_fp8")},
    })
    return record


def main(method: str, argv: list[str] | None = None, *, load: Callable[[Any], Any] | None = None,
         save: Callable[[Any, str], None] | None = None) -> int:
    """Run one seed script: ``method`` is its default method. ``load``/``save`` replace upstream's model loading
    and video writing (tests drive a tiny model through upstream's own sampler this way); with ``load`` given,
    the checkpoint files are not looked for. Returns the exit status: 0, or 2 after one line for bad input."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return run_cli(lambda: _run(method, argv, load, save), prog=f"{method}_sample_video.py")


def _run(method: str, argv, load, save) -> int:
    args, plan = parse_args(method, argv)
    check_outputs(args, plan)
    if load is None:
        check_checkpoints(args)
    print(args)
    warn_unpublished(plan.warning)
    for note in plan.notes:
        _log(f"stepcache: {note}")
    save_path = save_folder(args)  # created with the first video, once the generation has succeeded
    sampler = (load or load_sampler)(args)
    args = sampler.args
    cached, calibration = install(plan, sampler, args)
    outputs, seconds = predict(sampler, args)
    if calibration is not None:
        calibration.remove()  # its runner keeps the measurements
    if not _is_main_rank():
        return 0
    videos = save_videos(outputs, save_path, save or save_video)
    if calibration is not None:
        write_calibration(calibration.runner, plan, args)
    if cached is not None:
        write_stats(cached, plan, args, seconds, videos)
    return 0


def install(plan: CachePlan, sampler, args):
    """(the cache, the calibration) installed on upstream's transformer instance, either or both None."""
    parallel = None
    if args.ulysses_degree > 1 or args.ring_degree > 1:
        from ..distributed import xdit_group
        parallel = xdit_group()  # upstream initialised it in from_pretrained (sequence-parallel degree = world)
    cached = plan.enable(sampler.pipeline.transformer, args.infer_steps, parallel=parallel)
    if cached is not None:
        _log(f"stepcache: {plan.config.describe()}")
        cached.start_generation(args.infer_steps, args.embedded_cfg_scale)
    calibration = None
    if plan.calibrate:  # one process (refused under sequence parallelism); CFG is batched: the one branch
        from ..calibrate import install_calibration
        calibration = install_calibration(sampler.pipeline.transformer, args.infer_steps)
        calibration.start_generation(args.infer_steps)
    return cached, calibration


def predict(sampler, args):
    """Upstream sample_video.py's call of the sampler, as it makes it; (its outputs, seconds)."""
    height, width = video_size(args)
    start = time.time()
    outputs = sampler.predict(
        prompt=args.prompt,
        height=height,
        width=width,
        video_length=args.video_length,
        seed=args.seed,
        negative_prompt=args.neg_prompt,
        infer_steps=args.infer_steps,
        guidance_scale=args.cfg_scale,
        num_videos_per_prompt=args.num_videos,
        flow_shift=args.flow_shift,
        batch_size=args.batch_size,
        embedded_guidance_scale=args.embedded_cfg_scale,
    )
    return outputs, time.time() - start


def save_videos(outputs, save_path: str, save) -> list[str]:
    """Upstream's file names; each video written whole (a temporary name, then moved into place)."""
    videos = []
    samples = outputs["samples"]
    for i in range(len(samples)):
        sample = samples[i].unsqueeze(0)
        time_flag = datetime.fromtimestamp(time.time()).strftime("%Y-%m-%d-%H:%M:%S")
        prompt = outputs["prompts"][i % len(outputs["prompts"])]
        cur_save_path = f"{save_path}/{time_flag}_seed{outputs['seeds'][i]}_{prompt[:100].replace('/', '')}.mp4"
        with atomic_path(cur_save_path) as partial:
            save(sample, str(partial))
        _log(f"Sample save to: {cur_save_path}")
        videos.append(cur_save_path)
    return videos


def write_calibration(runner, plan: CachePlan, args) -> None:
    from ..calibration_io import calibrated_source, magcache_profile_data, measured_ratios, write_profile
    base = plan.profile
    height, width = video_size(args)
    branches, steps, ratios = measured_ratios(runner)
    data = magcache_profile_data(
        name=Path(plan.calibrate).stem, description=f"{base.data.get('description', base.name)}; MagCache table "
                                                   f"calibrated at {height}x{width}, {steps} steps",
        model={**base.data.get("model", {}), "resolution": [height, width]}, recorder_or_ratios=ratios,
        branches=branches, steps=steps, source=calibrated_source(where="MagCache's rule, MC-HY:160-282"),
        measured_on={"model": args.model, "dit_weight": Path(args.dit_weight).name, "prompt": args.prompt,
                     "seed": args.seed, "infer_steps": args.infer_steps, "flow_shift": args.flow_shift,
                     "embedded_cfg_scale": args.embedded_cfg_scale, "video_size": [height, width],
                     "video_length": args.video_length},
        defaults=base.method("magcache").get("defaults", {}), presets=base.method("magcache").get("presets"),
        base=base)
    profile = write_profile(plan.calibrate, data)
    _log(f"stepcache: MagCache profile {profile.name!r} written to {plan.calibrate}; use it with "
         f"--cache-profile {plan.calibrate}")


def write_stats(cached, plan: CachePlan, args, seconds: float, videos: list[str]) -> None:
    """The stats next to each video (or all in --cache-stats)."""
    print(cached.stats.summary())
    targets = [args.cache_stats] if args.cache_stats else [str(Path(v).with_suffix(".stats.json")) for v in videos]
    for i, target in enumerate(targets):
        record = stats_record(cached, plan, args, seconds, videos[i] if not args.cache_stats else None)
        if args.cache_stats:
            record["videos"] = videos
        write_json(target, record)
        _log(f"stepcache stats saved to: {target}")


def run_script(method: str) -> None:
    """Entry point of the drop-in scripts (the one name every family's drop-ins call)."""
    sys.exit(main(method))
