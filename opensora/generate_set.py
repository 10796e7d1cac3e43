"""Generate a set of Open-Sora 1.2 videos (one per prompt and seed) with one cache method and setting, as the
published ``eval/{teacache,magcache}/experiments/opensora.py`` does, into a folder that ``stepcache compare``
can pair with the baseline's folder by file name (``{prompt}-{seed}.mp4``, as the published runs).

This is also the one implementation behind the drop-in scripts ``teacache_opensora.py``,
``magcache_opensora.py`` and ``easycache_opensora.py`` (the method fixed, everything else the same). A folder
holds one setting and resumes (videos move into place whole, then ``manifest.json`` records them); ``--num-gpus N``
runs VideoSys's sequence parallelism with the cache on every rank, and ``--shard k/N`` splits a set between
independent processes. Given no
argument at all, it runs the published comparison instead (:mod:`.comparison`), as the published
``python experiments/opensora.py`` does.

Design notes: docs/opensora.md#the-published-comparison-end-to-end
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, run_cli
from ..methods import PARAMETERS, PREDICT_HELP, PREDICTIONS, resolve_method
from ..profiles import load_profile
from ..storage import STORAGE_FLAGS, add_storage_arguments, storage_of_args
from .adapter import MultiGPUNotSupported
from .rules import MAGCACHE_RULES, PROFILE, REFERENCE, magcache_profile
from .session import DEFAULT_MODELS, attach_engine, build_engine

METHODS = ("none", "teacache", "magcache", "easycache")
SIDECAR = "opensora_set.json"
SIDECAR_FORMAT = "stepcache-opensora-set/1"
PARTIAL_DIR = ".partial"
LOCK_FILE = ".opensora_set.lock"
VIDEO_SUFFIX = ".mp4"
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")  # what `stepcache compare` reads as videos
MAX_NAME_BYTES = 200
EPILOG = """\
Videos are named {prompt}-{seed}.mp4 as in the published runs; a folder holds one setting (another method or
other parameters are refused); rerun the same command to resume; manifest.json (stepcache compare's timing
manifest) and opensora_set.json (prompt, seed and pass pattern per file) record what was made.

With no arguments at all, runs the published comparison of MagCache's eval/magcache/experiments/opensora.py
instead: the uncached baseline, TeaCache 0.1 and 0.2 and MagCache 0.12/K3 over the VBench prompts (the
repository's eval/magcache/vbench/VBench_full_info.json, found from this script's folder), seed 0, into
./samples/opensora_base, ./samples/opensora_teacache_slow, ./samples/opensora_teacache_fast and
./samples/opensora_ours_012_max3step (plus ./samples/opensora_easycache for easycache_opensora.py), resumable,
then prints the `stepcache compare` command."""
LABELS = {"none": "Open-Sora 1.2 baseline", "teacache": "TeaCache", "magcache": "MagCache", "easycache": "EasyCache"}


class PlanError(InputError):
    """Flags or an output folder that cannot run. The message says what to do instead."""


# ----------------------------------------------------------------------------------------------------- flags
def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    script = f"{method}_opensora.py" if method else "python -m stepcache.opensora.generate_set"
    parser = argparse.ArgumentParser(
        prog=script, description=(f"Open-Sora 1.2 (VideoSys fork) with {method or 'a cache method'}: one video per "
                                  f"prompt and seed into --out, resumable, with a timing manifest."),
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    what = parser.add_argument_group("what to generate")
    # Not required=True here: with no argument at all the command runs the published comparison, so the
    # requirements are checked after parsing (require_arguments), with argparse's own messages.
    source = what.add_mutually_exclusive_group()
    source.add_argument("--prompts", metavar="FILE|vbench",
                        help="a .txt (one prompt a line) or .json prompt file, or 'vbench' for the VBench list (the "
                             "published evaluation set) inside the installed vbench package, else the one a MagCache "
                             "checkout ships (eval/magcache/vbench/)")
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a prompt (repeat for several)")
    what.add_argument("--dimension", help="only the VBench prompts of this dimension (JSON prompt files)")
    what.add_argument("--keep-duplicates", action="store_true",
                      help="keep repeated prompts (their videos get ~2, ~3, ... names) instead of dropping them")
    what.add_argument("--seeds", nargs="+", default=["0"], metavar="SEED",
                      help="seeds, as numbers or ranges (0-4); default 0 (MagCache's published run; TeaCache's "
                           "used 0-4)")
    what.add_argument("--out", metavar="DIR", help="folder of videos for this one setting (required)")
    what.add_argument("--shard", default="0/1", metavar="K/N",
                      help="make only every N-th video starting at the K-th (one process per GPU; default 0/1)")
    what.add_argument("--dry-run", action="store_true", help="print the plan (names, what is left) and exit")
    what.add_argument("--label", help="name of this setting in `stepcache compare` tables (default: from the method)")

    cache = parser.add_argument_group("cache method")
    if method is None:
        cache.add_argument("--method", choices=METHODS, help="'none' makes the uncached baseline (required)")
    cache.add_argument("--profile", default=None, metavar="NAME_OR_FILE",
                       help=f"profile name or file (default: {PROFILE}; for MagCache the --magcache-rule's)")
    cache.add_argument("--preset", default=None,
                       help="a published setting of the profile: MagCache E012K3R02 / E024K5R02, TeaCache slow / "
                            "fast, EasyCache derived")
    cache.add_argument("--thresh", "--magcache_thresh", "--teacache_thresh", "--rel_l1_thresh", dest="thresh",
                       type=float, default=None, help="the method's threshold (default: the profile's)")
    cache.add_argument("--K", "--magcache_K", dest="K", type=int, default=None, help=PARAMETERS["magcache"]["K"])
    cache.add_argument("--retention-ratio", "--retention_ratio", dest="retention_ratio", type=float, default=None,
                       help=PARAMETERS["magcache"]["retention_ratio"])
    cache.add_argument("--magcache-rule", "--magcache_rule", dest="magcache_rule", default=REFERENCE,
                       choices=list(MAGCACHE_RULES),
                       help="'reference': the rule the published Open-Sora numbers used (sqrt ratios, 1 - acc, "
                            "retention 6/30; default); 'released': MagCache's released scripts' rule (raw ratios, "
                            "|1 - acc|)")
    cache.add_argument("--warmup-steps", "--ret_steps", dest="warmup_steps", type=int, default=None,
                       help="TeaCache/EasyCache: steps always computed at the start (default: the profile's)")
    cache.add_argument("--clamp-polynomial", action="store_true", default=None,
                       help="TeaCache: clamp the rescaling polynomial at 0 (not in the reference)")
    cache.add_argument("--predict", choices=PREDICTIONS, default=None, help=PREDICT_HELP)
    add_storage_arguments(cache)

    gen = parser.add_argument_group("generation (the published runs: 480p, 9:16, 51 frames, 30 steps, cfg 7.0)")
    gen.add_argument("--resolution", default="480p", help="144p, 240p, 360p, 480p or 720p (default 480p)")
    gen.add_argument("--aspect-ratio", "--aspect_ratio", dest="aspect_ratio", default="9:16")
    gen.add_argument("--num-frames", "--num_frames", dest="num_frames", default="51",
                     help="frames, or a duration like 2s (default 51)")
    gen.add_argument("--num-sampling-steps", "--num_sampling_steps", dest="steps", type=int, default=30)
    gen.add_argument("--cfg-scale", "--cfg_scale", dest="cfg_scale", type=float, default=7.0)
    gen.add_argument("--num-gpus", "--num_gpus", dest="num_gpus", type=int, default=1,
                     help="GPUs of VideoSys's sequence parallelism (default 1); the cache runs on every rank with one "
                          "decision per pass")

    model = parser.add_argument_group("models (the published ids by default)")
    model.add_argument("--transformer", default=DEFAULT_MODELS["transformer"])
    model.add_argument("--vae", default=DEFAULT_MODELS["vae"])
    model.add_argument("--text-encoder", "--text_encoder", dest="text_encoder", default=DEFAULT_MODELS["text_encoder"])
    model.add_argument("--enable-flash-attn", action="store_true", help="flash-attention (off in the published runs)")
    return parser


def require_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse's ``required=`` would check, with its messages (exit 2): everything but a bare run needs these."""
    missing = [flag for flag, value in (("--out", args.out), ("--method", getattr(args, "method", "fixed")))
               if value is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    if args.prompts is None and args.prompt is None:
        parser.error("one of the arguments --prompts --prompt is required")


def parse_seeds(items: list[str]) -> list[int]:
    seeds: list[int] = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            match = re.fullmatch(r"(\d+)-(\d+)", part)
            try:
                values = range(int(match[1]), int(match[2]) + 1) if match else [int(part)]
            except ValueError:
                raise PlanError(f"--seeds: {part!r} is not a seed (a number such as 0, or a range such as 0-4)")
            if match and int(match[1]) > int(match[2]):
                raise PlanError(f"--seeds: the range {part!r} is empty")
            seeds.extend(v for v in values if v not in seeds)
    if not seeds:
        raise PlanError("--seeds: no seed given")
    return seeds


def parse_shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise PlanError(f"--shard {text!r} must be K/N with 0 <= K < N, e.g. 0/4")
    return int(match[1]), int(match[2])


# ----------------------------------------------------------------------------------------------------- names
def name_stem(prompt: str) -> str:
    """The published ``{prompt}`` part of a file name, with only what a file name cannot hold replaced."""
    text = "".join("_" if ch in "/\\" or unicodedata.category(ch) == "Cc" else ch for ch in prompt).strip()
    text = re.sub(r"^\.+", lambda m: "_" * len(m.group()), text) or "prompt"
    encoded = text.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        text = encoded[:MAX_NAME_BYTES].decode("utf-8", errors="ignore").rstrip()
    return text


def assign_stems(prompts: list[str]) -> list[str]:
    """One stem per prompt, in order; a stem already taken by another prompt gets ``~2``, ``~3``, ..."""
    taken: set[str] = set()
    stems = []
    for prompt in prompts:
        stem = base = name_stem(prompt)
        k = 2
        while stem in taken:
            stem, k = f"{base}~{k}", k + 1
        taken.add(stem)
        stems.append(stem)
    return stems


@dataclass
class Job:
    index: int
    prompt_index: int
    prompt: str
    seed: int
    name: str


# ------------------------------------------------------------------------------------------------------ plan
@dataclass
class Plan:
    method: str
    out: Path
    jobs: list[Job]
    params: dict[str, Any]  # everything that decides a video's content: compared with a folder's manifest
    label: str
    profile: Any = None
    preset: str | None = None
    cache_params: dict[str, Any] = field(default_factory=dict)
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)

    def remaining(self) -> list[Job]:
        return [job for job in self.jobs if job.name not in self.done]


def repository_prompt_files(script: str | os.PathLike | None = None) -> list[Path]:
    """Where a MagCache or TeaCache checkout keeps the VBench prompt list, for a script run from it, in order: beside
    ``script``'s folder (a drop-in copied into ``eval/magcache/experiments/`` finds ``eval/magcache/vbench/``), then
    from the working directory as the seed's ``cd eval/magcache`` leaves it (``./vbench/``), then the published
    script's own ``../vbench/`` (right only from ``eval/magcache/experiments/``). The folder of a symlinked script is
    the link's, where the user put it."""
    from ..eval.prompts import VBENCH_INFO_FILE

    folders = [Path(os.path.abspath(script)).parent.parent] if script else []
    folders += [Path("."), Path("..")]
    return [folder / "vbench" / VBENCH_INFO_FILE for folder in folders]


def find_repository_prompts(script: str | os.PathLike | None = None) -> Path | None:
    return next((path for path in repository_prompt_files(script) if path.is_file()), None)


def vbench_prompts(script: str | os.PathLike | None = None) -> Path:
    """The VBench list: the installed vbench package's (as before), else the checkout's copy of the same file."""
    from ..eval.prompts import VBENCH_INFO_FILE, vbench_prompt_file

    found = vbench_prompt_file() or find_repository_prompts(script)
    if found is None:
        looked = ", ".join(str(p) for p in repository_prompt_files(script))
        raise PlanError(f"--prompts vbench: the vbench package (which ships {VBENCH_INFO_FILE}) is not installed and "
                        f"no checkout's copy was found (looked at {looked}); `pip install --no-deps vbench`, or pass "
                        f"the file: --prompts PATH/{VBENCH_INFO_FILE}")
    return found


def _load_prompts(args, script: str | os.PathLike | None = None) -> list[str]:
    if args.prompt:
        prompts = [p.strip() for p in args.prompt if p.strip()]
        if not prompts:
            raise PlanError("--prompt: every prompt given is empty")
        return prompts if args.keep_duplicates else list(dict.fromkeys(prompts))
    from ..eval.prompts import load_prompts

    path = vbench_prompts(script) if args.prompts == "vbench" else args.prompts
    if not os.path.isfile(path):
        raise PlanError(f"--prompts {path!r} does not exist (give a .txt/.json prompt file, or 'vbench')")
    try:
        return load_prompts(path, args.dimension, unique=not args.keep_duplicates)
    except (OSError, ValueError) as exc:
        raise PlanError(f"--prompts: {exc}") from exc


def resolve_cache(method: str, args) -> tuple[Any, str | None, dict[str, Any], dict[str, Any]]:
    """(profile, preset, parameters for stepcache.enable, resolved parameters for the manifest); nothing loads."""
    if method == "none":
        given = {k: getattr(args, k) for k in ("profile", "preset", "thresh", "K", "retention_ratio",
                                                "warmup_steps", "clamp_polynomial", "predict", *STORAGE_FLAGS)
                 if getattr(args, k) is not None}
        if given:
            raise PlanError(f"--method none makes the uncached baseline; it takes no cache flags "
                            f"(given: {', '.join('--' + k for k in given)})")
        return None, None, {}, {}
    if method != "magcache" and args.magcache_rule != REFERENCE:
        raise PlanError(f"--magcache-rule applies to MagCache only, not {method}")
    if args.profile is not None:
        profile = load_profile(args.profile)
        if args.magcache_rule != REFERENCE:
            from .rules import released_profile
            profile = released_profile(profile)
    else:
        profile = magcache_profile(args.magcache_rule) if method == "magcache" else load_profile(PROFILE)
    wanted = {"thresh": args.thresh, "K": args.K, "retention_ratio": args.retention_ratio,
              "warmup_steps": args.warmup_steps, "clamp_polynomial": args.clamp_polynomial, "predict": args.predict}
    params = {k: v for k, v in wanted.items() if v is not None}
    config = resolve_method(method, profile, args.preset, **params)  # raises on any bad value, before loading
    storage_of_args(args)  # checked here; stepcache.enable takes the flags' values as they are
    kept = {k: getattr(args, k) for k in STORAGE_FLAGS if getattr(args, k) is not None}
    params.update(kept)
    resolved = {k: v for k, v in config.params.items() if k != "coefficients"}
    resolved.update(kept)  # they change the output: a folder resumed with other values is refused
    resolved["profile"] = profile.name
    if method == "magcache":
        resolved["magcache_rule"] = args.magcache_rule
    return profile, args.preset, params, resolved


def _label(method: str, resolved: dict[str, Any], preset: str | None) -> str:
    if method == "none":
        return LABELS[method]
    bits = [f"{resolved['thresh']:g}"]
    if method == "magcache":
        bits.append(f"K{resolved['K']}")
        if resolved.get("magcache_rule", REFERENCE) != REFERENCE:
            bits.append(resolved["magcache_rule"])
    if resolved.get("predict", "reuse") != "reuse":
        bits.append(f"predict {resolved['predict']}")
    if preset:
        bits.append(f"({preset})")
    return f"{LABELS[method]} {' '.join(bits)}"


def make_plan(args, method: str | None = None, script: str | os.PathLike | None = None) -> Plan:
    """Everything checked (flags, prompts, the output folder) before any model loads. Raises PlanError.
    ``script``: the drop-in script run, whose checkout ``--prompts vbench`` may read the list from."""
    method = method or args.method
    if args.num_gpus < 1:
        raise PlanError(f"--num-gpus {args.num_gpus} must be at least 1")
    if args.steps < 2:
        raise PlanError(f"--num-sampling-steps {args.steps} is too few; caching needs at least 2 steps")
    if args.cfg_scale <= 0:
        raise PlanError(f"--cfg-scale {args.cfg_scale} must be positive")
    if args.dimension and args.prompt:
        raise PlanError("--dimension filters a prompt file (--prompts), not --prompt")
    profile, preset, cache_params, resolved = resolve_cache(method, args)
    seeds = parse_seeds(args.seeds)
    shard, shards = parse_shard(args.shard)
    prompts = _load_prompts(args, script)
    stems = assign_stems(prompts)
    all_jobs = [(i, prompt, seed, f"{stem}-{seed}{VIDEO_SUFFIX}")
                for i, (prompt, stem) in enumerate(zip(prompts, stems)) for seed in seeds]
    jobs = [Job(n, i, p, s, name) for n, (i, p, s, name) in enumerate(all_jobs) if n % shards == shard]
    generation = {"resolution": args.resolution, "aspect_ratio": args.aspect_ratio, "num_frames": args.num_frames,
                  "num_sampling_steps": args.steps, "cfg_scale": args.cfg_scale, "transformer": args.transformer,
                  "vae": args.vae, "text_encoder": args.text_encoder, "enable_flash_attn": bool(args.enable_flash_attn)}
    params = {**resolved, **generation}
    plan = Plan(method, Path(args.out), jobs, params, args.label or _label(method, resolved, preset), profile, preset,
                cache_params, {"resolution": args.resolution, "aspect_ratio": args.aspect_ratio,
                               "num_frames": _frames(args.num_frames)})
    plan.done = check_folder(plan)
    return plan


def _frames(text: str):
    return int(text) if re.fullmatch(r"\d+", str(text)) else text


# --------------------------------------------------------------------------------------------------- folder
def _read_sidecar(out: Path) -> dict[str, Any]:
    path = out / SIDECAR
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def check_folder(plan: Plan) -> set[str]:
    """The names already made in the output folder; PlanError if it holds another setting's videos."""
    from ..eval.errors import CompareError
    from ..eval.manifest import load_manifest

    out = plan.out
    if out.exists() and not out.is_dir():
        raise PlanError(f"--out {str(out)!r} is a file, not a folder")
    if not out.exists():
        return set()
    videos = {p.name for p in out.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS}
    try:
        manifest = load_manifest(out)
    except CompareError as exc:
        raise PlanError(f"--out: {exc}") from exc
    if manifest is None:
        if videos:
            raise PlanError(f"--out {str(out)!r} holds {len(videos)} video(s) but no manifest.json, so how they were "
                            f"made is unknown; use an empty or new folder for this setting")
        return set()
    if (manifest.method, manifest.params) != (plan.method, plan.params):
        ours, theirs = plan.params, manifest.params
        diff = [f"{k}: folder {theirs.get(k)!r}, this run {ours.get(k)!r}"
                for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if manifest.method != plan.method:
            diff.insert(0, f"method: folder {manifest.method!r}, this run {plan.method!r}")
        raise PlanError(f"--out {str(out)!r} holds videos made with other parameters ({'; '.join(diff)}); write "
                        f"each setting to its own folder")
    sidecar = _read_sidecar(out).get("videos", {})
    for job in plan.jobs:
        entry = sidecar.get(job.name)
        if entry and (entry.get("prompt"), entry.get("seed")) != (job.prompt, job.seed):
            raise PlanError(f"--out {str(out)!r}: {job.name} was made from prompt {entry.get('prompt')!r} seed "
                            f"{entry.get('seed')}, but this run names prompt {job.prompt!r} seed {job.seed} so; "
                            f"use the same prompt list and order as the run that started the folder")
    return {name for name in manifest.videos if name in videos}


@contextlib.contextmanager
def folder_lock(out: Path):
    """Serialises manifest and sidecar updates between processes sharing a folder (``--shard``)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: one process per folder
        yield
        return
    with open(out / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record(plan: Plan, job: Job, seconds: float, video) -> None:
    from ..eval.manifest import record_video

    with folder_lock(plan.out):
        record_video(plan.out, job.name, method=plan.method, seconds=seconds, params=plan.params, label=plan.label,
                     dit_seconds=video.dit_seconds, computed_passes=video.computed_passes,
                     total_passes=video.total_passes)
        data = _read_sidecar(plan.out)
        if data.get("format") != SIDECAR_FORMAT:
            data = {"format": SIDECAR_FORMAT, "method": plan.method, "params": plan.params, "videos": {}}
        data["videos"][job.name] = {"prompt": job.prompt, "seed": job.seed, "prompt_index": job.prompt_index,
                                    "seconds": round(seconds, 4), "dit_seconds": round(video.dit_seconds, 4),
                                    "computed_passes": video.computed_passes, "total_passes": video.total_passes,
                                    "pattern": video.pattern}
        tmp = plan.out / f"{SIDECAR}.tmp"
        tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        tmp.replace(plan.out / SIDECAR)


# ------------------------------------------------------------------------------------------------------- run
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_partials(partial_dir: Path) -> None:
    """Remove half-written videos left by processes that died (``{pid}-{name}``; another shard's live ones stay)."""
    for path in partial_dir.iterdir():
        pid = path.name.split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)) or int(pid) == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()


def engine_from_args(args):
    return build_engine(args.transformer, args.vae, args.text_encoder, args.steps, args.cfg_scale, args.num_gpus,
                        args.enable_flash_attn)


def run(plan: Plan, engine, log=print) -> int:
    """Make every remaining video of ``plan`` with ``engine`` (a VideoSysEngine or an OpenSoraPipeline)."""
    todo = plan.remaining()
    attachment = attach_engine(engine, None if plan.method == "none" else plan.method, plan.profile, plan.preset,
                               plan.cache_params)
    partial_dir = plan.out / PARTIAL_DIR
    partial_dir.mkdir(parents=True, exist_ok=True)
    clean_partials(partial_dir)
    made = 0
    partial = None
    try:
        for n, job in enumerate(todo, 1):
            video_record = attachment.begin_video()
            start = time.perf_counter()
            output = engine.generate(job.prompt, seed=job.seed, verbose=False, **plan.generate_kwargs)
            seconds = time.perf_counter() - start
            attachment.end_video()
            video = output.video[0] if hasattr(output, "video") else output[0][0]
            partial = partial_dir / f"{os.getpid()}-{job.name}"
            engine.save_video(video, str(partial))
            os.replace(partial, plan.out / job.name)
            partial = None
            record(plan, job, seconds, video_record)
            made += 1
            log(f"[{n}/{len(todo)}] {job.name}: {seconds:.2f} s, DiT {video_record.dit_seconds:.2f} s, computed "
                f"{video_record.computed_passes}/{video_record.total_passes} passes")
    except KeyboardInterrupt:
        log(f"interrupted after {made} new video(s); run the same command again to continue")
        return 130
    finally:
        attachment.remove()
        if partial is not None and partial.exists():
            partial.unlink()
        with contextlib.suppress(OSError):
            partial_dir.rmdir()
    log(f"made {made} video(s) in {plan.out}; {len(plan.jobs)} in this share of the set")
    return 0


def main(argv: list[str] | None = None, method: str | None = None,
         engine_factory: Callable[[argparse.Namespace], Any] | None = None,
         script: str | os.PathLike | None = None) -> int:
    """The command line. ``method`` fixes the method (the drop-in scripts); ``engine_factory(args)`` replaces
    :func:`stepcache.opensora.session.build_engine` (tests); ``script`` is the drop-in script being run, whose
    checkout holds the VBench list. No argument at all runs the published comparison (:mod:`.comparison`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(method)
    args = parser.parse_args(argv)
    prog = f"{method}_opensora.py" if method else "python -m stepcache.opensora.generate_set"
    if not argv:
        from .comparison import run_comparison
        return run_cli(lambda: run_comparison(method, script, engine_factory), prog)
    require_arguments(parser, args)
    return run_cli(lambda: _run(args, method, engine_factory, script), prog)


def _run(args: argparse.Namespace, method: str | None, engine_factory, script=None) -> int:
    plan = make_plan(args, method, script)
    todo = plan.remaining()
    print(f"{plan.label}: {len(plan.jobs)} video(s) in this share, {len(plan.jobs) - len(todo)} already in "
          f"{plan.out}, {len(todo)} to make")
    if args.dry_run:
        for job in todo:
            print(f"  {job.name}")
        return 0
    if not todo:
        return 0
    try:
        return run(plan, (engine_factory or engine_from_args)(args))
    except (MultiGPUNotSupported, ImportError) as exc:
        raise PlanError(str(exc)) from None


def run_script(method: str) -> None:
    """Entry point of the drop-in scripts (the one name every family's drop-ins call). The script is the file
    Python runs (``sys.argv[0]``): a copy in a checkout's ``eval/magcache/experiments/`` finds its prompt list."""
    sys.exit(main(method=method, script=sys.argv[0] or None))


if __name__ == "__main__":
    sys.exit(main())
