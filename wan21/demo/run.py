"""`stepcache demo`: step caching on a small trained video model that ships with stepcache, in about a minute.

The demo model is a 6-layer diffusers ``WanTransformer3DModel`` trained on CPU on procedural clips (a coloured
square or disc moving over a grey background, 8 frames of 32x32), run through the real ``WanPipeline`` and
its scheduler, so every method goes through the same adapter as on a real Wan2.1. The demo generates a few
prompts uncached and with TeaCache, MagCache and EasyCache at each of the demo profile's presets (slow,
medium, fast), and beside each cached run the same pipeline with fewer steps at the same number of
transformer passes. It prints a table (wall-clock speedup, ideal speedup = passes / computed passes, PSNR and
SSIM against the uncached video, and the share of videos whose colour and direction still read back as
prompted) and writes to ``--out``: ``report.json``, every video (``videos/``, 8x
upscaled mp4), ``side_by_side.mp4`` (uncached, each method at ``medium``, and its fewer-steps twin) and
``patterns.png`` (which passes each method computed).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

DEFAULT_PROMPTS = (
    "a red disc moving right on a dark background",
    "a cyan square moving up on a light background",
    "a yellow disc moving left on a gradient background",
)
DEMO_SEED = 0
METHOD_NAMES = ("teacache", "magcache", "easycache")
PRESET_NAMES = ("slow", "medium", "fast")
CHECK_PRESET, CHECK_REUSE, CHECK_PSNR = "medium", 0.25, 25.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="stepcache-demo", help="output folder (default: ./stepcache-demo)")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="PROMPT",
                        help="prompts, e.g. 'a blue square moving down on a dark background' (colours red, green, "
                             "blue, yellow, cyan, magenta; square or disc; right, left, up, down; dark, light or "
                             f"gradient background). Default: {len(DEFAULT_PROMPTS)} built-in prompts")
    parser.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated (default: all three)")
    parser.add_argument("--presets", default=",".join(PRESET_NAMES), help="comma-separated (default: slow,medium,fast)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 2.5)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the first prompt (then +1, +2, ...)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed repeats of every run; the fastest is reported (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: fastest for this "
                                                               "model size, and steady on a shared machine)")
    parser.add_argument("--weights", default=None, help="demo model file (default: the one shipped in stepcache)")
    parser.add_argument("--profile", default=None, help="demo profile file (default: the one shipped with it)")
    parser.add_argument("--no-videos", action="store_true", help="write report.json only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class Plan:
    """Every generation the demo makes. A run is one configuration over all prompts; its time is the sum over
    prompts of the fastest repeat of each, and the repeats of all runs are interleaved so that machine drift
    hits every run alike."""

    def __init__(self, demo, prompts, seeds, guidance, bar):
        self.demo, self.prompts, self.seeds, self.guidance, self.bar = demo, prompts, seeds, guidance, bar
        self.runs: dict[str, tuple] = {}
        self.videos: dict[str, list] = {}
        self.seconds: dict[str, float] = {}
        self.best: dict[str, list[float]] = {}  # per prompt, the fastest repeat
        self.stats: dict[str, list[dict]] = {}

    def run(self, label: str, steps: int, method: str | None = None, preset: str | None = None,
            profile: str | None = None) -> None:
        import stepcache
        self.runs[label] = (steps, method, preset, profile)
        if method:
            stepcache.enable(self.demo.pipe, method, profile=profile, preset=preset)
        times, videos, stats = [], [], []
        try:
            for prompt, seed in zip(self.prompts, self.seeds):
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    video = self.demo([prompt], [seed], steps=steps, guidance=self.guidance)[0]
                times.append(time.perf_counter() - start)
                videos.append(video)
                if method:
                    stats.append(stepcache.stats(self.demo.pipe).to_dict())
                else:
                    stats.append({"computed_passes": 2 * steps, "total_passes": 2 * steps,
                                  "pattern": "C" * 2 * steps})
                self.bar.update(1)
        finally:
            if method:
                stepcache.disable(self.demo.pipe)
        if label not in self.videos:
            self.videos[label], self.stats[label] = videos, stats
        best = self.best.get(label)
        self.best[label] = times if best is None else [min(a, b) for a, b in zip(best, times)]
        self.seconds[label] = sum(self.best[label])

    def repeat_all(self) -> None:
        for label, (steps, method, preset, profile) in list(self.runs.items()):
            self.run(label, steps, method, preset, profile)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from tqdm import tqdm

    from .model import GUIDANCE, PROFILE, STEPS, DemoPipeline, WeightsMissing, load
    from .quality import psnr_ssim
    from .scenes import parse_prompt, read_back

    torch.set_num_threads(args.threads)
    try:
        model = load(args.weights)
    except WeightsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    profile = str(args.profile or PROFILE)
    if not Path(profile).exists():
        print(f"error: no demo profile at {profile}; make one with "
              f"`python -m stepcache.wan21.demo.calibrate_demo`", file=sys.stderr)
        return 1
    methods = [m for m in args.methods.split(",") if m]
    presets = [p for p in args.presets.split(",") if p]
    for m in methods:
        if m not in METHOD_NAMES:
            print(f"error: unknown method {m!r}; choose from {', '.join(METHOD_NAMES)}", file=sys.stderr)
            return 2
    prompts = list(args.prompts or DEFAULT_PROMPTS)[: args.num_prompts or None]
    seeds = [args.seed + i for i in range(len(prompts))]
    steps = args.steps or STEPS
    guidance = GUIDANCE if args.guidance is None else args.guidance
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    demo = DemoPipeline(model)
    cached_runs = [(m, p) for m in methods for p in presets]
    repeats = max(1, args.repeats)
    estimate = len(prompts) * repeats * (1 + 2 * len(cached_runs))
    bar = tqdm(total=estimate, desc="stepcache demo", unit="video", disable=args.no_progress, dynamic_ncols=True)
    wall_start = time.perf_counter()
    for _ in range(2):  # warm-up: the first calls in a process pay one-off kernel set-up
        demo([prompts[0]], [seeds[0]], steps=min(steps, 10), guidance=guidance)
    plan = Plan(demo, prompts, seeds, guidance, bar)
    plan.run("uncached", steps)
    for method, preset in cached_runs:
        plan.run(f"{method}-{preset}", steps, method, preset, profile)
    # Fewer steps at the same cost: as many passes as the cached run computed (two passes per step with CFG).
    twins: dict[str, int] = {}
    for method, preset in cached_runs:
        computed = sum(s["computed_passes"] for s in plan.stats[f"{method}-{preset}"]) / len(prompts)
        twins[f"{method}-{preset}"] = max(2, round(computed / 2))
    unique = sorted(set(twins.values()) - {steps}, reverse=True)
    bar.total = len(prompts) * repeats * (1 + len(cached_runs) + len(unique))
    bar.refresh()
    for n in unique:
        plan.run(f"steps-{n}", n)
    for _ in range(repeats - 1):
        plan.repeat_all()
    plan.videos[f"steps-{steps}"], plan.seconds[f"steps-{steps}"] = plan.videos["uncached"], plan.seconds["uncached"]
    plan.stats[f"steps-{steps}"] = plan.stats["uncached"]
    bar.close()

    reference = plan.videos["uncached"]
    base_seconds = plan.seconds["uncached"]

    def row(label: str) -> dict:
        st = plan.stats[label]
        computed = sum(s["computed_passes"] for s in st)
        total = sum(s["total_passes"] for s in st)
        quality = [psnr_ssim(ref, vid) for ref, vid in zip(reference, plan.videos[label])]
        matches = [read_back(vid).matches(parse_prompt(p)) for p, vid in zip(prompts, plan.videos[label])]
        return {"computed_passes": computed, "total_passes": total, "reused_fraction": 1 - computed / total,
                "seconds": plan.seconds[label], "wall_speedup": base_seconds / plan.seconds[label],
                "ideal_speedup": 2 * steps * len(prompts) / computed,
                "psnr": sum(q[0] for q in quality) / len(quality), "ssim": sum(q[1] for q in quality) / len(quality),
                "prompt_match": sum(matches) / len(matches),
                "per_prompt": [{"prompt": p, "seed": s, "psnr": q[0], "ssim": q[1], "pattern": x.get("pattern"),
                                "computed_passes": x["computed_passes"], "total_passes": x["total_passes"]}
                               for p, s, q, x in zip(prompts, seeds, quality, st)]}

    report = {
        "model": {"weights": model.metadata.get("path"), "profile": profile,
                  "trained": json.loads(model.metadata.get("info", "{}")).get("trained_steps")},
        "settings": {"prompts": prompts, "seeds": seeds, "steps": steps, "guidance": guidance,
                     "repeats": repeats, "threads": args.threads},
        "uncached": {"seconds": base_seconds, "total_passes": 2 * steps * len(prompts),
                     "prompt_match": row("uncached")["prompt_match"]},
        "methods": {},
    }
    for method, preset in cached_runs:
        label = f"{method}-{preset}"
        entry = row(label)
        entry["fewer_steps"] = {"steps": twins[label], **row(f"steps-{twins[label]}")}
        report["methods"].setdefault(method, {})[preset] = entry
    check = {}
    for method in methods:
        if CHECK_PRESET in report["methods"].get(method, {}):
            e = report["methods"][method][CHECK_PRESET]
            check[method] = {"reused_fraction": e["reused_fraction"], "psnr": e["psnr"],
                             "ok": e["reused_fraction"] >= CHECK_REUSE and e["psnr"] > CHECK_PSNR}
    report["medium_check"] = {"rule": f"at {CHECK_PRESET}: reuse >= {CHECK_REUSE:.0%} of passes and PSNR > "
                                      f"{CHECK_PSNR} dB against uncached", "methods": check,
                              "ok": bool(check) and all(c["ok"] for c in check.values())}
    written = []
    if not args.no_videos:
        written = write_media(out, plan, prompts, cached_runs, twins, report)
    report["seconds_total"] = time.perf_counter() - wall_start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    for path in written + [out / "report.json"]:
        print(f"wrote {path}")
    return 0


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"stepcache demo: {len(s['prompts'])} prompt(s), {s['steps']} steps, CFG {s['guidance']}, "
             f"uncached {report['uncached']['seconds']:.2f} s for {report['uncached']['total_passes']} passes",
             "PSNR/SSIM: against the uncached video of the same prompt and seed (mean over prompts)", ""]
    head = (f"{'method':<10} {'preset':<7} {'passes':>8} {'wall':>6} {'ideal':>6} {'PSNR':>6} {'SSIM':>6} "
            f"{'match':>5}  | "
            f"{'fewer steps, same passes':<25} {'wall':>6} {'ideal':>6} {'PSNR':>6} {'SSIM':>6} {'match':>5}")
    lines += [head, "-" * len(head)]
    for method, by_preset in report["methods"].items():
        for preset, e in by_preset.items():
            f = e["fewer_steps"]
            lines.append(
                f"{method:<10} {preset:<7} {e['computed_passes']:>4}/{e['total_passes']:<3} "
                f"{e['wall_speedup']:>5.2f}x {e['ideal_speedup']:>5.2f}x {e['psnr']:>6.2f} {e['ssim']:>6.3f} "
                f"{e['prompt_match']:>5.0%}  | "
                f"{f['steps']:>3} steps {f['computed_passes']:>4}/{report['uncached']['total_passes']:<9} "
                f"{f['wall_speedup']:>5.2f}x {f['ideal_speedup']:>5.2f}x {f['psnr']:>6.2f} {f['ssim']:>6.3f} "
                f"{f['prompt_match']:>5.0%}")
    lines += ["", f"match: share of videos whose colour and direction read back as prompted (uncached "
                  f"{report['uncached']['prompt_match']:.0%})"]
    mc = report["medium_check"]
    verdict = "passed" if mc["ok"] else "FAILED"
    lines += ["", f"check ({mc['rule']}): {verdict}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- media
UPSCALE = 8
FPS = 4


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


def _label_strip(text: str, width: int, height: int = 22):
    import numpy as np
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(img).text((4, 5), text, fill=(0, 0, 0))
    return np.asarray(img)


def write_media(out: Path, plan: Plan, prompts, cached_runs, twins, report) -> list[Path]:
    written: list[Path] = []
    try:
        import imageio  # noqa: F401
        import numpy as np
    except ImportError:
        print("note: imageio is not installed, so no videos are written (pip install 'stepcache[video]')")
        return written
    from .scenes import parse_prompt, read_back
    for label, videos in plan.videos.items():
        if label == "uncached" or label.startswith("steps-") or label in dict.fromkeys(
                f"{m}-{p}" for m, p in cached_runs):
            for i, video in enumerate(videos):
                _write_mp4(out / "videos" / f"{i}-{_slug(prompts[i])}" / f"{label}.mp4", _upscale(video))
    written.append(out / "videos")
    # prompt match of every video (colour and direction read back from the frames)
    for method, by_preset in report["methods"].items():
        for preset, e in by_preset.items():
            for entry, label in ((e, f"{method}-{preset}"), (e["fewer_steps"], f"steps-{e['fewer_steps']['steps']}")):
                for i, p in enumerate(entry["per_prompt"]):
                    p["match"] = read_back(plan.videos[label][i]).matches(parse_prompt(prompts[i]))
    report["uncached"]["match"] = [read_back(v).matches(parse_prompt(p))
                                   for v, p in zip(plan.videos["uncached"], prompts)]
    # side by side: rows are prompts; columns uncached, then each method at medium and its fewer-steps twin
    preset = CHECK_PRESET if any(p == CHECK_PRESET for _, p in cached_runs) else cached_runs[0][1]
    columns = [("uncached", "uncached")]
    for method, p in cached_runs:
        if p == preset:
            label = f"{method}-{p}"
            columns.append((label, f"{method} {p}"))
            columns.append((f"steps-{twins[label]}", f"{twins[label]} steps"))
    cell = 32 * 4
    rows = []
    for i in range(len(prompts)):
        strips = [_label_strip(name, cell) for _, name in columns]
        big = [_upscale(plan.videos[label][i], 4) for label, _ in columns]
        caption = _label_strip(prompts[i], cell * len(columns))
        rows.append([np.concatenate([caption, np.concatenate([np.concatenate([s, b[t]], 0)
                                                              for s, b in zip(strips, big)], 1)], 0)
                     for t in range(len(big[0]))])
    frames = [np.concatenate([r[t] for r in rows], 0) for t in range(len(rows[0]))]
    pad_h, pad_w = (-frames[0].shape[0]) % 16, (-frames[0].shape[1]) % 16
    frames = [np.pad(f, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=255) for f in frames]
    written.append(_write_mp4(out / "side_by_side.mp4", frames))
    plot = plot_patterns(out / "patterns.png", plan, cached_runs, twins)
    if plot:
        written.append(plot)
    return written


def plot_patterns(path: Path, plan: Plan, cached_runs, twins) -> Path | None:
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
        for branch in ("cond", "uncond"):
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
    parser = argparse.ArgumentParser(prog="stepcache demo")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
