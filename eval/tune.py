"""`stepcache tune`: choose by speedup instead of threshold, on your own pipeline.

For each target speedup (``--speedups 1.5,2,2.5,3``, counted in block work: the ideal speedup), it
calibrates the pipeline as ``stepcache calibrate`` does, then searches on tuning prompts each method's settings
(TeaCache, MagCache, EasyCache, each reusing or predicting linearly), the fixed skip pattern with linear prediction,
and plain fewer steps, and picks the highest PSNR (against the uncached video) among the settings that reach the
target. Each pick is then checked on held-out prompts it was not chosen on. The profile written to ``--out`` holds
the calibrated tables and, per method, presets named by speed (``2x``, ``2.5x``...) with the measured numbers, so
that ``stepcache.enable(pipe, "magcache", profile="P.json", preset="2x")`` and ``stepcache generate --preset 2x``
run them. When fewer steps beats every cache at a speed, the profile says so: then run fewer steps.

The numbers are measured at one operating point (the steps, guidance and size given); the profile records it.

Design notes: docs/bench.md#choosing-by-speedup-stepcache-tune
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path

from ..errors import InputError
from ..generate import add_size_arguments
from ..outputs import check_output_file, write_json
from ..timing import meter_for

METHODS = ("teacache", "magcache", "easycache")
PREDICTIONS = ("reuse", "linear")
FIXED_KS = (2, 3, 4, 5, 6)
THRESHOLD_TRIES = 5          # an input-dependent method's threshold is raised this many times at most
THRESHOLD_STEP = 1.35        # by this factor each time


class TuneError(InputError):
    pass


def first_threshold(medium: float, speedup: float) -> float:
    """Where an input-dependent method's (TeaCache's, EasyCache's) search for ``speedup`` starts: the calibration's
    ``medium`` preset reuses about half the passes on the calibration runs, so its threshold scaled by the share of
    passes wanted."""
    return float(f"{medium * max(0.25, (1 - 1 / speedup) / 0.5):.4g}")


def threshold_tries(medium: float, speedup: float):
    """The thresholds an input-dependent method is run at, in turn, until one reaches ``speedup``: from
    :func:`first_threshold`, raised by ``THRESHOLD_STEP`` each time."""
    thresh = first_threshold(medium, speedup)
    for _ in range(THRESHOLD_TRIES):
        yield thresh
        thresh = float(f"{thresh * THRESHOLD_STEP:.4g}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\nDesign notes")[0].replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--pipeline", required=True, metavar="DIR_OR_ID",
                        help="a diffusers pipeline stepcache supports (image-to-video with --prompts FILE.json "
                             "naming a first frame per prompt), as a folder or a Hugging Face Hub id (fetched into "
                             "its cache); the demo's saved folder: stepcache demo --save-pipeline DIR")
    parser.add_argument("--speedups", required=True,
                        help="comma-separated target speedups, each > 1, e.g. 1.5,2,2.5,3 (ideal speedups: the block "
                             "work of the uncached run over the block work that ran)")
    parser.add_argument("--out", required=True, help="the profile file to write (.json)")
    parser.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    parser.add_argument("--prompts", default=None,
                        help="a .txt or .json prompt file, or 'vbench'; tuning takes the first prompts, the held-out "
                             "check the next ones, calibration the last ones (default: the pipeline's own)")
    parser.add_argument("--tune-prompts", type=int, default=6, help="prompts the settings are chosen on (default 6)")
    parser.add_argument("--heldout-prompts", type=int, default=6,
                        help="prompts each pick is checked on, after the tuning ones (default 6)")
    parser.add_argument("--calibration-pairs", type=int, default=4, help="calibration prompts (default 4)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated stepcache methods to tune (default: all three)")
    add_size_arguments(parser, "denoising steps of the operating point")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")


# ------------------------------------------------------------------------------------------------- checks
def parse_speedups(text: str) -> list[float]:
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise TuneError(f"--speedups {text!r}: give comma-separated numbers, e.g. 1.5,2,3") from None
    bad = [v for v in values if not math.isfinite(v) or v <= 1]
    if not values or bad:
        raise TuneError(f"--speedups {text!r}: each speedup must be a number > 1 (1 is the uncached run)")
    return values


def preset_name(speedup: float) -> str:
    """'2x', '2.5x': the name a tuned preset has."""
    return f"{speedup:g}x"


def check(args) -> dict:
    """Every argument, resolved, before any model loads."""
    from ..generate import apply_pipeline_defaults, pipeline_folder, pipeline_of, resolve_device
    from .bench_subject import check_prompt_budget, subject_images, subject_prompts
    speedups = parse_speedups(args.speedups)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise TuneError(f"--methods {args.methods!r}: allowed: {', '.join(METHODS)}")
    for flag, value in (("--tune-prompts", args.tune_prompts), ("--heldout-prompts", args.heldout_prompts),
                        ("--calibration-pairs", args.calibration_pairs), ("--threads", args.threads)):
        if value < 1:
            raise TuneError(f"{flag} {value}: give at least 1")
    if Path(args.out).suffix != ".json":
        raise TuneError(f"--out {args.out}: a profile file ends in .json")
    check_output_file(args.out, "--out", (".json",))
    folder = pipeline_folder(args.pipeline, TuneError, "--pipeline", full=False)
    pipeline_class, _, spec = pipeline_of(folder, TuneError)
    index = json.loads((folder / "model_index.json").read_text())
    apply_pipeline_defaults(args, spec, TuneError)
    prompts = subject_prompts(args, spec)
    images = subject_images(args, pipeline_class, spec, prompts)
    check_prompt_budget(prompts, args.tune_prompts + args.heldout_prompts, f"--tune-prompts {args.tune_prompts} + "
                        f"--heldout-prompts {args.heldout_prompts}", args.calibration_pairs, "stepcache tune")
    guidance = spec.guidance if args.guidance is None else args.guidance
    return {"folder": folder, "pipeline_class": pipeline_class, "spec": spec, "speedups": speedups,
            "methods": methods, "prompts": prompts, "images": images, "guidance": guidance,
            "device": resolve_device(args.device, TuneError)}


# ------------------------------------------------------------------------------------------------ the search
class Tuner:
    def __init__(self, args, checked: dict, subject, work: Path):
        from .bench import Calibrations, bench_pairs
        from .bench_peers import Context
        self.args, self.checked, self.subject = args, checked, subject
        self.steps, self.guidance = args.steps, checked["guidance"]
        prompts = checked["prompts"]
        self.tune_pairs = bench_pairs(args.tune_prompts, 1, 0, prompts)
        self.heldout_pairs = bench_pairs(args.heldout_prompts, 1, args.tune_prompts, prompts)
        self.calibrations = Calibrations(subject, work, self.steps, self.guidance, args.calibration_pairs, None,
                                         prompts)
        self.ctx = Context(subject, self.steps, self.calibrations)
        self.meter = meter_for(checked["device"], "wall")
        self.reference: dict[str, list] = {}
        self.baseline_seconds: dict[str, float] = {}
        self.baseline_work: dict[str, int] = {}
        self.runs: list[dict] = []

    # --- generation -------------------------------------------------------------------------------------------
    def videos(self, pairs, steps: int) -> tuple[list, float, int]:
        """uint8 videos of ``pairs`` at ``steps``, the seconds they took (denoising only) and the block work that
        ran (multiply-adds in the block stack: what a cache saves)."""
        from .bench import BlockWork, denoisers, to_uint8
        out, seconds = [], 0.0
        counter = BlockWork(*denoisers(self.subject.pipe))
        try:
            for prompt, seed in pairs:
                self.meter.start()
                latent = self.subject.latents([prompt], [seed], steps, self.guidance)
                seconds += self.meter.stop()[0]
                out.append(to_uint8(self.subject.decode(latent))[0])
        finally:
            counter.remove()
        return out, seconds, counter.macs

    def baseline(self, which: str) -> None:
        pairs = self.tune_pairs if which == "tune" else self.heldout_pairs
        print(f"uncached reference: {len(pairs)} {which} videos, {self.steps} steps", flush=True)
        self.reference[which], self.baseline_seconds[which], self.baseline_work[which] = self.videos(pairs,
                                                                                                     self.steps)

    def score(self, method, params: dict, which: str = "tune") -> dict:
        """One setting on the tuning (or held-out) prompts: ideal speedup from the passes that ran, wall-clock
        speedup against the uncached run, PSNR and SSIM against it."""
        from .bench import quality
        pairs = self.tune_pairs if which == "tune" else self.heldout_pairs
        steps = method.steps(self.ctx, params)
        try:
            method.install(self.ctx, params)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a setting that reuses nothing is a result here, not a warning
                videos, seconds, work = self.videos(pairs, steps)
        finally:
            method.remove(self.ctx)
        scores = [quality(ref, video) for ref, video in zip(self.reference[which], videos)]
        row = {"method": method.key, "params": params, "steps": steps, "which": which,
               "compute_fraction": work / self.baseline_work[which],
               "ideal_speedup": self.baseline_work[which] / max(work, 1),
               "wall_speedup": self.baseline_seconds[which] / seconds if seconds > 0 else None,
               "psnr": sum(s["psnr"] for s in scores) / len(scores),
               "ssim": sum(s["ssim"] for s in scores) / len(scores)}
        self.runs.append(row)
        print(f"  {method.key:<28} {json.dumps(params):<44} {row['ideal_speedup']:.2f}x  PSNR {row['psnr']:.2f} dB",
              flush=True)
        return row

    @property
    def passes_per_step(self) -> int:
        return self._passes_per_step

    def count_passes_per_step(self) -> None:
        """Transformer calls per denoising step of the uncached run (2 with CFG, 1 without)."""
        from .bench import BlockWork, denoisers
        counter = BlockWork(*denoisers(self.subject.pipe))
        try:
            prompt, seed = self.tune_pairs[0]
            self.subject.latents([prompt], [seed], 2, self.guidance)
            self._passes_per_step = max(1, counter.calls // 2)
        finally:
            counter.remove()

    # --- candidates per target --------------------------------------------------------------------------------
    def fewer_steps(self, target: float) -> list[tuple]:
        from .bench_peers import FewerSteps
        steps = max(1, math.floor(self.steps / target))
        return [(FewerSteps(), {"steps": steps})] if steps >= 2 else []

    def fixed_linear(self, target: float) -> list[tuple]:
        """The fixed 1-in-k pattern with linear prediction: the ks whose schedule reaches ``target`` (known
        without running: the pattern does not depend on the input)."""
        from stepcache.schedule import SPEEDUP_RETENTIONS
        from .bench_peers import FixedSkip
        method = FixedSkip(linear=True)
        out = []
        for retention in SPEEDUP_RETENTIONS:
            for k in FIXED_KS:
                params = {"k": k, "retention_ratio": retention}
                if self.magcache_speedup(method, params) >= target:
                    out.append((method, params))
                    break
        return out

    def magcache_speedup(self, method, params: dict) -> float:
        from stepcache.methods import resolve_method
        from stepcache.schedule import simulate
        config = resolve_method("magcache", method.profile(self.ctx), None, **method.stepcache_params(self.ctx,
                                                                                                        params))
        branches = config.profile.magcache_branches()[:self.passes_per_step]
        computed, total = simulate(config, self.steps, branches).counts()
        return total / max(computed, 1)

    def magcache(self, method, target: float) -> list[tuple]:
        """Per K and retention, the smallest threshold whose schedule reaches ``target`` (found on the table, as
        ``stepcache schedule --speedup`` finds it: the schedule is input-independent)."""
        from stepcache.schedule import magcache_reaching
        branches = method.profile(self.ctx).magcache_branches()[:self.passes_per_step]
        return [(method, found["params"]) for found in magcache_reaching(method.profile(self.ctx), target,
                                                                           self.steps, branches)]

    def input_dependent(self, method, target: float) -> dict | None:
        """TeaCache and EasyCache: start from the threshold the calibration replay gives for the target share
        of passes, raise it until the tuning runs reach the target; the best-scoring run that reaches it."""
        section = method.profile(self.ctx).method(method.method)
        for thresh in threshold_tries(section["presets"]["medium"]["thresh"], target):
            row = self.score(method, {"thresh": thresh})
            if row["ideal_speedup"] >= target:
                return row
        return None

    # --- the whole thing ------------------------------------------------------------------------------------
    def tune(self) -> dict:
        from .bench_peers import StepcacheMethod
        self.count_passes_per_step()
        self.calibrations.profile  # noqa: B018  (calibrates now, on the calibration prompts)
        self.baseline("tune")
        self.baseline("heldout")
        results = {}
        for target in self.checked["speedups"]:
            print(f"target {target:g}x:", flush=True)
            rows = [self.score(m, p) for m, p in self.fewer_steps(target) + self.fixed_linear(target)]
            per_method = {}
            for name in self.checked["methods"]:
                for predict in PREDICTIONS:
                    method = StepcacheMethod(name, name, "linear" if predict == "linear" else None)
                    if name == "magcache":
                        found = [self.score(m, p) for m, p in self.magcache(method, target)]
                        found = [r for r in found if r["ideal_speedup"] >= target]
                        best = max(found, key=lambda r: r["psnr"]) if found else None
                    else:
                        best = self.input_dependent(method, target)
                    if best is not None:
                        best = {**best, "stepcache_params": method.stepcache_params(self.ctx, best["params"])}
                        rows.append(best)
                        current = per_method.get(name)
                        if current is None or best["psnr"] > current["psnr"]:
                            per_method[name] = best
            reaching = [r for r in rows if r["ideal_speedup"] >= target]
            pick = max(reaching, key=lambda r: r["psnr"]) if reaching else None
            heldout = None
            if pick is not None:
                method = self._method_of(pick)
                heldout = self.score(method, pick["params"], "heldout")
            results[preset_name(target)] = {"target": target, "pick": pick, "heldout": heldout,
                                            "per_method": per_method,
                                            "missing": [m for m in self.checked["methods"] if m not in per_method]}
        return results

    def _method_of(self, row):
        from .bench_peers import FewerSteps, FixedSkip, StepcacheMethod
        key = row["method"]
        if key == "floor-steps":
            return FewerSteps()
        if key.startswith("floor-fixed"):
            return FixedSkip(linear=key.endswith("linear"))
        name = key.split("-")[1]
        return StepcacheMethod(name, name, "linear" if key.endswith("-linear") else None)


# ------------------------------------------------------------------------------------------------- output
def tuned_profile(tuner: Tuner, results: dict, name: str, args, checked: dict) -> dict:
    """The calibrated profile, with each method's best setting per speed as a preset named by that speed, and
    the measured numbers and the overall pick (which may be fewer steps) in ``tuned``."""
    data = json.loads(json.dumps(tuner.calibrations.profile.data))
    data["name"] = name
    data["description"] = f"{checked['pipeline_class']} at {args.height}x{args.width}, {args.frames} frames, " \
                          f"{args.steps} steps, guidance {checked['guidance']:g}: tuned by stepcache tune"
    for level, result in results.items():
        for method, row in result["per_method"].items():
            params = {k: v for k, v in row["stepcache_params"].items() if k != "coefficients"}
            data[method].setdefault("presets", {})[level] = params
            data[method].setdefault("preset_notes", {})[level] = (
                f"tuned: {row['ideal_speedup']:.2f}x in passes, PSNR {row['psnr']:.2f} dB on the tuning prompts")
    data["tuned"] = {
        "operating_point": {"steps": args.steps, "guidance": checked["guidance"], "height": args.height,
                            "width": args.width, "frames": args.frames, "dtype": args.dtype,
                            "device": checked["device"]},
        "pipeline": str(checked["folder"].resolve()), "pipeline_class": checked["pipeline_class"],
        "tuning_pairs": [list(p) for p in tuner.tune_pairs], "heldout_pairs": [list(p) for p in tuner.heldout_pairs],
        "speedups": {level: {"target": r["target"], "pick": _slim(r["pick"]), "heldout": _slim(r["heldout"]),
                             "per_method": {m: _slim(row) for m, row in r["per_method"].items()},
                             "not_reached": r["missing"]}
                     for level, r in results.items()},
        "runs": [_slim(r) for r in tuner.runs],
        "source": "stepcache tune: PSNR against the uncached video of the same prompt and seed; ideal speedup from "
                  "the transformer passes that ran; wall-clock speedup against the uncached run timed in the same "
                  "session",
    }
    return data


def _slim(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
            if k not in ("stepcache_params",)}


def summary(results: dict) -> list[str]:
    lines = []
    for level, r in results.items():
        pick, held = r["pick"], r["heldout"]
        if pick is None:
            lines.append(f"{level}: nothing reached {r['target']:g}x on this model")
            continue
        lines.append(f"{level}: best {pick['method']} {json.dumps(pick['params'])}: {pick['ideal_speedup']:.2f}x, "
                     f"PSNR {pick['psnr']:.2f} dB on the tuning prompts, {held['psnr']:.2f} dB held out "
                     f"({held['ideal_speedup']:.2f}x)")
        for method, row in r["per_method"].items():
            lines.append(f"      preset {method} {level}: {row['ideal_speedup']:.2f}x, PSNR {row['psnr']:.2f} dB")
        for method in r["missing"]:
            lines.append(f"      no {method} preset {level}: no setting tried reached {r['target']:g}x on the tuning "
                         f"prompts (its warm-up, or the thresholds tried, leave too many passes)")
        if pick["method"] == "floor-steps":
            lines.append(f"      fewer steps beats every cache at {level} on this model: run "
                         f"{pick['params']['steps']} steps uncached")
        elif pick["method"].startswith("floor-fixed"):
            best = max(r["per_method"].values(), key=lambda row: row["psnr"], default=None)
            behind = f" ({pick['psnr'] - best['psnr']:.2f} dB ahead of the best cache)" if best else ""
            lines.append(f"      the fixed 1-in-k pattern beats every cache at {level}{behind}; it has no preset: "
                         f"the presets are each cache's best")
    return lines


def run(args) -> int:
    import torch
    from stepcache.calibration_io import write_profile
    from .bench_subject import PipelineSubject
    checked = check(args)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    from ..generate import pipeline_folder
    folder = pipeline_folder(args.pipeline, TuneError, "--pipeline")   # a Hub pipeline's weights arrive now
    subject = PipelineSubject(folder, checked["pipeline_class"], checked["spec"], args.dtype,
                              checked["device"], args.height, args.width, args.frames, images=checked["images"])
    with tempfile.TemporaryDirectory(prefix="stepcache-tune-") as work:
        tuner = Tuner(args, checked, subject, Path(work))
        results = tuner.tune()
        name = args.name or Path(args.out).stem
        profile = write_profile(args.out, tuned_profile(tuner, results, name, args, checked))
    print("\n".join(summary(results)))
    print(f"wrote {profile.path} ({time.perf_counter() - started:.0f} s); its presets: stepcache schedule --profile "
          f"{args.out} --list-presets")
    return 0


__all__ = ["add_arguments", "parse_speedups", "preset_name", "run"]
