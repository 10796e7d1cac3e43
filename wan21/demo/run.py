"""`stepcache demo`: step caching on a small trained video model that ships with stepcache, in about a minute.

The demo model is a 6-layer diffusers ``WanTransformer3DModel`` trained on procedural clips (a coloured square
or disc moving over a dark, light or gradient background (near-grey), 8 frames of 32x32), run through the real
``WanPipeline``, so every method goes through the same adapter as on a real Wan2.1. The demo runs a few prompts
uncached and with each method at the demo profile's presets, each beside the same pipeline with fewer steps at
the same number of passes, prints a table and writes ``--out`` (``report.json``, videos, ``side_by_side.mp4``,
``patterns.png``) whole once done. The check (at medium: reuse >= 25% of passes and PSNR > 25 dB against
uncached) sets the exit status: 0 passed or not run, 1 failed, 2 bad input, 130 Ctrl-C (nothing written).

Design notes: docs/demo.md#the-demo-stepcache-demo
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

from ...errors import InputError
from ...outputs import atomic_dir, check_output_dir
from ...timing import CLOCK_NAMES, CLOCKS, add_clock_argument

DEFAULT_PROMPTS = (
    "a red disc moving right on a dark background",
    "a cyan square moving up on a light background",
    "a yellow disc moving left on a gradient background",
)
DEMO_SEED = 0
METHOD_NAMES = ("teacache", "magcache", "easycache")
PRESET_NAMES = ("slow", "medium", "fast")
CHECK_PRESET, CHECK_REUSE, CHECK_PSNR = "medium", 0.25, 25.0
MIN_STEPS = 2
EXIT_CHECK_FAILED = 1


class DemoError(InputError):
    """A `stepcache demo` argument that cannot be run."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="stepcache-demo",
                        help="output folder (default: ./stepcache-demo); an earlier run's folder there is replaced "
                             "as a whole when the run is done")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                        help="prompts, e.g. 'a blue square moving down on a dark background' (colours red, green, "
                             "blue, yellow, cyan, magenta; square or disc; right, left, up, down; dark, light or "
                             "gradient background); each must name a colour and a direction, which the demo reads "
                             f"back from the video. Default: {len(DEFAULT_PROMPTS)} built-in prompts")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts (N >= 1)")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated (default: all three)")
    parser.add_argument("--presets", default=",".join(PRESET_NAMES),
                        help="comma-separated presets of the profile (default: slow,medium,fast)")
    parser.add_argument("--steps", type=int, default=None, help=f"denoising steps, at least {MIN_STEPS} (default 30)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale, 1.0 = off (default 2.5)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the first prompt (then +1, +2, ...)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed repeats of every run; the fastest is reported and the spread printed (default 2)")
    add_clock_argument(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this "
                                                               "model size, and steady on a shared machine)")
    parser.add_argument("--weights", default=None, help="demo model file (default: the one shipped in stepcache)")
    parser.add_argument("--profile", default=None, help="demo profile file (default: the one shipped with it)")
    parser.add_argument("--save-pipeline", default=None, metavar="DIR",
                        help="write the demo model (--weights, with --profile beside it) as a diffusers pipeline "
                             "folder at DIR and stop: it loads with DiffusionPipeline.from_pretrained(DIR, "
                             "trust_remote_code=True) without stepcache, and stepcache generate, calibrate, bench "
                             "--pipeline and tune take it as any pipeline folder. DIR must be new, or an earlier "
                             "demo pipeline folder (replaced whole)")
    parser.add_argument("--no-videos", action="store_true", help="write report.json only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --------------------------------------------------------------------------------------------------- arguments
def _comma_list(text: str, flag: str) -> list[str]:
    items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
    if not items:
        raise DemoError(f"{flag} {text!r} names nothing")
    return items


def _at_least(value, low: int, flag: str, what: str) -> None:
    if value is not None and value < low:
        raise DemoError(f"{flag} {value}: {what}")


def check_arguments(args: argparse.Namespace) -> dict:
    """Every argument checked, and resolved to what will run, before any model work and before any output."""
    from ...profiles import load_profile
    from .model import GUIDANCE, PROFILE, STEPS, WEIGHTS
    from .scenes import COLOUR_NAMES, DIRECTION_NAMES

    _at_least(args.steps, MIN_STEPS, "--steps", f"give at least {MIN_STEPS} denoising steps")
    _at_least(args.num_prompts, 1, "--num-prompts", "give at least 1")
    _at_least(args.threads, 1, "--threads", "give at least 1 torch CPU thread")
    _at_least(args.repeats, 1, "--repeats", "give at least 1 timed repeat")
    guidance = GUIDANCE if args.guidance is None else args.guidance
    if not math.isfinite(guidance) or guidance < 1.0:
        raise DemoError(f"--guidance {args.guidance}: give a scale >= 1.0 (1.0 turns classifier-free guidance off)")
    methods = _comma_list(args.methods, "--methods")
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        raise DemoError(f"--methods: unknown method {unknown[0]!r}; choose from {', '.join(METHOD_NAMES)}")
    prompts = list(args.prompts or DEFAULT_PROMPTS)
    if args.num_prompts is not None and args.num_prompts > len(prompts):
        raise DemoError(f"--num-prompts {args.num_prompts}: there are only {len(prompts)} prompts")
    prompts = prompts[: args.num_prompts]
    for prompt in prompts:
        words = prompt.lower().replace(",", " ").split()
        if not any(w in COLOUR_NAMES for w in words) or not any(w in DIRECTION_NAMES for w in words):
            raise DemoError(f"--prompts {prompt!r} must name a colour ({', '.join(COLOUR_NAMES)}) and a direction "
                            f"({', '.join(DIRECTION_NAMES)}): the demo checks both in the video")
    weights = Path(args.weights) if args.weights else WEIGHTS
    if not weights.is_file():
        raise DemoError(f"--weights {str(weights)!r}: no demo model file there; train one with "
                        f"`python -m stepcache.wan21.demo.train --out DIR` and pass DIR/demo_wan.safetensors")
    profile_path = Path(args.profile) if args.profile else PROFILE
    if not profile_path.is_file():
        raise DemoError(f"--profile {str(profile_path)!r}: no profile file there; make one with "
                        f"`stepcache calibrate --model demo ... --out FILE.json`")
    profile = load_profile(str(profile_path))
    presets = _comma_list(args.presets, "--presets")
    for method in methods:
        allowed = list(profile.method(method).get("presets") or {})
        missing = [p for p in presets if p not in allowed]
        if missing:
            raise DemoError(f"--presets: unknown preset {missing[0]!r} for {method} in {profile_path.name}; "
                            f"choose from {', '.join(allowed) or '(none)'}")
    out = check_output_dir(args.out, "--out")
    return {"prompts": prompts, "seeds": [args.seed + i for i in range(len(prompts))], "methods": methods,
            "presets": presets, "steps": args.steps or STEPS, "guidance": guidance, "weights": weights,
            "profile": str(profile_path), "out": out, "repeats": args.repeats, "threads": args.threads,
            "clock": args.clock}


# -------------------------------------------------------------------------------------------------- the runs
def _is_stepcache_warning(category: type) -> bool:
    return category.__module__.split(".")[0] == "stepcache"


class Plan:
    """Every generation the demo makes. A run is one configuration over all prompts; its time is the sum over
    prompts of the fastest repeat of each, and the repeats of all runs are interleaved so that machine drift
    hits every run alike. Passes are counted at the transformer as they run, never assumed."""

    def __init__(self, demo, prompts, seeds, guidance, clock, bar):
        self.demo, self.prompts, self.seeds, self.guidance, self.bar = demo, prompts, seeds, guidance, bar
        self.clock = clock
        self.runs: dict[str, tuple] = {}
        self.videos: dict[str, list] = {}
        self.times: dict[str, list[list[float]]] = {}  # per repeat, per prompt
        self.stats: dict[str, list[dict]] = {}
        self.warnings: dict[str, Counter] = {}  # stepcache warnings of the first repeat, per message

    @property
    def seconds(self) -> dict[str, float]:
        return {label: sum(map(min, zip(*repeats))) for label, repeats in self.times.items()}

    def run(self, label: str, steps: int, method: str | None = None, preset: str | None = None,
            profile: str | None = None) -> None:
        import stepcache
        self.runs[label] = (steps, method, preset, profile)
        first = label not in self.videos
        passes = [0]
        hook = self.demo.pipe.transformer.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        if method:
            stepcache.enable(self.demo.pipe, method, profile=profile, preset=preset)
        times, videos, stats, caught = [], [], [], Counter()
        try:
            for prompt, seed in zip(self.prompts, self.seeds):
                passes[0] = 0
                with warnings.catch_warnings(record=True) as records:
                    warnings.simplefilter("always")
                    start = self.clock()
                    video = self.demo([prompt], [seed], steps=steps, guidance=self.guidance)[0]
                    times.append(self.clock() - start)
                caught.update(str(w.message) for w in records if _is_stepcache_warning(w.category))
                videos.append(video)
                if method:
                    st = stepcache.stats(self.demo.pipe).to_dict()
                    if st["total_passes"] != passes[0]:
                        raise RuntimeError(f"{label}: stepcache counted {st['total_passes']} passes, the "
                                           f"transformer ran {passes[0]}")
                    stats.append(st)
                else:
                    stats.append({"computed_passes": passes[0], "total_passes": passes[0], "pattern": "C" * passes[0]})
                self.bar.update(1)
        finally:
            hook.remove()
            if method:
                stepcache.disable(self.demo.pipe)
        if first:
            self.videos[label], self.stats[label], self.warnings[label] = videos, stats, caught
        self.times.setdefault(label, []).append(times)

    def repeat_all(self) -> None:
        for label, (steps, method, preset, profile) in list(self.runs.items()):
            self.run(label, steps, method, preset, profile)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def twin_label(steps: int, uncached_steps: int) -> str:
    """The fewer-steps run with ``steps`` steps; with as many steps as the uncached run, it is that run."""
    return "uncached" if steps == uncached_steps else f"steps-{steps}"


def save_pipeline(args: argparse.Namespace, settings: dict) -> int:
    from .model import load
    from .pipeline_folder import is_demo_folder, save
    folder = check_output_dir(args.save_pipeline, "--save-pipeline")
    if folder.is_dir() and any(folder.iterdir()) and not is_demo_folder(folder):
        raise DemoError(f"--save-pipeline {str(folder)!r} is a folder with other content; give a new folder")
    try:
        model = load(settings["weights"])
    except ValueError as exc:
        raise DemoError(f"--weights: {exc}") from None
    save(folder, model, settings["profile"])
    print(f"wrote the demo pipeline to {folder}: DiffusionPipeline.from_pretrained({str(folder)!r}, "
          f"trust_remote_code=True), or stepcache generate --model {folder} ...")
    return 0


def run(args: argparse.Namespace) -> int:
    settings = check_arguments(args)
    if args.save_pipeline:
        return save_pipeline(args, settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm

    from .model import DemoPipeline, load

    prompts, methods, presets, repeats = (settings[k] for k in ("prompts", "methods", "presets", "repeats"))
    torch.set_num_threads(settings["threads"])
    try:
        model = load(settings["weights"])
    except ValueError as exc:  # a safetensors file that is not a demo model
        raise DemoError(f"--weights: {exc}") from None
    demo = DemoPipeline(model)
    cached_runs = [(m, p) for m in methods for p in presets]
    estimate = len(prompts) * repeats * (1 + 2 * len(cached_runs))
    bar = tqdm(total=estimate, desc="stepcache demo", unit="video", disable=args.no_progress, dynamic_ncols=True)
    wall_start = time.perf_counter()
    try:
        plan, twins = generate_all(demo, settings, cached_runs, bar)
    finally:
        bar.close()  # also on Ctrl-C, so that the one-line message starts a line of its own

    report = build_report(plan, settings, model, cached_runs, twins)
    out = settings["out"]
    with atomic_dir(out) as folder:
        written = [] if args.no_videos else write_media(folder, plan, prompts, cached_runs, twins, report)
        report["seconds_total"] = time.perf_counter() - wall_start
        (folder / "report.json").write_text(json.dumps(report, indent=1))
        written.append(folder / "report.json")
    print(format_table(report))
    for label, messages in plan.warnings.items():
        for message, count in messages.items():
            print(f"stepcache demo: warning: {label}: {message} ({count} of {len(prompts)} videos)", file=sys.stderr)
    for path in written:
        print(f"wrote {out / path.relative_to(folder)}")
    if report["medium_check"]["ok"] is False:
        print(f"stepcache demo: the check failed (exit status {EXIT_CHECK_FAILED}); the outputs in {out} are "
              f"complete", file=sys.stderr)
        return EXIT_CHECK_FAILED
    return 0


def generate_all(demo, settings: dict, cached_runs, bar) -> tuple[Plan, dict[str, int]]:
    """Uncached, every cached run, then the fewer-steps twins, then the other repeats of all of them."""
    prompts, seeds, steps, guidance = settings["prompts"], settings["seeds"], settings["steps"], settings["guidance"]
    repeats = settings["repeats"]
    for _ in range(2):  # warm-up: the first calls in a process pay one-off kernel set-up
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            demo([prompts[0]], [seeds[0]], steps=min(steps, 10), guidance=guidance)
    plan = Plan(demo, prompts, seeds, guidance, CLOCKS[settings["clock"]], bar)
    plan.run("uncached", steps)
    # Passes per step, as the uncached run ran them: 2 with classifier-free guidance, 1 without.
    passes_per_step = sum(s["total_passes"] for s in plan.stats["uncached"]) / (len(prompts) * steps)
    for method, preset in cached_runs:
        plan.run(f"{method}-{preset}", steps, method, preset, settings["profile"])
    # Fewer steps at the same cost: as many passes as the cached run computed.
    twins: dict[str, int] = {}
    for method, preset in cached_runs:
        computed = sum(s["computed_passes"] for s in plan.stats[f"{method}-{preset}"]) / len(prompts)
        twins[f"{method}-{preset}"] = max(1, round(computed / passes_per_step))
    unique = sorted(set(twins.values()) - {steps}, reverse=True)
    bar.total = len(prompts) * repeats * (1 + len(cached_runs) + len(unique))
    bar.refresh()
    for n in unique:
        plan.run(twin_label(n, steps), n)
    for _ in range(repeats - 1):
        plan.repeat_all()
    return plan, twins


def build_report(plan: Plan, settings: dict, model, cached_runs, twins) -> dict:
    from .quality import psnr_ssim
    from .scenes import parse_prompt, read_back
    prompts, seeds, steps = settings["prompts"], settings["seeds"], settings["steps"]
    reference = plan.videos["uncached"]
    seconds = plan.seconds
    base_seconds = seconds["uncached"]
    uncached_passes = sum(s["total_passes"] for s in plan.stats["uncached"])

    def row(label: str) -> dict:
        st = plan.stats[label]
        computed = sum(s["computed_passes"] for s in st)
        total = sum(s["total_passes"] for s in st)
        quality = [psnr_ssim(ref, vid) for ref, vid in zip(reference, plan.videos[label])]
        matches = [read_back(vid).matches(parse_prompt(p)) for p, vid in zip(prompts, plan.videos[label])]
        repeat_totals = [sum(r) for r in plan.times[label]]
        wall, ideal = base_seconds / seconds[label], uncached_passes / computed
        reasons = Counter(p["reason"] for s in st for p in s.get("passes", []) if p["computed"])
        return {"computed_passes": computed, "total_passes": total, "reused_fraction": 1 - computed / total,
                "seconds": seconds[label], "seconds_per_repeat": repeat_totals, "wall_speedup": wall,
                "ideal_speedup": ideal, "wall_is_noise": wall > ideal,
                "computed_by_reason": dict(reasons.most_common()),
                "warnings": dict(plan.warnings.get(label, {})),
                "psnr": sum(q[0] for q in quality) / len(quality), "ssim": sum(q[1] for q in quality) / len(quality),
                "prompt_match": sum(matches) / len(matches),
                "per_prompt": [{"prompt": p, "seed": s, "psnr": q[0], "ssim": q[1], "match": m,
                                "pattern": x.get("pattern"), "computed_passes": x["computed_passes"],
                                "total_passes": x["total_passes"],
                                "video": f"videos/{i}-{_slug(p)}/{label}.mp4"}
                               for i, (p, s, q, m, x) in enumerate(zip(prompts, seeds, quality, matches, st))]}

    uncached = row("uncached")
    report = {
        "model": {"weights": model.metadata.get("path"), "profile": settings["profile"],
                  "trained": json.loads(model.metadata.get("info", "{}")).get("trained_steps")},
        "settings": {"prompts": prompts, "seeds": seeds, "steps": steps, "guidance": settings["guidance"],
                     "repeats": settings["repeats"], "threads": settings["threads"], "clock": settings["clock"]},
        "uncached": {"seconds": base_seconds, "seconds_per_repeat": uncached["seconds_per_repeat"],
                     "total_passes": uncached_passes, "passes_per_step": uncached_passes / (len(prompts) * steps),
                     "prompt_match": uncached["prompt_match"], "match": [p["match"] for p in uncached["per_prompt"]]},
        "methods": {},
    }
    for method, preset in cached_runs:
        label = f"{method}-{preset}"
        entry = row(label)
        twin = twin_label(twins[label], steps)
        entry["fewer_steps"] = {"steps": twins[label], **row(twin)}
        if twin == "uncached":
            entry["fewer_steps"]["same_run_as"] = "uncached"
        report["methods"].setdefault(method, {})[preset] = entry
    check = {}
    for method in settings["methods"]:
        e = report["methods"].get(method, {}).get(CHECK_PRESET)
        if e is None:
            continue
        reuse_ok, psnr_ok = e["reused_fraction"] >= CHECK_REUSE, e["psnr"] > CHECK_PSNR
        check[method] = {"reused_fraction": e["reused_fraction"], "psnr": e["psnr"], "ok": reuse_ok and psnr_ok,
                         "why": None if reuse_ok and psnr_ok else check_failure(e, reuse_ok, psnr_ok)}
    report["medium_check"] = {"rule": f"at {CHECK_PRESET}: reuse >= {CHECK_REUSE:.0%} of passes and PSNR > "
                                      f"{CHECK_PSNR} dB against uncached", "methods": check,
                              "ok": all(c["ok"] for c in check.values()) if check else None}
    return report


def check_failure(entry: dict, reuse_ok: bool, psnr_ok: bool) -> str:
    """One line: which part of the rule a method missed, with the measured numbers and, when it reused nothing,
    why its passes were computed."""
    parts = []
    if not reuse_ok:
        reused = entry["total_passes"] - entry["computed_passes"]
        parts.append(f"reused {entry['reused_fraction']:.0%} of the passes ({reused} of {entry['total_passes']}; "
                     f"the rule needs >= {CHECK_REUSE:.0%})")
    if not psnr_ok:
        parts.append(f"PSNR {entry['psnr']:.2f} dB against uncached (the rule needs > {CHECK_PSNR} dB)")
    line = " and ".join(parts)
    reasons = entry.get("computed_by_reason") or {}
    if entry["computed_passes"] == entry["total_passes"]:
        # warm-up, the forced last step and branches that follow them: no pass was ever free to be reused
        line += (": it reused nothing, because its warm-up covers the whole run"
                 if reasons and set(reasons) <= {"warmup", "forced-last", "follow"} else ": it reused nothing")
    if reasons and not reuse_ok:
        line += "; computed passes by reason: " + ", ".join(f"{r} {n}" for r, n in reasons.items())
    return line


def _speedup_cell(entry: dict) -> str:
    return f"{'noise':>6}" if entry["wall_is_noise"] else f"{entry['wall_speedup']:>5.2f}x"


def format_table(report: dict) -> str:
    s = report["settings"]
    u = report["uncached"]
    clock = CLOCK_NAMES[s.get("clock", "wall")]
    repeats = u["seconds_per_repeat"]
    spread = f"; repeats {min(repeats):.2f}-{max(repeats):.2f} s" if len(repeats) > 1 else ""
    lines = [f"stepcache demo: {len(s['prompts'])} prompt(s), {s['steps']} steps, CFG {s['guidance']}, "
             f"uncached {u['seconds']:.2f} s for {u['total_passes']} passes "
             f"({u['passes_per_step']:g} per step{spread})",
             "PSNR/SSIM: against the uncached video of the same prompt and seed (mean over prompts)", ""]
    timed = s.get("clock", "wall")  # the speedup column: wall-clock or CPU time
    head = (f"{'method':<10} {'preset':<7} {'passes':>8} {timed:>6} {'ideal':>6} {'PSNR':>6} {'SSIM':>6} "
            f"{'match':>5}  | "
            f"{'fewer steps, same passes':<25} {timed:>6} {'ideal':>6} {'PSNR':>6} {'SSIM':>6} {'match':>5}")
    lines += [head, "-" * len(head)]
    entries = []
    for method, by_preset in report["methods"].items():
        for preset, e in by_preset.items():
            f = e["fewer_steps"]
            entries += [e] + ([] if f.get("same_run_as") else [f])
            left = (f"{method:<10} {preset:<7} {e['computed_passes']:>4}/{e['total_passes']:<3} "
                    f"{_speedup_cell(e)} {e['ideal_speedup']:>5.2f}x {e['psnr']:>6.2f} {e['ssim']:>6.3f} "
                    f"{e['prompt_match']:>5.0%}  | ")
            if f.get("same_run_as"):
                right = f"{f['steps']:>3} steps {f['computed_passes']:>4}/{u['total_passes']:<9} = the uncached run"
            else:
                right = (f"{f['steps']:>3} steps {f['computed_passes']:>4}/{u['total_passes']:<9} "
                         f"{_speedup_cell(f)} {f['ideal_speedup']:>5.2f}x {f['psnr']:>6.2f} {f['ssim']:>6.3f} "
                         f"{f['prompt_match']:>5.0%}")
            lines.append(left + right)
    lines += ["", f"match: share of videos whose colour and direction read back as prompted (uncached "
                  f"{u['prompt_match']:.0%})"]
    # timing: how steady the clock was, and figures it could not have measured
    if len(repeats) > 1:
        spreads = [max(r) / min(r) - 1 for r in [repeats] + [e["seconds_per_repeat"] for e in entries]]
        lines.append(f"timing: {clock}, fastest of {len(repeats)} repeats per video; the repeats of one run "
                     f"differed by up to {max(spreads):.0%} (median {statistics.median(spreads):.0%})")
    else:
        lines.append(f"timing: {clock}, one repeat per video, so its spread is not measured (--repeats 3 shows it)")
    noisy = [e for e in entries if e["wall_is_noise"]]
    if noisy:
        worst = max(noisy, key=lambda e: e["wall_speedup"] / e["ideal_speedup"])
        lines.append(f"noise: {len(noisy)} measured speedup(s) came out above the ideal one (up to "
                     f"{worst['wall_speedup']:.2f}x against {worst['ideal_speedup']:.2f}x), which fewer passes "
                     f"cannot give: that is timing noise from a busy machine, not a speed; --clock cpu or more "
                     f"--repeats steadies it")
    mc = report["medium_check"]
    verdict = {True: "passed", False: "FAILED", None: f"not run (it needs the {CHECK_PRESET} preset)"}[mc["ok"]]
    lines += ["", f"check ({mc['rule']}): {verdict}"]
    for method, c in mc["methods"].items():
        if not c["ok"]:
            lines.append(f"  {method} at {CHECK_PRESET}: {c['why']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- media
UPSCALE = 8
FPS = 4
PANEL = 5          # side_by_side: each 32x32 video upscaled 5x, to 160x160 ...
GAP = 4            # ... with a white gap of 4 px on its right
DIFF_GAIN = 8      # side_by_side: |video - uncached| amplified this much, so small differences show


def _upscale(video, factor: int = UPSCALE):
    import numpy as np
    v = np.asarray(video)
    return v.repeat(factor, axis=1).repeat(factor, axis=2)


def _write_mp4(path: Path, frames) -> Path:
    import imageio
    path.parent.mkdir(parents=True, exist_ok=True)
    with imageio.get_writer(str(path), fps=FPS, codec="libx264", quality=9, macro_block_size=16,
                            ffmpeg_log_level="error") as writer:
        for frame in frames:
            writer.append_data(frame)
    return path


def _text_strip(lines: list[str], width: int):
    """White strip with black text in Pillow's built-in bitmap font (6x11 px per character, no font files)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default_imagefont()
    img = Image.new("RGB", (width, 4 + 12 * len(lines)), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((3, 2 + 12 * i), line, fill=(0, 0, 0), font=font)
    return np.asarray(img)


def side_by_side_frames(plan: Plan, prompts, cached_runs, twins, report) -> list:
    """Per prompt: a caption; the uncached video, each method at medium and its fewer-steps twin, each labelled
    with its PSNR and passes; below each, its difference from the uncached video amplified DIFF_GAIN times."""
    import numpy as np
    steps = plan.runs["uncached"][0]
    preset = CHECK_PRESET if any(p == CHECK_PRESET for _, p in cached_runs) else cached_runs[0][1]
    columns = [("uncached", "uncached", report["uncached"])]
    for method, p in cached_runs:
        if p == preset:
            entry = report["methods"][method][p]
            label = twin_label(twins[f"{method}-{p}"], steps)
            columns.append((f"{method}-{p}", f"{method} {p}", entry))
            columns.append((label, f"{twins[f'{method}-{p}']} steps" + (" (=uncached)" if label == "uncached" else ""),
                            entry["fewer_steps"]))
    cell = 32 * PANEL + GAP
    width = cell * len(columns)

    def gap(video):
        return np.pad(video, ((0, 0), (0, 0), (0, GAP), (0, 0)), constant_values=255)

    blocks = []
    for i, prompt in enumerate(prompts):
        reference = np.asarray(plan.videos["uncached"][i]).astype(np.int16)
        labels, tops, bottoms = [], [], []
        for label, name, entry in columns:
            video = np.asarray(plan.videos[label][i])
            st = plan.stats[label][i]
            psnr = ("reference" if label == "uncached" else "identical" if np.array_equal(video, reference)
                    else f"{entry['per_prompt'][i]['psnr']:.1f} dB")
            passes = f"{st['computed_passes']}/{plan.stats['uncached'][i]['total_passes']} passes"  # as the table
            labels.append(_text_strip([name, f"{psnr}, {passes}"], cell))
            diff = (np.abs(video.astype(np.int16) - reference) * DIFF_GAIN).clip(0, 255).astype(np.uint8)
            tops.append(gap(_upscale(video, PANEL)))
            bottoms.append(gap(_upscale(diff, PANEL)))
        caption = _text_strip([f"prompt {i}: {prompt}"], width)
        label_row = np.concatenate(labels, 1)
        diff_caption = _text_strip([f"difference from uncached, amplified {DIFF_GAIN}x (black: identical)"], width)
        blocks.append([np.concatenate([caption, label_row, np.concatenate([t[f] for t in tops], 1), diff_caption,
                                       np.concatenate([b[f] for b in bottoms], 1)], 0)
                       for f in range(len(tops[0]))])
    frames = [np.concatenate([b[f] for b in blocks], 0) for f in range(len(blocks[0]))]
    pad_h, pad_w = (-frames[0].shape[0]) % 16, (-frames[0].shape[1]) % 16
    return [np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255) for f in frames]


def write_media(out: Path, plan: Plan, prompts, cached_runs, twins, report) -> list[Path]:
    written: list[Path] = []
    try:
        import imageio  # noqa: F401
    except ImportError:
        print("note: imageio is not installed, so no videos are written (pip install 'stepcache[video]')")
        return written
    for label, videos in plan.videos.items():
        for i, video in enumerate(videos):
            _write_mp4(out / "videos" / f"{i}-{_slug(prompts[i])}" / f"{label}.mp4", _upscale(video))
    written.append(out / "videos")
    written.append(_write_mp4(out / "side_by_side.mp4", side_by_side_frames(plan, prompts, cached_runs, twins,
                                                                             report)))
    plot = plot_patterns(out / "patterns.png", plan, cached_runs)
    if plot:
        written.append(plot)
    return written


def plot_patterns(path: Path, plan: Plan, cached_runs) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        print("note: matplotlib is not installed, so no pattern plot is written (pip install 'stepcache[eval]')")
        return None
    steps = plan.runs["uncached"][0]
    rows = []
    for method, preset in cached_runs:
        passes = plan.stats[f"{method}-{preset}"][0].get("passes") or []
        for branch in dict.fromkeys(p["branch"] for p in passes):  # the branches that ran: cond, and uncond with CFG
            line = np.full(steps, np.nan)
            for p in passes:
                if p["branch"] == branch:
                    line[p["step"]] = 1.0 if p["computed"] else 0.0
            rows.append((f"{method} {preset} ({branch})", line))
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    image = np.array([r[1] for r in rows])
    ax.imshow(image, aspect="auto", cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=7)
    ax.set_xticks(range(0, steps, max(1, steps // 15)))
    ax.set_xlabel("denoising step (green: computed, red: reused)")
    ax.set_title(f"Pass pattern of each method on the first prompt ({steps} steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """``python -m stepcache.wan21.demo.run``: the same as ``stepcache demo``."""
    from ...cli import main as cli_main
    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
