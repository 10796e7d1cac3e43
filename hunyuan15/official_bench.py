"""``bench_generate.py``: on your checkpoint and GPU, in one run of Tencent-Hunyuan/HunyuanVideo-1.5's
``generate.py``, stepcache's three methods beside the repository's own caches (``--enable_cache``: DeepCache,
TeaCache and TaylorCache from the ``angelslim`` package, on upstream's fixed schedule) and plain fewer steps, all at
the same number of computed steps, each scored against the uncached video of the same prompt and seed.

The runs, in order (``--bench_runs`` picks some):

- ``uncached``: the reference, every step computed;
- ``upstream-deepcache``, ``upstream-teacache``, ``upstream-taylorcache``: upstream's caches as ``--enable_cache
  --cache_type X`` runs them, with its own schedule flags (``--cache_start_step``, ``--cache_end_step``,
  ``--cache_step_interval``, ``--total_steps``, ``--no_cache_block_id``); the steps they compute in full set the
  budget of the others (or ``--bench_passes N``);
- ``fewer-steps``: that many steps, uncached: the floor a cache has to beat;
- ``magcache``, ``teacache``, ``easycache``: stepcache at the budget. MagCache's schedule does not depend on the
  input, so its threshold is found on the table without running (the lowest estimated error among the K and
  retention settings that fit); TeaCache and EasyCache are run from the profile's ``medium`` threshold, raised
  or lowered until the budget is bracketed, then the bracket halved: the try closest to the budget from below is
  kept (at most 5 generations each; every try is listed);
- ``uncached-again``: the reference once more, for the spread of the wall clock (a gap between two runs smaller
  than it ranks nothing).

The model is loaded once (upstream's ``create_pipeline`` and ``apply_infer_optimization`` run on the first run;
later runs reuse the pipeline and only put their cache on and off). Super-resolution is off: the bench compares
the base model's videos. Each run's video goes to ``--bench_out`` (written under ``.partial/``, then moved into
place) and ``results.json`` there holds every number; the table printed at the end is the same.

Design notes: docs/hunyuanvideo15.md#bench-beside-upstreams-own-caches
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from ..errors import InputError, run_cli
from ..eval.tune import THRESHOLD_TRIES
from ..outputs import write_json
from ..policies import ParameterError
from ..profiles import Profile, ProfileError, check_profile_family, load_profile
from ..storage import CacheStorage
from ..timing import DiTTimer
from .official import (FAMILY, CacheFlagError, _shipped_profile, attach, find_checkout, import_upstream,
                       run_generate, upstream_view, version_and_steps)

UPSTREAM_CACHES = ("deepcache", "teacache", "taylorcache")
STEPCACHE_METHODS = ("magcache", "teacache", "easycache")
RUNS = ("uncached", *(f"upstream-{c}" for c in UPSTREAM_CACHES), "fewer-steps", *STEPCACHE_METHODS,
        "uncached-again")
PARTIAL = ".partial"
SCRIPT = "bench_generate.py"


def bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    group = parser.add_argument_group("stepcache bench (stepcache's methods beside upstream's --enable_cache caches "
                                      "and fewer steps, at equal computed steps)")
    group.add_argument("--bench_out", default=None, metavar="DIR",
                       help="the folder for each run's video and results.json (required)")
    group.add_argument("--bench_runs", default=",".join(RUNS), metavar="LIST",
                       help=f"comma-separated runs, from: {', '.join(RUNS)} (default: all)")
    group.add_argument("--bench_passes", type=int, default=None, metavar="N",
                       help="the computed steps every cache and fewer-steps get (default: the steps upstream's "
                            "caches compute in full on their schedule)")
    group.add_argument("--cache_profile", default=None, metavar="NAME_OR_FILE",
                       help="the profile of stepcache's methods: TeaCache and EasyCache need a calibrated file "
                            "(`stepcache calibrate`); MagCache defaults to the shipped text-to-video table")
    return parser


def angelslim_available() -> bool:
    """Whether upstream's caches can run: its own check (hyvideo.commons.is_angelslim_available)."""
    from hyvideo.commons import is_angelslim_available
    return is_angelslim_available()


@dataclasses.dataclass
class BenchPlan:
    out: Path
    runs: list[str]
    steps: int
    passes: int | None
    profiles: dict[str, Profile]


def plan_bench(ours, view) -> BenchPlan:
    """Everything checked from the flags alone, before any model loads."""
    if not ours.bench_out:
        raise CacheFlagError("--bench_out DIR is required: the folder for each run's video and results.json")
    runs = [r.strip() for r in ours.bench_runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown or not runs:
        raise CacheFlagError(f"--bench_runs {ours.bench_runs!r}: unknown run {unknown[0] if unknown else '(none)'}; "
                             f"known: {', '.join(RUNS)}")
    runs = [r for r in RUNS if r in runs]  # the bench's order: the reference first, the budget before its users
    if view.enable_cache:
        raise CacheFlagError("--enable_cache: the bench runs upstream's caches itself (upstream-deepcache, "
                             "upstream-teacache, upstream-taylorcache in --bench_runs); drop the flag")
    if view.output_path:
        raise CacheFlagError("--output_path: the bench writes each run's video into --bench_out; drop the flag")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CacheFlagError("the bench runs on one GPU (one process); run it without torchrun")
    if view.enable_step_distill:
        raise CacheFlagError("--enable_step_distill: upstream refuses its caches on the step-distilled model; see "
                             "`stepcache schedule` for what stepcache's methods do at 8-12 steps")
    version, steps = version_and_steps(view)
    if ours.bench_passes is not None and not 2 <= ours.bench_passes < steps:
        raise CacheFlagError(f"--bench_passes {ours.bench_passes}: between 2 and {steps - 1} (the run has {steps} "
                             f"steps)")
    upstream = [r for r in runs if r.startswith("upstream-")]
    if upstream and not angelslim_available():
        raise CacheFlagError(f"{upstream[0]}: upstream's caches need the angelslim package, which does not import "
                             f"here (install it as upstream's README says), or leave them out of --bench_runs and "
                             f"give --bench_passes N")
    needs_budget = [r for r in runs if r in ("fewer-steps", *STEPCACHE_METHODS)]
    if needs_budget and not upstream and ours.bench_passes is None:
        raise CacheFlagError(f"{needs_budget[0]} runs at the computed steps of upstream's caches: keep one of them "
                             f"in --bench_runs, or give --bench_passes N")
    profiles = {}
    try:
        for method in (r for r in runs if r in STEPCACHE_METHODS):
            if ours.cache_profile:
                profile = load_profile(ours.cache_profile)
                check_profile_family(profile, FAMILY)
                if not profile.has(method):
                    raise ProfileError(f"profile {profile.name!r} has no {method} table; calibrate one "
                                       f"(`stepcache calibrate`) or leave {method} out of --bench_runs")
            else:
                profile = _shipped_profile(version, method, steps)
            profiles[method] = profile
    except (ProfileError, ParameterError) as exc:
        raise CacheFlagError(f"{exc} (or leave the method out of --bench_runs)") from exc
    out = Path(ours.bench_out)
    if out.exists() and not out.is_dir():
        raise CacheFlagError(f"--bench_out {out}: exists and is not a folder")
    return BenchPlan(out, runs, steps, ours.bench_passes, profiles)


class BlockCounter:
    """The double blocks that ran, per transformer call: a block counts when its attention output projection
    (``img_attn_proj``) runs, which happens only when the block computes (upstream's caches wrap each block's
    forward and return its cached output; stepcache returns above the block). The modulation in front of the
    attention is not counted: TeaCache evaluates block 0's on every pass for its signal."""

    def __init__(self, transformer):
        self.blocks = len(transformer.double_blocks)
        self.per_call: list[int] = []
        self.handles = [transformer.register_forward_pre_hook(lambda *_: self.per_call.append(0))]
        self.handles += [block.img_attn_proj.register_forward_pre_hook(self._count)
                         for block in transformer.double_blocks]

    def _count(self, *_):
        if self.per_call:
            self.per_call[-1] += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


def uint8_video(video):
    """Upstream's saved frames (generate.save_video: [1,] C, F, H, W in [0, 1]) as uint8 F, H, W, C."""
    import torch
    if video.ndim == 5:
        video = video[0]
    return (video.float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


class Bench:
    """Runs the plan inside upstream's ``generate_video``: one pipeline, each run's cache put on and taken off."""

    def __init__(self, plan: BenchPlan, generate_video):
        self.plan, self.generate_video = plan, generate_video  # upstream's
        self.pipe = None
        self.observed: tuple = ()    # the block counter and the DiT timer of the run, once the pipeline exists
        self.apply = None            # upstream's apply_infer_optimization, bound to the pipeline
        self.infer_state = None      # what generate.py's flags set (its own parse)
        self.setup = None            # the cache of the run being set up: called once the pipeline exists
        self.video = None
        self.rows: list[dict] = []
        self.reference = None
        self.budget = plan.passes

    # --- the seams in upstream's generate_video ---------------------------------------------------------------
    def create_pipeline(self, create):
        def create_once(*args, **kwargs):
            if self.pipe is None:
                self.pipe = create(*args, **kwargs)
                self.apply = self.pipe.apply_infer_optimization
                self.pipe.apply_infer_optimization = self.apply_once
            return self.pipe
        return create_once

    def apply_once(self, infer_state=None, **kwargs):
        """Upstream's set-up (compile, offloading, ...) on the first run, its cache left off; then, every run, the
        run's own cache."""
        if self.infer_state is None:
            self.infer_state = infer_state
            self.apply(dataclasses.replace(infer_state, enable_cache=False) if infer_state else None, **kwargs)
        self.observed = (BlockCounter(self.pipe.transformer), DiTTimer(self.pipe.transformer))
        if self.setup is not None:
            self.setup()

    def save_video(self, save):
        def keep_and_save(video, path):
            self.video = video
            return save(video, path)
        return keep_and_save

    # --- one run ----------------------------------------------------------------------------------------------
    def run(self, name: str, args, *, steps: int | None = None, setup=None, teardown=None, params=None) -> dict:
        from ..eval.bench import quality
        steps = steps or self.plan.steps
        partial = self.plan.out / PARTIAL / f"{name}.mp4"
        partial.parent.mkdir(parents=True, exist_ok=True)
        run_args = argparse.Namespace(**vars(args))
        run_args.output_path, run_args.num_inference_steps, run_args.sr = str(partial), steps, False
        run_args.save_generation_config = False
        if self.pipe is not None:  # loaded into the pipeline on the first run
            run_args.checkpoint_path = run_args.lora_path = None
        self.setup, self.observed, self.video = setup, (), None
        print(f"[bench] {name}: {steps} steps{' ' + str(params) if params else ''}", flush=True)
        start = time.perf_counter()
        try:
            self.generate_video(run_args)
        finally:
            self.setup = None
            if teardown is not None:
                teardown()
            for hook in self.observed:
                hook.remove()
        counter, timer = self.observed
        seconds = time.perf_counter() - start
        os.replace(partial, self.plan.out / f"{name}.mp4")
        video = uint8_video(self.video)
        scores = {}  # the reference is not scored against itself
        if name == "uncached":
            self.reference = video
        elif self.reference is not None and video.shape == self.reference.shape:
            scores = quality(self.reference, video)
        blocks = counter.blocks
        row = {"run": name, "steps": steps, "params": params, "passes": len(counter.per_call),
               "full_passes": sum(ran == blocks for ran in counter.per_call),
               "partial_passes": sum(0 < ran < blocks for ran in counter.per_call),
               "block_work": sum(counter.per_call) / (blocks * self.plan.steps),
               "pattern": "".join("C" if ran == blocks else ("c" if ran else ".") for ran in counter.per_call),
               "dit_seconds": timer.seconds, "seconds": seconds, **scores}
        print(f"[bench] {name}: {row['pattern']}  block work {row['block_work']:.1%}  DiT {timer.seconds:.2f} s"
              + (f"  PSNR {row['psnr']:.2f} dB" if "psnr" in row else ""), flush=True)
        return row

    def record(self, row: dict) -> None:
        self.rows.append(row)
        write_json(self.plan.out / "results.json", {"format": "stepcache-hv15-bench/1", "steps": self.plan.steps,
                                                    "budget": self.budget, "runs": self.rows})

    # --- the plan ---------------------------------------------------------------------------------------------
    def all_runs(self, args) -> None:
        for name in self.plan.runs:
            if name in ("uncached", "uncached-again"):
                self.record(self.run(name, args))
            elif name.startswith("upstream-"):
                self.record(self.run(name, args, setup=self._upstream(name.split("-", 1)[1]),
                                     teardown=self._upstream_off))
                if self.budget is None:
                    self.budget = self.rows[-1]["full_passes"]
            elif name == "fewer-steps":
                self.record(self.run(name, args, steps=self.budget))
            else:
                self.stepcache(name, args)

    def _upstream(self, cache_type: str):
        def setup():
            state = dataclasses.replace(self.infer_state, enable_cache=True, cache_type=cache_type,
                                        use_fp8_gemm=False, enable_torch_compile=False, enable_sageattn=False)
            # upstream's own code sets its helper up; compile, quantisation and offloading were applied on the
            # first run and are not applied twice
            self.apply(state, enable_offloading=getattr(self.pipe, "enable_offloading", False))
        return setup

    def _upstream_off(self):
        if self.pipe is not None and self.pipe.cache_helper is not None:
            self.pipe.cache_helper.disable()
            self.pipe.cache_helper = None

    def stepcache(self, method: str, args) -> None:
        profile = self.plan.profiles[method]
        holder = {}

        def on(params):
            def setup():
                holder["cached"] = attach(self.pipe, method, profile, None, params, CacheStorage())
            return setup

        def off():
            if "cached" in holder:
                holder.pop("cached").remove()
                self.pipe.cache_helper = None

        if method == "magcache":
            params = magcache_at(profile, self.plan.steps, self.budget)
            self.record(self.run(method, args, setup=on(params), teardown=off, params=params))
            return
        from ..eval.tune import first_threshold
        from ..methods import resolve_method
        section = profile.method(method)
        medium = section.get("presets", {}).get("medium", {}).get("thresh") or resolve_method(method, profile).thresh
        first = first_threshold(medium, self.plan.steps / self.budget)
        rows = []

        def attempt(thresh):
            params = {"thresh": thresh}
            rows.append(self.run(method, args, setup=on(params), teardown=off, params=params))
            return rows[-1]["full_passes"]
        best = closest_fit(attempt, first, self.budget, THRESHOLD_TRIES)
        row = next((r for r in rows if r["params"]["thresh"] == best), rows[-1])
        row["tries"] = [{k: r[k] for k in ("params", "full_passes", "pattern")} for r in rows]
        row["fits"] = row["full_passes"] <= self.budget
        self.record(row)


def closest_fit(passes_at, first: float, budget: int, tries: int) -> float | None:
    """The threshold, of those tried, that computes the most passes within ``budget`` (``passes_at(thresh)`` runs
    one). From ``first``, the threshold is raised (too many passes) or lowered (too few) by ``THRESHOLD_STEP`` until
    the budget is crossed, then the bracket is halved geometrically; at most ``tries`` runs, fewer when a run hits
    the budget exactly. None when no try fits."""
    from ..eval.tune import THRESHOLD_STEP
    fit, over = None, None        # (thresh, passes) of the best fitting try, and the lowest-passes try over budget
    thresh = first
    for _ in range(tries):
        passes = passes_at(thresh)
        if passes <= budget:
            if fit is None or passes > fit[1]:
                fit = (thresh, passes)
        elif over is None or passes < over[1]:
            over = (thresh, passes)
        if passes == budget:
            break
        if fit is not None and over is not None:
            thresh = (fit[0] * over[0]) ** 0.5   # passes fall as the threshold rises: the budget lies between
        else:
            thresh = thresh * THRESHOLD_STEP if over is not None else thresh / THRESHOLD_STEP
        thresh = float(f"{thresh:.4g}")
    return fit[0] if fit else None


def magcache_at(profile: Profile, steps: int, budget: int) -> dict:
    """MagCache's settings for at most ``budget`` computed steps of ``steps``, found on the table: among the K and
    retention settings that fit, the one whose reused passes carry the least estimated error."""
    from ..schedule import magcache_reaching
    found = magcache_reaching(profile, steps / budget, steps, profile.magcache_branches()[:1])
    if not found:
        raise InputError(f"magcache: no setting of profile {profile.name!r} computes as few as {budget} of {steps} "
                         f"steps; leave magcache out of --bench_runs or raise --bench_passes")
    return min(found, key=lambda f: f["error"])["params"]


def table(rows: list[dict]) -> list[str]:
    lines = [f"{'run':<22} {'computed':>9} {'block work':>10} {'DiT s':>8} {'speedup':>8} {'PSNR dB':>8} "
             f"{'SSIM':>6}  pattern"]
    reference = next((r for r in rows if r["run"] == "uncached"), None)
    for r in rows:
        speed = reference["dit_seconds"] / r["dit_seconds"] if reference and r["dit_seconds"] else float("nan")
        psnr = f"{r['psnr']:.2f}" if "psnr" in r else "-"
        ssim = f"{r['ssim']:.4f}" if "ssim" in r else "-"
        computed = f"{r['full_passes']}+{r['partial_passes']}p" if r["partial_passes"] else str(r["full_passes"])
        lines.append(f"{r['run']:<22} {computed:>9} {r['block_work']:>10.1%} {r['dit_seconds']:>8.2f} "
                     f"{speed:>7.2f}x {psnr:>8} {ssim:>6}  {r['pattern']}")
    again = next((r for r in rows if r["run"] == "uncached-again"), None)
    if reference and again:
        spread = abs(again["dit_seconds"] - reference["dit_seconds"]) / reference["dit_seconds"]
        lines.append(f"wall-clock spread of the two uncached runs: {spread:.1%} (speedups closer than that rank "
                     f"nothing)")
    return lines


def _run(argv: list[str]) -> int:
    ours, rest = bench_parser().parse_known_args(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.split("\n\nDesign notes")[0].replace("``", "`"))
        bench_parser().print_help()
        return 0
    find_checkout()
    import_upstream("hyvideo.pipelines.hunyuan_video_pipeline")
    plan = plan_bench(ours, upstream_view(rest))
    generate = import_upstream("generate")
    from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline
    bench = Bench(plan, generate.generate_video)
    run_generate(generate, rest, [
        (HunyuanVideo_1_5_Pipeline, "create_pipeline", staticmethod(bench.create_pipeline(
            HunyuanVideo_1_5_Pipeline.create_pipeline))),
        (generate, "generate_video", bench.all_runs),  # upstream's main() parses; the bench runs each run with it
        (generate, "save_video", bench.save_video(generate.save_video))])
    print("\n".join(["", *table(bench.rows), f"results: {plan.out / 'results.json'}"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_cli(lambda: _run(argv), prog=SCRIPT)
