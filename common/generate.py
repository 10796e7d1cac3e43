"""`stepcache generate`: run a diffusers Wan2.1 or HunyuanVideo pipeline from a local folder with a cache method.

Everything the user typed is checked before the model loads: the pipeline class and the transformer config are
read from the folder's JSON files, the profile is resolved against them, and the method's parameters are
validated. Then the pipeline runs (with its own progress bar), the video is written, and the stats are printed
and written next to it, with a ``manifest.json`` entry that ``stepcache compare`` reads for speedups.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

from . import families
from .cliargs import int_at_least
from .errors import InputError
from .outputs import atomic_path, check_output_file, write_json
from .timing import DiTTimer
from .methods import EXPERTS_HELP, PARAMETERS, PREDICT_HELP, PREDICTIONS, resolve_method
from .policies import ParameterError
from .profiles import FOLDER_PROFILE, ProfileError, choose_by_resolution, load_profile, match_profiles, warn_resolution
from .schema import EXPERT_STATES
from .storage import add_storage_arguments, storage_of_args

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VIDEO_SUFFIXES = (".mp4",)  # what diffusers' export_to_video writes


class GenerateError(InputError):
    pass


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="diffusers pipeline: a local folder (with model_index.json) "
                                                        "or a Hugging Face Hub id such as "
                                                        "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (fetched into its cache)")
    parser.add_argument("--method", default="magcache", choices=["none", "teacache", "magcache", "easycache"],
                        help="cache method; 'none' runs the uncached baseline (default: magcache)")
    parser.add_argument("--profile", default=None,
                        help=f"shipped profile name or profile file (default: the folder's {FOLDER_PROFILE} if it "
                             f"has one, else matched on the model's config)")
    parser.add_argument("--preset", default=None, help="a named setting of the profile, e.g. E012K4R02")
    parser.add_argument("--thresh", type=float, default=None, help="the method's threshold; 0 disables reuse")
    parser.add_argument("--K", type=int, default=None, help="MagCache: " + PARAMETERS["magcache"]["K"])
    parser.add_argument("--retention-ratio", type=float, default=None,
                        help="MagCache: " + PARAMETERS["magcache"]["retention_ratio"])
    parser.add_argument("--variant", default=None, help="TeaCache: " + PARAMETERS["teacache"]["variant"])
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="TeaCache/EasyCache: steps always computed at the start")
    parser.add_argument("--clamp-polynomial", action="store_true", default=None,
                        help="TeaCache: " + PARAMETERS["teacache"]["clamp_polynomial"])
    parser.add_argument("--predict", default=None, choices=PREDICTIONS, help=PREDICT_HELP)
    parser.add_argument("--experts", default=None, choices=EXPERT_STATES, help=EXPERTS_HELP)
    add_storage_arguments(parser)
    parser.add_argument("--prompt", required=True, help="text prompt")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (CFG branch)")
    parser.add_argument("--image", default=None, help="first frame, for image-to-video pipelines")
    add_size_arguments(parser, "denoising steps")
    per_pipeline = "; ".join(f"{name}: {spec.guidance_help} (default "
                             f"{'its guider' + chr(39) + 's own' if spec.guider else format(spec.guidance, 'g')})"
                             for name, (_, spec) in families.pipelines().items())
    parser.add_argument("--guidance", type=float, default=None, help=f"guidance scale; per pipeline: {per_pipeline}")
    parser.add_argument("--true-cfg", type=float, default=1.0,
                        help="HunyuanVideo only: true CFG scale (> 1 runs a second, negative branch)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--fps", type=int, default=16, help="frames per second of the written video")
    parser.add_argument("--out", default="out/video.mp4", help="output video path (default out/video.mp4)")


# The commands' sizes where a pipeline declares none of its own (families.Pipeline.defaults).
SIZE_DEFAULTS = {"height": 480, "width": 832, "frames": 81, "steps": 50, "dtype": "bf16"}


def add_size_arguments(parser, steps_help: str | None) -> None:
    """--height, --width, --frames, --steps (unless ``steps_help`` is None: the command has its own), --dtype and
    --device of every command that runs a pipeline folder; an omitted size is the pipeline's own
    (:func:`apply_pipeline_defaults`)."""
    d = SIZE_DEFAULTS
    parser.add_argument("--height", type=int, default=None, help=f"video height in pixels (default {d['height']}, "
                                                                  f"or the pipeline's own)")
    parser.add_argument("--width", type=int, default=None, help=f"video width in pixels (default {d['width']}, or "
                                                                 f"the pipeline's own)")
    parser.add_argument("--frames", type=int, default=None, help=f"number of frames (default {d['frames']}, or the "
                                                                  f"pipeline's own)")
    if steps_help is not None:
        parser.add_argument("--steps", type=int_at_least(2), default=None,
                            help=f"{steps_help} (default {d['steps']}, or the pipeline's own)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help=f"transformer dtype (default {d['dtype']}, or the pipeline's own)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'")


def apply_pipeline_defaults(args, spec, error: type[InputError] = InputError) -> None:
    """Fill the sizes the command line left out: the pipeline's own (the demo's 32x32), else the commands'
    (``spec`` None: a model without a pipeline spec). A pipeline that sizes the video from its first frame refuses
    --height/--width (``error``, one line) rather than ignore them."""
    if spec is not None and spec.size_from_image:
        given = [f"--{k}" for k in ("height", "width") if getattr(args, k, None) is not None]
        if given:
            raise error(f"{' and '.join(given)}: this pipeline sizes the video from --image (its aspect ratio at the "
                        f"model's own resolution); leave them out")
    for key, value in {**SIZE_DEFAULTS, **(spec.defaults if spec is not None else {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def _method_params(args) -> dict[str, Any]:
    given = {"thresh": args.thresh, "K": args.K, "retention_ratio": args.retention_ratio, "variant": args.variant,
             "warmup_steps": args.warmup_steps, "clamp_polynomial": args.clamp_polynomial,
             "predict": args.predict, "experts": args.experts}
    allowed = PARAMETERS[args.method]
    wrong = [k for k, v in given.items() if v is not None and k not in allowed]
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        raise ParameterError(f"{flags} do(es) not apply to {args.method}; its parameters: {', '.join(allowed)}")
    return {k: v for k, v in given.items() if v is not None}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerateError(f"cannot read {path}: {exc}") from exc


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what checking a Hub pipeline needs before its weights are fetched: its index, its components' configs, and a
# profile it carries
HUB_CONFIGS = ["model_index.json", "*/config.json", FOLDER_PROFILE]


def pipeline_folder(text: str, error=GenerateError, flag: str = "--model", full: bool = True) -> Path:
    """The local folder of a pipeline given as a folder or as a Hugging Face Hub id (``org/name``). A Hub pipeline
    is fetched into the Hub's cache: its configs only when ``full`` is False (enough to check every flag before
    gigabytes of weights move), then everything; a cached copy is used offline (``HF_HUB_OFFLINE=1``)."""
    path = Path(text)
    if path.exists() or not HUB_ID.match(text):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise error(f"{flag} {text!r} is not a local folder, and fetching it from the Hugging Face Hub needs "
                    f"huggingface_hub (pip install huggingface_hub)") from None
    if full:
        print(f"stepcache: fetching {text} from the Hugging Face Hub into its cache (the whole pipeline; a cached "
              f"copy is reused)", flush=True)
    try:
        return Path(snapshot_download(text, allow_patterns=None if full else HUB_CONFIGS))
    except Exception as exc:  # offline without a cached copy, a wrong id, no access: all say the same to a user
        first = (str(exc).splitlines() or [""])[0][:300]
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise error(f"{flag} {text!r} is not a local folder, and the Hugging Face Hub has no such pipeline that can "
                    f"be fetched{offline}: {type(exc).__name__}: {first}") from None


def pipeline_of(folder: Path, error=GenerateError) -> tuple[str, Any, Any]:
    """(pipeline class, family, pipeline spec) of a local diffusers folder, from its model_index.json."""
    if not (folder / "model_index.json").exists():
        raise error(f"{folder} is not a diffusers pipeline folder (no model_index.json)")
    pipeline_class = _read_json(folder / "model_index.json").get("_class_name")
    known = families.pipelines()
    # A pipeline class whose code ships in the folder is named [module, class]; stepcache runs a known one through
    # its family's loader, with its own copy of the code (nothing in the folder runs).
    custom = isinstance(pipeline_class, list) and len(pipeline_class) == 2
    name = pipeline_class[1] if custom else pipeline_class
    if not isinstance(name, str) or name not in known or custom != known[name][1].ships_code:
        raise error(f"unsupported pipeline class {pipeline_class!r} in {folder}; supported: {', '.join(known)}")
    return (name, *known[name])


def resolve_device(text: str, error=GenerateError) -> str:
    """``--device``: 'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N', checked before any model loads."""
    import torch
    if text not in ("auto", "cpu") and not text.startswith("cuda"):
        raise error(f"--device {text!r} is not allowed; allowed: auto, cpu, cuda or cuda:N")
    if text.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {text}: this machine has no CUDA device (torch {torch.__version__}); use --device "
                    f"cpu or auto")
    return text if text != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def plan(args) -> dict[str, Any]:
    """Everything that can be checked without loading weights."""
    folder = pipeline_folder(args.model, full=False)
    pipeline_class, family_spec, spec = pipeline_of(folder)
    apply_pipeline_defaults(args, spec, GenerateError)
    family, transformer_class = family_spec.name, spec.transformer
    for name, value, low in (("--steps", args.steps, 2), ("--frames", args.frames, 1), ("--height", args.height, 16),
                             ("--width", args.width, 16)):
        if value < low:
            raise GenerateError(f"{name}={value} must be at least {low}")
    if args.height % 16 or args.width % 16:
        raise GenerateError(f"--height {args.height} and --width {args.width} must be multiples of 16")
    if spec.needs_image and not args.image:
        raise GenerateError("this is an image-to-video pipeline: pass --image FIRST_FRAME")
    if args.image and not Path(args.image).exists():
        raise GenerateError(f"--image {args.image} does not exist")
    check_output_file(args.out, "--out", VIDEO_SUFFIXES)
    result = {"pipeline_class": pipeline_class, "family": family, "spec": spec, "config": None,
              "device": resolve_device(args.device), "storage": storage_of_args(args)}
    if args.method == "none":
        if not result["storage"].default:
            raise GenerateError("--cache-dtype and --cache-device say where a cache keeps its residuals; --method "
                                "none runs uncached: leave them out")
        return result
    params = _method_params(args)
    if args.profile is not None:
        profile = load_profile(args.profile)
    elif (folder / FOLDER_PROFILE).is_file():
        profile = load_profile(str(folder / FOLDER_PROFILE))
        print(f"stepcache: profile {profile.name} from {folder / FOLDER_PROFILE} (the folder's own)")
    else:
        family, found = shipped_profiles(folder, pipeline_class, family, transformer_class)
        if not found:
            raise ProfileError(f"no shipped profile matches the transformer in {folder}; pass --profile NAME or a "
                               f"calibrated profile file (`stepcache calibrate`)")
        profile, warning = choose_by_resolution(found, args.height, args.width, args.method)
        warn_resolution(warning)
    result["config"] = resolve_method(args.method, profile, args.preset, **params)
    return result


def shipped_profiles(folder: Path, pipeline_class: str, family: str, transformer_class: str) -> tuple[str, list]:
    """(family, the shipped profiles that fit) for a pipeline folder, from its configs: a pipeline class two families
    share (WanPipeline for Wan2.1 and Wan2.2) goes to the family whose configuration it has."""
    config = _read_json(folder / "transformer" / "config.json")
    claimed = families.claim(pipeline_class, _read_json(folder / "model_index.json"), config)
    if claimed is not None:
        return claimed[0].name, [load_profile(name) for name in claimed[1]]
    return family, match_profiles(family, config, transformer_class)


def load_pipeline(folder: Path, pipeline_class: str, spec, dtype_name: str, device: str):
    """The pipeline in ``folder``, by its family's loader when it has one, else diffusers' ``from_pretrained``."""
    import diffusers
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    if spec.load:
        return families.load_object(spec.load)(folder, dtype, device)
    return getattr(diffusers, pipeline_class).from_pretrained(folder, dtype=dtype, local_files_only=True).to(device)


def generate(args) -> dict[str, Any]:
    import torch

    import stepcache
    from diffusers.utils import export_to_video, load_image

    checked = plan(args)
    device = checked["device"]
    pipe = load_pipeline(pipeline_folder(args.model), checked["pipeline_class"], checked["spec"], args.dtype, device)
    config = checked["config"]
    if config is not None:
        storage = checked["storage"]
        stepcache.enable(pipe, config.method, config.profile, preset=config.preset, cache_dtype=storage.dtype,
                         cache_device=storage.device, **{k: v for k, v in _method_params(args).items()})
        print(f"stepcache: {config.describe()}")
    call: dict[str, Any] = dict(prompt=args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames,
                                num_inference_steps=args.steps, output_type="np",
                                generator=torch.Generator(device="cpu").manual_seed(args.seed),
                                **checked["spec"].size_kwargs(args.height, args.width))
    call.update(checked["spec"].call_kwargs(args.guidance, args.true_cfg, pipe))
    if args.image:
        call["image"] = load_image(args.image)
    timer = DiTTimer(*[m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None])
    start = time.perf_counter()
    frames = pipe(**call).frames[0]
    seconds = time.perf_counter() - start
    timer.remove()
    out = Path(args.out)
    with atomic_path(out) as partial:
        export_to_video(list(frames), str(partial), fps=args.fps)
    record = {"video": out.name, "method": args.method, "seconds": seconds, "dit_seconds": timer.seconds,
              "params": {k: v for k, v in (config.params.items() if config else []) if k != "coefficients"},
              "profile": config.profile.name if config else None}
    if config is not None:
        run_stats = stepcache.stats(pipe)
        record.update(run_stats.to_dict())
        print(run_stats.summary())
    from .eval.manifest import record_video
    record_video(out.parent, out.name, method=args.method, params=record["params"], seconds=seconds,
                 dit_seconds=timer.seconds, computed_passes=record.get("computed_passes"),
                 total_passes=record.get("total_passes"))
    stats_path = out.with_suffix(".stats.json")
    write_json(stats_path, record)
    print(f"wrote {out} ({seconds:.1f} s, transformer {timer.seconds:.1f} s) and {stats_path}")
    return record


def run(args) -> int:
    generate(args)  # bad input raises an InputError: one line and exit 2 (stepcache.errors.run_cli)
    return 0
