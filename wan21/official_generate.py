"""The one implementation behind ``magcache_generate.py``, ``teacache_generate.py`` and ``easycache_generate.py``.

Each of those scripts is copied into the root of an upstream Wan-Video/Wan2.1 checkout and run with the command
lines the method's authors published: the cache flags keep the published scripts' names and defaults, and
everything else goes to upstream's own ``generate.py``, which runs unchanged. The cache goes on the sampler
*instance* the moment upstream builds it. Every value, output path and checkpoint file is checked before a
model loads (one line, exit status 2), and a video upstream's saver failed to write ends the run with exit
status 1 (upstream only prints the failure).

Design notes: docs/wan21.md#official-repository-wan-videowan21-drop-in-scripts
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, StepcacheWarning, run_cli
from ..methods import EXPERTS_HELP, PREDICT_HELP, PREDICTIONS, resolve_method
from ..outputs import atomic_path, check_output_dir, check_output_file, write_json
from ..policies import ParameterError
from ..profiles import Profile, ProfileError, ProfileFitWarning, load_profile
from ..schema import EXPERT_STATES
from ..storage import STORAGE_FLAGS, CacheStorage, add_storage_arguments, storage_of_args
from .official import FAMILY, model_config

METHODS = ("magcache", "teacache", "easycache")
SAMPLERS = ("WanT2V", "WanI2V", "WanFLF2V")
# Shipped tables per (task kind, model size); I2V has one per resolution, chosen by the requested size.
DEFAULT_PROFILES = {
    ("t2v", "1.3b"): ["wan2.1-t2v-1.3b"],
    ("t2v", "14b"): ["wan2.1-t2v-14b"],
    ("i2v", "14b"): ["wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"],
}
# The published scripts' CLI defaults when --use_magcache is given without values (MC-WAN _parse_args).
MAGCACHE_CLI_DEFAULTS = {"thresh": 0.12, "K": 2, "retention_ratio": 0.2}
EASYCACHE_UNUSED = {"alpha": 0.0, "beta": 1.0}


class PlanError(InputError):
    """A flag combination that cannot run. The message says which flags and what to do instead."""


class VideoNotSavedError(RuntimeError):
    """Upstream's saver did not write the video (it prints why and returns None instead of raising)."""


EXIT_NOT_SAVED = 1
# What upstream's savers can write: cache_video is imageio-ffmpeg with libx264; cache_image is torchvision's
# save_image, i.e. PIL by the file's suffix (upstream lists these).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tiff", ".gif", ".webp")
# Import names whose pip package has another name (what the "pip install" in the message must say).
PIP_NAMES = {"PIL": "pillow", "cv2": "opencv-python", "yaml": "pyyaml"}
# The files diffusers' ModelMixin.from_pretrained(ckpt_dir) reads the DiT from: one file, or a sharded index.
DIT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
               "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")


class WanRepo:
    """What the drop-ins need to know about one official Wan repository: Wan2.1 here; Wan2.2 subclasses it
    (:mod:`stepcache.wan22.official_generate`). Everything else in this module is the same for both."""

    name = "Wan2.1"
    github = "Wan-Video/Wan2.1"
    family = FAMILY
    samplers = SAMPLERS
    # upstream's savers (module attributes of its generate.py) and whether one returns the file name on success
    savers = ("cache_video", "cache_image")
    saver_returns_name = True
    magcache_defaults = MAGCACHE_CLI_DEFAULTS
    magcache_help_extra = ""
    has_experts = False  # whether some of its tasks run two experts (--cache_experts)

    def task_kind(self, task: str) -> str:
        return task_kind(task)

    def runs_experts(self, task: str) -> bool:
        """Whether ``task`` runs two experts (one cache over both)."""
        return False

    def profile_task(self, task: str, image: bool) -> str:
        """The ``model.task`` a profile for this run states (the task kind; with or without an input image)."""
        return self.task_kind(task)

    def in_channels(self, kind: str) -> int:
        return 36 if kind in ("i2v", "flf2v") else 16

    def uncached_task(self, task: str) -> str | None:
        """Why caching and calibration cannot run for ``task`` (None: they can)."""
        if task_kind(task) == "vace":
            return (f"--task {task} runs VaceWanModel, whose VACE blocks these scripts do not patch; caching and "
                    f"calibration cover t2v, t2i, i2v and flf2v")
        return None

    def default_profile(self, args, upstream) -> Profile | None:
        names = DEFAULT_PROFILES.get((task_kind(args.task), model_tag(args.task)))
        if not names:
            return None
        return _nearest(names, *pixel_size(args.size, upstream.SIZE_CONFIGS))

    def no_table(self, method: str, args) -> str:
        """Why no shipped table serves ``method`` for this run, and what to do instead."""
        return (f"no published {method} table for --task {args.task}; calibrate one with magcache_generate.py "
                f"--magcache_calibration and pass the file with --cache_profile")

    def add_easycache_flags(self, group) -> None:
        group.add_argument("--thresh", type=float, default=0.05,
                           help="accumulated transformation-rate budget, a fraction: 0.05 is 5%% (default 0.05)")
        group.add_argument("--ret_steps", type=int, default=10,
                           help="steps always computed at the start (default 10; honoured here, unlike in the "
                                "published script, which hard-codes 10)")
        group.add_argument("--alpha", type=float, default=EASYCACHE_UNUSED["alpha"],
                           help="parsed by the published script but never used; only the default is accepted")
        group.add_argument("--beta", type=float, default=EASYCACHE_UNUSED["beta"],
                           help="parsed by the published script but never used; only the default is accepted")
        group.add_argument("--start_idx", type=int, default=0, help="accepted for compatibility; unused")
        group.add_argument("--end_idx", type=int, default=946, help="accepted for compatibility; unused")
        group.add_argument("--out_dir", type=str, default="./output", help="accepted for compatibility; unused "
                                                                          "(stats go next to the video)")

    def easycache_params(self, ours, args, notes: list[str]) -> dict[str, Any]:
        _check_easycache_leftovers(ours, notes)
        return {"thresh": ours.thresh, "warmup_steps": ours.ret_steps}

    def check_inputs(self, args) -> None:
        """Inputs upstream would otherwise replace by its example files, or fail on after loading the models."""
        kind = task_kind(args.task)
        if kind == "i2v":
            _need_file(args, "image", f"--task {args.task} needs --image PATH (the first frame of the video)")
        if kind == "flf2v":
            for flag in ("first_frame", "last_frame"):
                _need_file(args, flag, f"--task {args.task} needs --{flag} PATH")

    def checkpoint_files(self, args, cfg) -> list[tuple[str, str, Any]]:
        """(what, file under --ckpt_dir, test) for every file upstream's sampler opens, in its order, DiT last."""
        needed = [("the T5 checkpoint", cfg.t5_checkpoint, os.path.isfile),
                  ("the T5 tokenizer folder", cfg.t5_tokenizer, os.path.isdir),
                  ("the VAE checkpoint", cfg.vae_checkpoint, os.path.isfile)]
        if self.uses_clip(args.task):
            needed += [("the CLIP checkpoint", cfg.clip_checkpoint, os.path.isfile),
                       ("the CLIP tokenizer folder", cfg.clip_tokenizer, os.path.isdir)]
        return needed

    def uses_clip(self, task: str) -> bool:
        """Whether upstream's sampler for ``task`` loads the CLIP image encoder (Wan2.1's I2V and FLF2V)."""
        return task_kind(task) in ("i2v", "flf2v")

    def dit_folders(self, args, cfg) -> list[str]:
        """The folders under --ckpt_dir that hold a DiT (config.json and weights): the root for Wan2.1."""
        return [""]

    def check_calibration(self, args, upstream) -> None:
        """What --magcache_calibration needs of this run, checked before anything loads (nothing for Wan2.1)."""

    def attach(self, sampler, plan: Plan):
        from .official import attach
        return attach(sampler, plan.method, plan.profile, plan.params, calibrate=plan.calibrate,
                      storage=plan.storage)

    def calibrated_model(self, args, kind: str, height: int, width: int, attachment) -> dict[str, Any]:
        """The ``model`` section of a profile calibrated by --magcache_calibration."""
        return {"family": self.family, "task": kind, "resolution": [height, width],
                "config": model_config(attachment.model), "classes": ["WanTransformer3DModel", "WanModel"]}


def _need_file(args, flag: str, missing: str) -> None:
    value = getattr(args, flag, None)
    if not value:
        raise PlanError(missing)
    if not os.path.isfile(value):
        raise PlanError(f"--{flag} {value!r} does not exist")


# ------------------------------------------------------------------------------------------------------- flags
def build_parser(method: str, repo: WanRepo | None = None) -> argparse.ArgumentParser:
    """The cache flags of one script. Upstream's parser gets everything else."""
    repo = repo or WAN21
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    parser = argparse.ArgumentParser(prog=f"{method}_generate.py", add_help=False, allow_abbrev=False,
                                     description=f"{method} options (stepcache)")
    group = parser.add_argument_group(f"{method} (stepcache; names and defaults as in the published script)")
    if method == "magcache":
        d = repo.magcache_defaults
        group.add_argument("--magcache_thresh", type=float, default=d["thresh"],
                           help=f"the upper bound of the accumulated magnitude error (default {d['thresh']})")
        group.add_argument("--retention_ratio", type=float, default=d["retention_ratio"],
                           help=f"fraction of the passes always computed{repo.magcache_help_extra} (default "
                                f"{d['retention_ratio']})")
        group.add_argument("--magcache_K", type=int, default=d["K"],
                           help=f"at most this many passes in a row reuse the cache (default {d['K']})")
        group.add_argument("--use_magcache", action="store_true", default=False,
                           help="use MagCache (without it and without --magcache_calibration the run is uncached)")
        group.add_argument("--magcache_calibration", action="store_true", default=False,
                           help="run uncached, measure the magnitude ratios and write them as a profile file "
                                "(see --calibration_file) for --cache_profile")
        group.add_argument("--calibration_file", default=None, metavar="PATH",
                           help="where --magcache_calibration writes the profile (.json; default: next to the "
                                "video, <video>.magcache-profile.json)")
    elif method == "teacache":
        group.add_argument("--teacache_thresh", type=float, default=0.2,
                           help="accumulated rescaled relative-L1 budget (default 0.2; the published tables list "
                                "values per model)")
        group.add_argument("--use_ret_steps", action="store_true", default=False,
                           help="the published retention-steps variant: e0 as signal, 5 warm-up steps, no forced "
                                "last step")
    else:
        repo.add_easycache_flags(group)
    group.add_argument("--cache_predict", choices=PREDICTIONS, default=None,
                       help=f"stepcache option, any method: {PREDICT_HELP}")
    add_storage_arguments(group, sep="_")
    if repo.has_experts:
        group.add_argument("--cache_experts", choices=EXPERT_STATES, default=None,
                           help=f"stepcache option, any method: {EXPERTS_HELP}")
    group.add_argument("--cache_profile", default=None, metavar="NAME_OR_FILE",
                       help="a shipped profile name (`stepcache profiles`) or a profile file, e.g. one written by "
                            "--magcache_calibration (default: chosen from --task and --size)")
    group.add_argument("--cache_preset", default=None, metavar="NAME",
                       help="a named setting of the profile in place of the method's flags above, e.g. a preset "
                            "written by `stepcache tune` (2x, 3x) or a published one (`stepcache schedule --profile "
                            "P --list-presets` lists them); not with those flags")
    group.add_argument("--cache_stats", default=None, metavar="PATH",
                       help="where to write the run's stats as JSON (default: next to the video, "
                            "<video>.stats.json)")
    return parser


def split_argv(method: str, argv: list[str], repo: WanRepo | None = None) -> tuple[argparse.Namespace, list[str]]:
    """(cache flags, the rest for upstream's parser). Only exact flag names are taken (no abbreviations), so
    upstream's flags and their abbreviations reach upstream's parser untouched."""
    parser = build_parser(method, repo)
    try:
        ours, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # a cache flag with a malformed value; argparse printed why
        raise PlanError("invalid cache flag value (see above)") from exc
    ours.given = {action.dest for action in parser._actions for token in argv
                  if any(token == flag or token.startswith(flag + "=") for flag in action.option_strings)}
    return ours, rest


# ------------------------------------------------------------------------------------------------------- plan
@dataclass
class Plan:
    method: str | None
    profile: Profile | None
    params: dict[str, Any]
    calibrate: bool = False
    base_profile: Profile | None = None  # the shipped profile a calibrated file copies its other tables from
    notes: list[str] = field(default_factory=list)
    stats_path: str | None = None
    calibration_file: str | None = None
    storage: CacheStorage = field(default_factory=CacheStorage)


def task_kind(task: str) -> str:
    kind = task.split("-")[0]
    return "t2v" if kind == "t2i" else kind  # t2i-14B is the T2V-14B model run for one frame


def model_tag(task: str) -> str:
    return task.split("-", 1)[1].lower() if "-" in task else task.lower()


def expected_config(task: str, wan_configs, repo: WanRepo | None = None) -> dict[str, Any]:
    """What a profile for ``task`` must have been measured on, from upstream's config for the task."""
    repo = repo or WAN21
    cfg = wan_configs[task]
    return {"num_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "in_channels": repo.in_channels(repo.task_kind(task))}


def pixel_size(size: str, size_configs) -> tuple[int, int]:
    width, height = size_configs[size]
    return height, width


def _nearest(names: list[str], height: int, width: int) -> Profile:
    profiles = [load_profile(n) for n in names]
    return min(profiles, key=lambda p: abs(p.resolution[0] * p.resolution[1] - height * width))


def check_profile_fits(profile: Profile, task: str, wan_configs, repo: WanRepo | None = None,
                       image: bool = False) -> None:
    repo = repo or WAN21
    model = profile.data.get("model", {})
    if profile.family and profile.family != repo.family:
        raise PlanError(f"--cache_profile {profile.name!r} is for {profile.family!r} models, not {repo.name}")
    kind, theirs = repo.profile_task(task, image), model.get("task")
    if theirs and theirs != kind:
        raise PlanError(f"--cache_profile {profile.name!r} was measured on a {repo.name} {theirs.upper()} model, but "
                        f"--task {task} runs {kind.upper()}; use a {kind.upper()} profile (default for this task: "
                        f"leave --cache_profile out) or calibrate one with magcache_generate.py "
                        f"--magcache_calibration")
    wanted = expected_config(task, wan_configs, repo)
    wrong = {k: (v, wanted[k]) for k, v in model.get("config", {}).items() if k in wanted and wanted[k] != v}
    if wrong:
        detail = ", ".join(f"{k}={a} (--task {task} has {b})" for k, (a, b) in wrong.items())
        raise PlanError(f"--cache_profile {profile.name!r} was measured on another model: {detail}")


def make_plan(method: str, ours: argparse.Namespace, args: argparse.Namespace, upstream,
              repo: WanRepo | None = None) -> Plan:
    """Check every cache flag against upstream's parsed ``args``; nothing is loaded. Raises :class:`PlanError`."""
    repo = repo or WAN21
    notes: list[str] = []
    active, calibrate = _which_run(method, ours, notes)
    uncached = repo.uncached_task(args.task)
    if uncached and (active or calibrate):
        raise PlanError(uncached)
    _check_inputs(args, ours, needs_steps=bool(active or calibrate), repo=repo)
    base = None if uncached else repo.default_profile(args, upstream)
    profile = _choose_profile(active, ours, args, base, upstream, notes, repo) if active else None
    params = _method_params(method, active, ours, profile, args, notes, repo) if active else {}
    try:
        storage = storage_of_args(ours)
    except ParameterError as exc:
        raise PlanError(str(exc)) from exc
    if calibrate:
        repo.check_calibration(args, upstream)
        notes.append("--magcache_calibration: running uncached and measuring the magnitude ratio of successive "
                     "block-stack residuals per CFG branch and step")
    return Plan(active, profile, params, calibrate, base, notes, ours.cache_stats,
                getattr(ours, "calibration_file", None), storage)


def _which_run(method: str, ours, notes: list[str]) -> tuple[str | None, bool]:
    """(the method this run caches with, or None; whether it calibrates) from the method's own flags."""
    calibrate = method == "magcache" and ours.magcache_calibration
    if method != "magcache":
        return method, False
    if ours.use_magcache and calibrate:
        raise PlanError("--use_magcache and --magcache_calibration exclude each other: calibrate first (an "
                        "uncached run that writes a profile), then run --use_magcache --cache_profile FILE")
    if ours.calibration_file and not calibrate:
        raise PlanError("--calibration_file is where --magcache_calibration writes its profile; add "
                        "--magcache_calibration, or use a calibrated file with --cache_profile")
    if calibrate and ours.cache_profile:
        raise PlanError("--magcache_calibration measures a new table and does not read --cache_profile; name "
                        "the file it writes with --calibration_file")
    if ours.use_magcache:
        return method, calibrate
    if ours.cache_profile and not calibrate:
        raise PlanError("--cache_profile has no effect without --use_magcache; add --use_magcache")
    for flag in ("cache_predict", "cache_experts", *STORAGE_FLAGS):  # calibration runs uncached too
        if getattr(ours, flag, None) is not None:
            raise PlanError(f"--{flag} has no effect without --use_magcache; add --use_magcache")
    if not calibrate:
        notes.append("neither --use_magcache nor --magcache_calibration: this run is uncached (as with the "
                     "published script); its DiT time is still reported")
    return None, calibrate


def _check_inputs(args, ours, needs_steps: bool, repo: WanRepo) -> None:
    repo.check_inputs(args)
    if needs_steps and (args.sample_steps is None or args.sample_steps < 2):
        raise PlanError(f"--sample_steps {args.sample_steps} is too few; caching needs at least 2 steps")
    for flag in ("cache_stats", "calibration_file"):
        value = getattr(ours, flag, None)
        if value and not value.endswith(".json"):
            raise PlanError(f"--{flag} {value!r} must be a .json file")


def _choose_profile(active: str, ours, args, base: Profile | None, upstream, notes: list[str],
                    repo: WanRepo) -> Profile:
    """--cache_profile, else the published table for --task and --size; notes where it was measured elsewhere."""
    task = args.task
    if ours.cache_profile:
        try:
            profile = load_profile(ours.cache_profile)
        except ProfileError as exc:
            raise PlanError(f"--cache_profile: {exc}") from exc
        check_profile_fits(profile, task, upstream.WAN_CONFIGS, repo, bool(getattr(args, "image", None)))
        if not profile.has(active):
            have = [m for m in METHODS if profile.has(m)]
            raise PlanError(f"--cache_profile {profile.name!r} has no {active} table (it has: "
                            f"{', '.join(have) or 'none'})")
    elif base is None or not base.has(active):
        raise PlanError(repo.no_table(active, args))
    else:
        profile = base
        if task.startswith("t2i"):
            notes.append(f"--task {task} runs the T2V-14B model for one frame; profile {profile.name} was "
                         f"measured on videos")
    height, width = pixel_size(args.size, upstream.SIZE_CONFIGS)
    if profile.resolution:
        ph, pw = profile.resolution
        if ph * pw != height * width:
            notes.append(f"profile {profile.name} was measured at {pw}*{ph}; this run is {width}*{height}")
    return profile


def _check_easycache_leftovers(ours, notes: list[str]) -> None:
    """Flags the published EasyCache script parses: refused where they would change nothing, noted otherwise."""
    for flag, default in EASYCACHE_UNUSED.items():
        if getattr(ours, flag) != default:
            raise PlanError(f"--{flag} is parsed but never used by the published EasyCache code, and stepcache "
                            f"does not implement it; leave it out")
    if (ours.start_idx, ours.end_idx, ours.out_dir) != (0, 946, "./output"):
        notes.append("--start_idx, --end_idx and --out_dir are accepted for compatibility and unused")


# Flags that are not a method's setting: they may come with --cache_preset.
NOT_SETTINGS = {"use_magcache", "magcache_calibration", "calibration_file", "cache_predict", "cache_experts",
                *STORAGE_FLAGS,
                "cache_profile", "cache_preset", "cache_stats", "start_idx", "end_idx", "out_dir"}


def _method_params(method: str, active: str, ours, profile: Profile, args, notes: list[str],
                   repo: WanRepo) -> dict:
    steps = args.sample_steps
    preset = getattr(ours, "cache_preset", None)
    if preset is not None:
        settings = sorted(getattr(ours, "given", set()) - NOT_SETTINGS)
        if settings:
            raise PlanError(f"--cache_preset {preset!r} sets the method's settings; leave out "
                            f"{', '.join('--' + s for s in settings)} (or the preset)")
        params = {}
    elif method == "magcache":
        params = {"thresh": ours.magcache_thresh, "K": ours.magcache_K, "retention_ratio": ours.retention_ratio}
    elif method == "teacache":
        params = {"thresh": ours.teacache_thresh, "variant": "use_ret_steps" if ours.use_ret_steps else "default"}
    else:
        params = repo.easycache_params(ours, args, notes)
    if method == "easycache" and preset is None and ours.ret_steps >= steps:
        raise PlanError(f"--ret_steps {ours.ret_steps} covers all {steps} sampling steps, so nothing could be "
                        f"reused; use fewer than --sample_steps")
    if ours.cache_predict is not None:
        params["predict"] = ours.cache_predict
    if getattr(ours, "cache_experts", None) is not None:
        if not repo.runs_experts(args.task):
            raise PlanError(f"--cache_experts applies to the two-expert tasks; --task {args.task} runs one model")
        params["experts"] = ours.cache_experts
    try:
        config = resolve_method(active, profile, preset, **params)
        config.spec.validate(config, steps)
    except (ParameterError, ProfileError) as exc:
        raise PlanError(f"{'--cache_preset' if preset else _flag_names(method)}: {exc}") from exc
    if preset is not None:
        params = {k: v for k, v in config.params.items() if k != "coefficients"}
    if active == "magcache":
        table_steps = int(profile.method("magcache")["steps"])
        if table_steps != steps:
            notes.append(f"profile {profile.name}'s MagCache table has {table_steps} steps; this run has {steps}: "
                         f"resampled per branch by {config.params['resample']!r} (the reference uses 'nearest'; "
                         f"'compose', the default, predicted measured tables better on the demo model). For an "
                         f"exact table run magcache_generate.py --magcache_calibration --sample_steps {steps}")
    return params


def _flag_names(method: str) -> str:
    return {"magcache": "--magcache_thresh/--magcache_K/--retention_ratio", "teacache": "--teacache_thresh",
            "easycache": "--thresh/--ret_steps"}[method]


# ------------------------------------------------------------------------------------------------------ running
def import_upstream(name: str = "generate", repo: WanRepo | None = None):
    """Upstream's ``generate.py``: this script must sit next to it, in the root of a checkout of ``repo``."""
    repo = repo or WAN21
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        missing = getattr(exc, "name", None)
        if missing == name:
            raise PlanError(f"upstream {repo.name}'s generate.py is not importable: copy this script into the root "
                            f"of a {repo.github} checkout and run it from there") from exc
        if missing:
            package = PIP_NAMES.get(missing.split(".")[0], missing.split(".")[0])
            raise PlanError(f"upstream {repo.name} needs the Python module {missing!r}, which is not installed: pip "
                            f"install {package} (or pip install -r requirements.txt in the {repo.name} "
                            f"checkout)") from exc
        raise PlanError(f"upstream {repo.name}'s generate.py cannot be imported: {exc}") from exc
    if not all(hasattr(module, n) for n in ("_parse_args", "generate", "wan", "WAN_CONFIGS", "SIZE_CONFIGS")):
        raise PlanError(f"{getattr(module, '__file__', name)} is not upstream {repo.name}'s generate.py: copy this "
                        f"script into the root of a {repo.github} checkout")
    # Upstream's generate.py runs warnings.filterwarnings('ignore') when imported; stepcache's own warnings (a run
    # that cached nothing, a profile measured on another model) must still reach the user.
    warnings.filterwarnings("always", category=StepcacheWarning)
    missing_samplers = [n for n in repo.samplers if not hasattr(module.wan, n)]
    if missing_samplers:
        raise PlanError(f"{getattr(module, '__file__', name)} is not upstream {repo.name}'s generate.py (its wan "
                        f"package has no {', '.join(missing_samplers)}): use the drop-in scripts of this repository's "
                        f"version, or copy these into a {repo.github} checkout")
    return module


def upstream_args(upstream, prog: str, rest: list[str]) -> argparse.Namespace:
    """Upstream's parser and checks, on everything that is not a cache flag (upstream reads sys.argv)."""
    saved = sys.argv
    sys.argv = [prog] + list(rest)
    try:
        return upstream._parse_args()
    except AssertionError as exc:
        raise PlanError(str(exc) or "upstream rejected the arguments") from exc
    finally:
        sys.argv = saved


def check_checkpoints(args: argparse.Namespace, upstream, repo: WanRepo | None = None) -> None:
    """Every file upstream's sampler constructor opens for ``--task`` exists under ``--ckpt_dir``, in the order
    it opens them (``WanT2V/WanI2V/WanFLF2V/WanVace.__init__``: T5 and its tokenizer, the VAE, CLIP and its
    tokenizer for I2V/FLF2V, then the DiT through ``from_pretrained(ckpt_dir)``), named by upstream's config for
    the task. Upstream builds umt5-xxl before it opens the first of them."""
    repo = repo or WAN21
    root = args.ckpt_dir
    if not os.path.isdir(root):
        what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
        raise PlanError(f"--ckpt_dir {root!r} {what}; give the folder of the downloaded --task {args.task} "
                        f"checkpoint")
    cfg = upstream.WAN_CONFIGS[args.task]
    needed = repo.checkpoint_files(args, cfg)
    for what, name, exists in needed:
        if not exists(os.path.join(root, name)):
            raise PlanError(f"--ckpt_dir {root!r} has no {name} ({what} upstream loads for --task {args.task})")
    for folder in repo.dit_folders(args, cfg):
        _check_dit_folder(root, folder, args.task)


def _check_dit_folder(root: str, folder: str, task: str) -> None:
    """A DiT that diffusers' ``from_pretrained`` can load from ``root/folder``: its config and every weight file."""
    where = os.path.join(root, folder) if folder else root
    shown = f"{folder}/" if folder else ""
    if not os.path.isfile(os.path.join(where, "config.json")):
        raise PlanError(f"--ckpt_dir {root!r} has no {shown}config.json (the DiT config upstream loads for --task "
                        f"{task})")
    weights = [n for n in DIT_WEIGHTS if os.path.isfile(os.path.join(where, n))]
    if not weights:
        raise PlanError(f"--ckpt_dir {root!r} has no DiT weights ({shown}{DIT_WEIGHTS[0]} or {shown}{DIT_WEIGHTS[1]}) "
                        f"for --task {task}")
    if weights[0].endswith(".index.json"):
        index = os.path.join(where, weights[0])
        try:
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise PlanError(f"--ckpt_dir {root!r}: {shown}{weights[0]} is not a weight index ({exc})") from exc
        absent = [n for n in shards if not os.path.isfile(os.path.join(where, n))]
        if absent:
            raise PlanError(f"--ckpt_dir {root!r} has no {shown}{absent[0]} (a DiT shard listed in {weights[0]}"
                            f"{f', and {len(absent) - 1} more' if len(absent) > 1 else ''})")


def output_paths(args: argparse.Namespace, plan: Plan) -> tuple[str | None, str | None]:
    """(stats file, calibration file) this run will write, from the flags; None where upstream names the video
    (no --save_file) and the path follows from that name."""
    video = getattr(args, "save_file", None)
    stem = os.path.splitext(video)[0] if video else None
    stats = plan.stats_path or (stem + ".stats.json" if stem else None)
    calibration = None
    if plan.calibrate:
        calibration = plan.calibration_file or (stem + ".magcache-profile.json" if stem else None)
    return stats, calibration


def check_outputs(args: argparse.Namespace, plan: Plan) -> None:
    """Every output path can be written, before anything is loaded; nothing is created."""
    video = getattr(args, "save_file", None)
    if video:
        check_output_file(video, "--save_file", IMAGE_SUFFIXES if task_kind(args.task) == "t2i" else VIDEO_SUFFIXES)
    else:  # upstream names the file itself, in the current folder
        check_output_dir(os.getcwd(), "--save_file (not given: upstream saves in the current folder)")
    stats, calibration = output_paths(args, plan)
    if stats:
        check_output_file(stats, "--cache_stats", (".json",))
    if calibration:
        check_output_file(calibration, "--calibration_file", (".json",))


class Session:
    """One run of upstream's generate(): installs the plan on each sampler upstream builds, then reports."""

    def __init__(self, method: str, plan: Plan, args: argparse.Namespace, upstream, repo: WanRepo | None = None):
        self.repo = repo or WAN21
        self.script = method
        self.plan = plan
        self.args = args
        self.upstream = upstream
        self.attachments: list[Any] = []

    @contextlib.contextmanager
    def installed(self):
        """Upstream's generate() builds its sampler with ``wan.WanT2V(...)`` etc.; for the run those names return
        the very same sampler, with the cache attached to that instance. Its ``cache_video`` / ``cache_image``
        write to a temporary name that is moved into place only when the file was written."""
        wan = self.upstream.wan
        saved = {name: wan.__dict__[name] for name in self.repo.samplers if name in wan.__dict__}
        savers = {name: getattr(self.upstream, name) for name in self.repo.savers
                  if callable(getattr(self.upstream, name, None))}
        for name, cls in saved.items():
            setattr(wan, name, self._builder(cls))
        for name, saver in savers.items():
            setattr(self.upstream, name, self._checked_saver(name, saver))
        try:
            yield self
        finally:
            for name, cls in saved.items():
                setattr(wan, name, cls)
            for name, saver in savers.items():
                setattr(self.upstream, name, saver)
            for attachment in self.attachments:
                attachment.remove()

    def _checked_saver(self, name: str, saver):
        """Upstream's saver, writing to a temporary name beside ``save_file``: on success (it returns the file
        name, where it returns one at all, and the file has content) the file takes its real name, else the run
        fails and nothing is left."""
        returns_name = self.repo.saver_returns_name

        @functools.wraps(saver)
        def save(tensor, save_file=None, *args, **kwargs):
            if not save_file:  # upstream always names the file; without one its savers pick a name in /tmp
                return saver(tensor, save_file, *args, **kwargs)
            target = save_file
            try:
                with atomic_path(target) as partial:
                    if saver(tensor, str(partial), *args, **kwargs) is None and returns_name:
                        raise VideoNotSavedError(f"upstream's {name} did not write {target!r} (its message is "
                                                 f"above); no video and no stats were written")
            except OSError as exc:
                raise VideoNotSavedError(f"upstream's {name} did not write {target!r}: {exc}; no video and no "
                                         f"stats were written") from exc
            return target
        return save

    def _builder(self, cls):
        @functools.wraps(cls, updated=())
        def build(*args, **kwargs):
            sampler = cls(*args, **kwargs)
            self.attach(sampler)
            return sampler
        return build

    def attach(self, sampler):
        attachment = self.repo.attach(sampler, self.plan)
        self.attachments.append(attachment)
        profile = self.plan.profile
        if profile is not None:
            have = model_config(attachment.model)
            wanted = profile.data.get("model", {}).get("config", {})
            wrong = {k: (v, have.get(k)) for k, v in wanted.items() if have.get(k) is not None and have[k] != v}
            if wrong:
                warnings.warn("stepcache: the checkpoint in --ckpt_dir is not the model profile "
                              f"{profile.name} was measured on: " +
                              ", ".join(f"{k}={b} (profile: {a})" for k, (a, b) in wrong.items()),
                              ProfileFitWarning, stacklevel=2)
        return attachment

    # --------------------------------------------------------------------------------------------- reporting
    def report(self) -> dict[str, Any] | None:
        if int(os.getenv("RANK", "0")) != 0 or not self.attachments or not self.attachments[-1].generations:
            return None
        attachment = self.attachments[-1]
        record = attachment.generations[-1]
        args, plan = self.args, self.plan
        video = getattr(args, "save_file", None)
        stats: dict[str, Any] = {
            "tool": f"stepcache {_version()}",
            "script": f"{self.script}_generate.py",
            "method": plan.method or ("magcache-calibration" if plan.calibrate else None),
            "profile": plan.profile.name if plan.profile else None,
            "profile_file": str(plan.profile.path) if plan.profile and plan.profile.path else None,
            "params": plan.params,
            "notes": plan.notes,
            "video": video,
            **{k: getattr(args, k, None) for k in ("task", "size", "frame_num", "sample_steps", "sample_solver",
                                                   "sample_shift", "sample_guide_scale", "base_seed")},
            "dit_seconds": record.dit_seconds,
            "dit_calls": record.dit_calls,
            "generate_seconds": record.generate_seconds,
        }
        if attachment.cached is not None:
            stats.update(attachment.cached.stats.to_dict())
            stats["method"] = plan.method
            summary = attachment.cached.stats.summary()
        else:
            stats.update({"computed_passes": record.dit_calls, "total_passes": record.dit_calls,
                          "ideal_speedup": 1.0, "pattern": "C" * record.dit_calls})
            summary = f"uncached: computed {record.dit_calls}/{record.dit_calls} passes"
        print(f"[stepcache] {summary}")
        print(f"[stepcache] DiT forward time {record.dit_seconds:.2f} s over {record.dit_calls} transformer calls "
              f"(generate() {record.generate_seconds:.2f} s)")
        path, calibration = output_paths(args, plan)
        if plan.calibrate:
            stats["calibration_file"] = self._write_calibration(attachment, record, calibration)
        if path:
            write_json(Path(path).expanduser(), stats, default=str)
            stats["stats_file"] = path
            print(f"[stepcache] stats written to {path}")
        return stats

    def _write_calibration(self, attachment, record, path: str | None) -> str:
        from ..calibration_io import calibrated_source, magcache_profile_data, measured_ratios, write_profile
        args, plan = self.args, self.plan
        branches, steps, ratios = measured_ratios(attachment.calibration.runner)
        height, width = record.pixel_size
        repo = self.repo
        kind = repo.task_kind(args.task)
        base = plan.base_profile
        base_mag = base.data.get("magcache") if base is not None and base.has("magcache") else None
        defaults = dict(base_mag.get("defaults", MAGCACHE_CLI_DEFAULTS)) if base_mag else dict(MAGCACHE_CLI_DEFAULTS)
        device = _device_name(attachment.model)
        data = magcache_profile_data(
            name=f"{repo.family}-{kind}-{model_tag(args.task)}-{height}x{width}-{steps}steps-calibrated",
            description=f"{repo.name} {args.task}: MagCache table calibrated at {width}*{height}, {args.frame_num} "
                        f"frames, {steps} steps ({args.sample_solver}, shift {args.sample_shift})",
            model=repo.calibrated_model(args, kind, height, width, attachment),
            recorder_or_ratios=ratios, branches=branches, steps=steps,
            source=calibrated_source(where=device), defaults=defaults,
            presets=base_mag.get("presets") if base_mag else None, base=base,
            measured_on={**{k: getattr(args, k, None) for k in (
                "task", "size", "frame_num", "sample_steps", "sample_solver", "sample_shift", "sample_guide_scale",
                "base_seed", "prompt", "image", "ulysses_size", "ring_size", "dit_fsdp")},
                "ckpt_dir": os.path.basename(os.path.normpath(args.ckpt_dir)) if args.ckpt_dir else None,
                "pixel_size": [height, width], "device": device,
                "world_size": int(os.getenv("WORLD_SIZE", "1")),
                "upstream": _upstream_commit(self.upstream)})
        path = path or f"{data['name']}.json"
        profile = write_profile(path, data)
        print(f"[stepcache] wrote MagCache profile {profile.name} ({steps} steps x {len(branches)} branches) to "
              f"{path}\n[stepcache] use it with: python magcache_generate.py ... --use_magcache --cache_profile "
              f"{path}")
        return path


def _device_name(model) -> str:
    import torch
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return "unknown"
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def _upstream_commit(upstream) -> str | None:
    root = os.path.dirname(os.path.abspath(getattr(upstream, "__file__", "") or "."))
    try:
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _version() -> str:
    from .. import __version__
    return __version__


def main(method: str, argv: list[str] | None = None, upstream=None, repo: WanRepo | None = None) -> int:
    """Run one script: ``method`` is the script's method; ``argv`` defaults to ``sys.argv[1:]``. Returns the exit
    status: 0; 2 after one line for bad input; 1 after one line when upstream did not write the video."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"{method}_generate.py"
    return run_cli(lambda: _run(method, argv, upstream, prog, repo or WAN21), prog)


def _run(method: str, argv: list[str], upstream, prog: str, repo: WanRepo) -> int:
    upstream = upstream or import_upstream(repo=repo)
    if "-h" in argv or "--help" in argv:
        try:
            upstream_args(upstream, prog, ["-h"])
        except SystemExit:
            pass
        print()
        print(build_parser(method, repo).format_help())
        return 0
    ours, rest = split_argv(method, argv, repo)
    args = upstream_args(upstream, prog, rest)
    plan = make_plan(method, ours, args, upstream, repo)
    check_checkpoints(args, upstream, repo)
    check_outputs(args, plan)
    for note in plan.notes:
        print(f"[stepcache] note: {note}")
    if plan.method:
        print(f"[stepcache] {plan.method} on profile {plan.profile.name}: "
              + ", ".join(f"{k}={v}" for k, v in plan.params.items()))
    session = Session(method, plan, args, upstream, repo)
    with session.installed():
        try:
            upstream.generate(args)
            if int(os.getenv("RANK", "0")) == 0 and args.save_file and not os.path.isfile(args.save_file):
                raise VideoNotSavedError(f"upstream's generate() finished but {args.save_file!r} does not exist; "
                                         f"no stats were written")
        except VideoNotSavedError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            return EXIT_NOT_SAVED
        session.report()
    return 0


def run_script(method: str, repo: WanRepo | None = None) -> None:
    """Entry point of the drop-in scripts (the one name every family's drop-ins call)."""
    sys.exit(main(method, repo=repo))


WAN21 = WanRepo()

