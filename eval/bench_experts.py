"""`stepcache bench --model demo-experts`: the caches on a two-expert model (the two-expert demo, shaped like
Wan2.2 A14B), compared at equal passes with each other, with fewer steps and with diffusers' own cache.

What it answers: does the published rule's one state for both experts (carried across the switch) cost quality,
and does stepcache's expert-aware rule (``experts="separate"``) fix it? Every run generates the same prompt-seed
pairs; quality is PSNR / SSIM (LPIPS when its weights are found) against the uncached two-expert run, cost is the
share of transformer passes whose block stack ran (counted inside the blocks of both experts). Each method is a
sweep of its threshold, so its quality is read at equal passes by linear interpolation along its own curve
(``--budgets``); a budget outside a curve's range is left empty rather than extrapolated.

Design notes: docs/wan22.md#the-two-expert-demo-bench
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

from ..errors import InputError
from ..outputs import check_output_dir, write_json, write_text
from .bench import BlockWork, bench_pairs, calibration_pairs, quality, to_uint8

FORMAT = "stepcache-bench-experts/1"
BASE_PROFILE = "wan2.1-t2v-1.3b"  # its CFG rules, warm-ups and presets carry over to the calibrated table
# MagCache4Wan2.2's T2V retention zones (the published two-expert rule): the first retention_ratio of each
# expert's passes, the second one closed (<=), as magcache_generate.py:294-303 has it.
T2V_ZONES = [{"from": "start", "span": ["start", "switch"]},
             {"from": "switch", "span": ["switch", "end"], "closed": True}]
# Thresholds swept per method; each at both expert rules. MagCache with Wan2.2 T2V's published K 2 and retention
# 0.4 (E006K2R04): with 0.2, the published zones compute only 3 of the high-noise expert's 18 passes at 30 steps.
SWEEPS = {
    "magcache": [dict(thresh=t, K=2, retention_ratio=0.4) for t in (0.02, 0.06, 0.12, 0.24, 0.5)],
    "teacache": [dict(thresh=t) for t in (0.05, 0.1, 0.2, 0.4, 0.8)],
    "easycache": [dict(thresh=t) for t in (0.02, 0.05, 0.1, 0.2, 0.4)],
}
QUICK = {"magcache": [0.06, 0.24], "teacache": [0.1, 0.4], "easycache": [0.05, 0.2]}
DIFFUSERS_FBC = (0.02, 0.05, 0.1, 0.2)  # diffusers' FirstBlockCacheConfig(threshold) on both experts
# diffusers' MagCacheConfig on both experts, each with ratios from diffusers' own calibrate=True pass on it, and
# num_inference_steps either the steps that expert runs ("own steps") or the pipeline's ("all steps", how
# diffusers issue 14025 reports it configured for Wan2.2).
DIFFUSERS_MAGCACHE = (0.06, 0.12, 0.24, 0.5)
BUDGETS = (0.4, 0.5, 0.6, 0.7)
# Whether thresholds should differ per expert: each method with the separate rule, caching on one expert only (the
# other computes every pass), against both; a setting of each from the middle of its sweep.
ONE_EXPERT = {"magcache": dict(thresh=0.5, K=2, retention_ratio=0.4), "teacache": dict(thresh=0.1),
              "easycache": dict(thresh=0.1)}


class BenchExpertsError(InputError):
    pass


def build(args):
    """(ExpertsPipeline, description): the shipped two-expert demo, or both experts' architecture with random
    weights (``--untrained``: a plumbing check that says nothing about quality)."""
    from stepcache.wan22.demo.model import ExpertsPipeline, load_experts
    if not args.untrained:
        high, low = load_experts(args.weights, args.low_weights)
        return ExpertsPipeline(high, low), {"high": high.metadata.get("path"), "low": low.metadata.get("path")}
    from .bench import UNTRAINED_LABEL, UNTRAINED_SEED, build_demo
    high = build_demo(args)[0].model
    from stepcache.wan21.demo.model import DemoModel, build_transformer
    low = DemoModel(build_transformer(seed=UNTRAINED_SEED + 1).eval().requires_grad_(False), high.text_encoder,
                    high.tokenizer, high.codec, {"path": None})
    return ExpertsPipeline(high, low), {"high": None, "low": None, "label": UNTRAINED_LABEL}


class ExpertsBench:
    def __init__(self, args, demo, out: Path):
        self.args, self.demo, self.out = args, demo, out
        self.steps, self.guidance = args.steps, args.guidance
        self.pairs = bench_pairs(args.num_prompts, args.num_seeds, args.first_prompt)
        self.work = [BlockWork(demo.pipe.transformer), BlockWork(demo.pipe.transformer_2)]
        self.lpips = None
        self.full_work: int | None = None
        self.records: list[dict] = []
        self.reference: list = []

    # --- generation --------------------------------------------------------------------------------------
    def videos(self, steps: int | None = None) -> tuple[list, float]:
        """Every pair's video, and the block-stack work that ran (both experts), as a share of the uncached
        run's: the bench's cost axis."""
        for w in self.work:
            w.reset()
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for prompt, seed in self.pairs:
                latents = self.demo.latents([prompt], [seed], steps=steps or self.steps, guidance=self.guidance)
                out.append(to_uint8(self.demo.decode(latents))[0])
        work = sum(w.macs for w in self.work)
        if self.full_work is None:  # the first call: the uncached run all others are measured against
            self.full_work = work
        return out, work / self.full_work

    def record(self, method: str, rule: str, params: dict, videos: list, passes: float, extra=None) -> dict:
        scores = [quality(r, v, self.lpips) for r, v in zip(self.reference, videos)]
        mean = {k: (sum(s[k] for s in scores) / len(scores) if scores[0][k] is not None else None)
                for k in ("psnr", "ssim", "lpips")}
        # the standard error of the mean PSNR over the pairs: a difference smaller than about twice it ranks nothing
        mean["psnr_sem"] = mean_and_sem([s["psnr"] for s in scores])[1]
        row = {"method": method, "rule": rule, "params": params, "passes": passes, **mean,
               "psnr_per_pair": [round(s["psnr"], 3) for s in scores], **(extra or {})}
        self.records.append(row)
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        lp = f" LPIPS {mean['lpips']:.4f}" if mean["lpips"] is not None else ""
        print(f"  {method:<10} {rule:<9} {shown:<34} passes {passes:6.1%}  PSNR {mean['psnr']:6.2f} dB  "
              f"SSIM {mean['ssim']:.4f}{lp}", flush=True)
        return row

    # --- the profile ---------------------------------------------------------------------------------------
    def profile(self):
        """stepcache's tables for this two-expert model, calibrated on pairs the bench does not score, with the
        expert data and MagCache4Wan2.2's T2V retention zones, so that the published rule can run on it."""
        from stepcache.calibrate import CalibrationRun, build_profile, measure
        from stepcache.calibration_io import write_profile
        from stepcache.policies import expert_switch_step
        from stepcache.profiles import load_profile
        path = self.out / "calibration" / "stepcache-profile.json"
        if path.exists():
            return load_profile(str(path))
        pairs = calibration_pairs(self.args.calibration_pairs)
        seeds = dict(pairs)
        print(f"calibrating stepcache on {len(pairs)} calibration pairs (both experts, {self.steps} steps)",
              flush=True)
        run = CalibrationRun([p for p, _ in pairs], [pairs[0][1]], self.steps,
                             {"resolution": [32, 32], "frames": 8, "guidance": self.guidance,
                              "pairs": [list(p) for p in pairs]})

        def generate(prompt, seed):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.demo.latents([prompt], [seeds[prompt]], steps=self.steps, guidance=self.guidance)

        base = load_profile(BASE_PROFILE)
        runner, adapter, model = measure(self.demo.pipe, run, generate, progress=False)
        data = build_profile(runner, adapter, model, run, "demo-experts-calibrated", base,
                             description="the two-expert demo, calibrated by stepcache bench --model demo-experts")
        scheduler = self.demo.pipe.scheduler
        switch = self.demo.switch_step(self.steps)
        experts = {"boundary": self.demo.pipe.config.boundary_ratio, "shift": float(scheduler.config.shift),
                   "num_train_timesteps": int(scheduler.config.num_train_timesteps), "sigma_max": 1.0,
                   "sigma_min": 0.0, "steps": self.steps,
                   "switch_step": expert_switch_step(self.steps, self.demo.pipe.config.boundary_ratio,
                                                     float(scheduler.config.shift), 1000, 1.0, 0.0),
                   "source": "the two-expert demo's WanPipeline (FlowMatchEulerDiscreteScheduler, boundary_ratio); "
                             "at run time the switch is read off the pipeline's scheduler"}
        if experts["switch_step"] != switch:
            raise BenchExpertsError(f"the expert data give a switch at step {experts['switch_step']}, the pipeline "
                                    f"switches at {switch} ({self.steps} steps)")
        data["model"]["experts"] = experts
        data["magcache"]["retention_zones"] = T2V_ZONES
        data["easycache"]["warmup_steps"] = max(1, round(self.steps * 7 / 40))  # EasyCache4Wan2.2's 7 of 40
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_profile(path, data)

    # --- the runs ------------------------------------------------------------------------------------------
    def run_stepcache(self, profile, method: str, rule: str, params: dict, only: str | None = None) -> None:
        """One setting of a stepcache method; ``only`` (with the separate rule): cache that expert alone, the
        other computing every pass (its states get threshold 0, which never reuses)."""
        import stepcache
        settings = {**params, "experts": rule}
        if method == "magcache" and rule == "shared":
            settings["retention_rule"] = "zones"
        cached = stepcache.enable(self.demo.pipe, method, profile=profile, **settings)
        if only is not None:
            runner, make_state = cached.runner, cached.runner._branch

            def branch(key, expert):
                state = make_state(key, expert)
                if expert != only:
                    state.policy.thresh = 0.0
                return state
            runner._branch = branch
            rule = f"{rule}, {only} only"
        try:
            videos, passes = self.videos()
            stats = stepcache.stats(self.demo.pipe)
        finally:
            stepcache.disable(self.demo.pipe)
        # carry-over: passes of the low-noise expert reused before it computed any pass of its own, i.e. on the
        # high-noise expert's cached tensors (possible only with the shared state)
        carried = 0
        for generation in stats.generation_ids():
            seen_low = [r for r in stats.of(generation) if r.expert == "low"]
            for r in seen_low:
                if r.computed:
                    break
                carried += 1
        self.record(method, rule, params, videos, passes, {"carried_over_passes": carried})

    def run_fbc(self, threshold: float) -> None:
        from diffusers import FirstBlockCacheConfig
        pipe = self.demo.pipe
        for transformer in (pipe.transformer, pipe.transformer_2):
            transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        try:
            videos, passes = self.videos()
        finally:
            for transformer in (pipe.transformer, pipe.transformer_2):
                transformer.disable_cache()
        self.record("diffusers-fbc", "per-model", {"threshold": threshold}, videos, passes)

    # --- diffusers' MagCache on both experts -------------------------------------------------------------------
    def diffusers_ratios(self) -> dict[str, list[float]]:
        """Per expert, diffusers' own ``MagCacheConfig(calibrate=True)`` table, measured with that expert's step
        count on the calibration pairs (the mean over pairs and CFG contexts), cached in the output folder."""
        import ast
        import contextlib
        import io
        from diffusers import MagCacheConfig
        path = self.out / "calibration" / "diffusers-magcache-experts.json"
        if path.exists():
            return json.loads(path.read_text())
        pipe = self.demo.pipe
        switch = self.demo.switch_step(self.steps)
        own = {"high": switch, "low": self.steps - switch}
        tables: dict[str, list[list[float]]] = {"high": [], "low": []}
        for prompt, seed in calibration_pairs(self.args.calibration_pairs):
            for name, transformer in (("high", pipe.transformer), ("low", pipe.transformer_2)):
                transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=own[name]))
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    self.demo.latents([prompt], [seed], steps=self.steps, guidance=self.guidance)
            finally:
                for transformer in (pipe.transformer, pipe.transformer_2):
                    transformer.disable_cache()
            found = [ast.literal_eval(line) for line in buffer.getvalue().splitlines()
                     if line.startswith("[") and not line.startswith("[MagCache")]
            for table in found:  # the high-noise expert's contexts complete first; each table has its length
                tables["high" if len(table) == own["high"] else "low"].append(table)
        if not tables["high"] or not tables["low"] or own["high"] == own["low"]:
            raise BenchExpertsError("diffusers' MagCache calibration did not print one table per expert")
        data = {name: [float(sum(col) / len(col)) for col in zip(*lists)] for name, lists in tables.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, data)
        return data

    def run_diffusers_magcache(self, threshold: float, steps_rule: str) -> None:
        from diffusers import MagCacheConfig
        pipe = self.demo.pipe
        ratios = self.diffusers_ratios()
        switch = self.demo.switch_step(self.steps)
        own = {"high": switch, "low": self.steps - switch}
        for name, transformer in (("high", pipe.transformer), ("low", pipe.transformer_2)):
            steps = own[name] if steps_rule == "own steps" else self.steps
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # diffusers says when it interpolates a table to another length
                transformer.enable_cache(MagCacheConfig(threshold=threshold, max_skip_steps=2, retention_ratio=0.2,
                                                        num_inference_steps=steps, mag_ratios=ratios[name]))
        try:
            videos, passes = self.videos()
        finally:
            for transformer in (pipe.transformer, pipe.transformer_2):
                transformer.disable_cache()
        self.record("diffusers-magcache", steps_rule, {"threshold": threshold, "K": 2, "retention_ratio": 0.2},
                    videos, passes)

    def run(self) -> dict:
        started = time.perf_counter()
        print(f"two-expert demo: {len(self.pairs)} prompt-seed pairs, {self.steps} steps, switch at step "
              f"{self.demo.switch_step(self.steps)}", flush=True)
        self.reference, _ = self.videos()
        profile = self.profile()
        quick = self.args.quick
        for method, sweep in SWEEPS.items():
            for params in sweep:
                if quick and params["thresh"] not in QUICK[method]:
                    continue
                for rule in ("shared", "separate"):
                    self.run_stepcache(profile, method, rule, params)
        if not quick:
            for method, params in ONE_EXPERT.items():
                for only in ("high", "low"):
                    self.run_stepcache(profile, method, "separate", params, only)
        fractions = (1 / 3, 2 / 3) if quick else (1 / 3, 0.4, 0.5, 0.6, 0.7, 0.8)
        for steps in sorted({max(2, round(self.steps * f)) for f in fractions}):
            videos, passes = self.videos(steps)
            self.record("fewer-steps", "-", {"steps": steps}, videos, passes)
        for threshold in (DIFFUSERS_FBC[1:3] if quick else DIFFUSERS_FBC):
            self.run_fbc(threshold)
        for threshold in (DIFFUSERS_MAGCACHE[1:3] if quick else DIFFUSERS_MAGCACHE):
            for steps_rule in ("own steps", "all steps"):
                self.run_diffusers_magcache(threshold, steps_rule)
        return {"format": FORMAT, "seconds": time.perf_counter() - started, "steps": self.steps,
                "guidance": self.guidance, "switch_step": self.demo.switch_step(self.steps),
                "pairs": [list(p) for p in self.pairs], "profile": str(profile.path), "runs": self.records,
                "at_equal_passes": at_equal_passes(self.records, self.args.budgets),
                "separate_minus_shared": rule_differences(self.records),
                "one_expert": one_expert_rows(self.records)}


def mean_and_sem(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (calibration's summary statistics: the unbiased spread)."""
    from stepcache.calibrate import summary_stats
    stats = summary_stats(values)
    return stats["mean"], stats["std"] / stats["n"] ** 0.5


def rule_differences(records: list[dict]) -> list[dict]:
    """For each method and setting run with both rules: separate minus shared, in passes and in PSNR, paired over
    the same prompt-seed pairs (mean difference and its standard error: the noise of the comparison itself)."""
    shared = {(r["method"], json.dumps(r["params"], sort_keys=True)): r for r in records if r["rule"] == "shared"}
    out = []
    for r in records:
        other = shared.get((r["method"], json.dumps(r["params"], sort_keys=True))) if r["rule"] == "separate" else None
        if other is None:
            continue
        mean, sem = mean_and_sem([a - b for a, b in zip(r["psnr_per_pair"], other["psnr_per_pair"])])
        out.append({"method": r["method"], "params": r["params"], "passes": r["passes"] - other["passes"],
                    "psnr": mean, "psnr_sem": sem, "carried_over_shared": other.get("carried_over_passes")})
    return out


def at_equal_passes(records: list[dict], budgets) -> dict:
    """PSNR of each method and rule at each pass budget, by linear interpolation along its own sweep (None
    outside the sweep's range: no extrapolation)."""
    table = {}
    for name, points in curves_of(records).items():
        table[name] = {f"{b:.0%}": (None if (v := read_at(points, b)) is None else round(v, 2)) for b in budgets}
    return table


def curves_of(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """(passes, PSNR) points per "METHOD RULE" sweep, sorted (the report splits a name at its first space); runs
    that cache one expert only are single points, not sweeps."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        if "only" not in r["rule"]:
            curves.setdefault(f"{r['method']} {r['rule']}".strip(" -"), []).append((r["passes"], r["psnr"]))
    return {name: sorted(points) for name, points in curves.items()}


def read_at(points: list[tuple[float, float]], x: float) -> float | None:
    """The PSNR of a sorted sweep at pass share ``x``, linearly interpolated; None outside the sweep."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return next((y for px, y in points if px == x), None)


def one_expert_rows(records: list[dict]) -> list[dict]:
    """Each run that cached one expert alone, beside the separate rule on both experts at the same pass share."""
    curves = curves_of(records)
    out = []
    for r in records:
        if "only" in r["rule"]:
            both = read_at(curves.get(f"{r['method']} separate", []), r["passes"])
            out.append({"method": r["method"], "cached": r["rule"].split(", ")[1], "params": r["params"],
                        "passes": r["passes"], "psnr": r["psnr"], "both_at_same_passes": both})
    return out


def report(result: dict) -> str:
    lines = [f"# Two-expert demo bench ({result['steps']} steps, switch at step {result['switch_step']}, "
             f"{len(result['pairs'])} prompt-seed pairs)", "",
             "PSNR (dB) against the uncached two-expert run, read at equal shares of transformer passes:", "",
             "| method | rule | " + " | ".join(next(iter(result["at_equal_passes"].values())).keys()) + " |",
             "|---|---|" + "---|" * len(next(iter(result["at_equal_passes"].values())))]
    for name, row in result["at_equal_passes"].items():
        method, _, rule = name.partition(" ")
        cells = " | ".join("-" if v is None else f"{v:.2f}" for v in row.values())
        lines.append(f"| {method} | {rule or '-'} | {cells} |")
    lines += ["", "Every run (PSNR: mean over the pairs +- its standard error; carried over: passes of the low-noise "
              "expert that reused the high-noise expert's cached tensors, summed over the pairs):", "",
              "| method | rule | setting | passes | PSNR | SSIM | LPIPS | carried over |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        setting = ", ".join(f"{k}={v}" for k, v in r["params"].items())
        lp = "-" if r["lpips"] is None else f"{r['lpips']:.4f}"
        lines.append(f"| {r['method']} | {r['rule']} | {setting} | {r['passes']:.1%} | {r['psnr']:.2f} +- "
                     f"{r.get('psnr_sem', 0):.2f} | {r['ssim']:.4f} | {lp} | {r.get('carried_over_passes', '-')} |")
    lines += ["", "The two rules on the same setting, separate minus shared (PSNR paired over the same pairs, +- the "
              "standard error of the difference; a difference within about twice it ranks nothing):", "",
              "| method | setting | passes | PSNR | low-noise passes the shared rule carried over |", "|---|---|---|---|---|"]
    for d in result.get("separate_minus_shared", []):
        setting = ", ".join(f"{k}={v}" for k, v in d["params"].items())
        lines.append(f"| {d['method']} | {setting} | {d['passes']:+.1%} | {d['psnr']:+.2f} +- {d['psnr_sem']:.2f} | "
                     f"{d['carried_over_shared']} |")
    if result.get("one_expert"):
        lines += ["", "Caching one expert alone (the other computes every pass), against caching both with the "
                      "separate rule at the same share of passes:", "",
                  "| method | setting | cached | passes | PSNR | both experts, same passes |", "|---|---|---|---|---|---|"]
        for r in result["one_expert"]:
            setting = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            both = "-" if r["both_at_same_passes"] is None else f"{r['both_at_same_passes']:.2f}"
            lines.append(f"| {r['method']} | {setting} | {r['cached']} | {r['passes']:.1%} | {r['psnr']:.2f} | {both} |")
    lines += ["", f"LPIPS: {result.get('lpips', 'not computed')}"]
    return "\n".join(lines) + "\n"


def check_args(args) -> None:
    """Defaults of the shared bench flags for this bench, and one-line errors, before any model loads."""
    from stepcache.wan21.demo.model import GUIDANCE, STEPS
    quick = args.quick
    args.steps = STEPS if args.steps is None else args.steps
    args.guidance = GUIDANCE if args.guidance is None else args.guidance
    args.num_prompts = args.num_prompts or (3 if quick else 8)
    args.num_seeds = args.num_seeds or 1
    args.calibration_pairs = args.calibration_pairs or (2 if quick else 8)
    if args.steps < 4:
        raise BenchExpertsError(f"--steps {args.steps} is too few for a two-expert run; allowed: 4 or more")
    for b in args.budgets:
        if not 0 < b < 1:
            raise BenchExpertsError(f"--budgets value {b} is outside (0, 1): a share of the transformer passes")
    check_output_dir(args.out, "--out")


def run(args) -> int:
    """The two-expert bench (``stepcache bench --model demo-experts``); writes OUT/experts.json and experts.md."""
    import torch
    check_args(args)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    demo, info = build(args)
    bench = ExpertsBench(args, demo, out)
    from .lpips import load_lpips
    setup = load_lpips("alex", weights=args.lpips_weights, heads=args.lpips_heads)
    bench.lpips = setup.scorer
    result = {**bench.run(), "model": info, "lpips": setup.description}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "experts.json", result)
    text = report(result)
    write_text(out / "experts.md", text)
    print(text)
    print(f"wrote {out / 'experts.json'} and {out / 'experts.md'}")
    return 0


__all__ = ["at_equal_passes", "report", "run"]
