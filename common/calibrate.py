"""Calibration for any model, resolution and step count: run uncached, measure what each method needs, write
a profile file that every entry point accepts.

Per pass and per CFG branch, over every prompt and seed:

* MagCache: the magnitude ratio of successive block-stack residuals (mean over tokens of the per-token norm
  ratio), its per-token std and the token-wise cosine distance, as the reference records them; the profile's
  table is the mean over prompts and seeds, with the spread (std, min, max) beside it.
* TeaCache: pairs (relative L1 change of the method's signal, relative L1 change of the model output), and a
  polynomial fitted to them (degree 4, as published), stored with the range it was fitted on, its error on
  held-out runs, and a straight line's error for comparison. A polynomial that goes negative inside its range
  is flagged. Presets are thresholds that reuse about a quarter, 40% and half of the passes on the measured
  trajectories.
* EasyCache: the transformation rate ``k_t = mean|v_t - v_{t-1}| / mean|x_t - x_{t-1}|`` per step, whose
  settling justifies the warm-up length (the suggested warm-up is recorded).

The profile also records what it was measured on (model class and config hash, resolution, frames, steps,
scheduler and shift, guidance, dtype, prompts, seeds, tool version); :func:`check_profile_fit` compares that
with the model a profile is used on.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import families, methods
from .calibration_io import calibrated_source, write_profile
from .distributed import SequenceGroup
from .generate import add_size_arguments, apply_pipeline_defaults, pipeline_of
from .errors import InputError
from .methods.base import Method, mean_abs_ratio
from .methods.magcache import residual_ratio_stats
from .methods.teacache import relative_l1
from .policies import Decision, ParameterError, Polynomial
from .profiles import (FOLDER_PROFILE, FORMAT, Profile, ProfileError, check_profile_family, check_profile_fit, config_hash,
                       load_profile)
from .runner import CacheRunner, PassContext, RunStats

# Reuse fractions that name the speed levels (presets) of a calibrated profile.
SPEED_LEVELS = {"slow": 0.25, "medium": 0.4, "fast": 0.5}


class CalibrationError(InputError):
    pass


@dataclass
class PassMeasure:
    generation: int
    branch: str
    step: int
    expert: str | None = None  # which expert ran the pass (two-expert models)
    crosses_switch: bool = False  # compared with the other expert's pass: the jump at the switch, not a change
    ratio: float | None = None  # MagCache
    ratio_std: float | None = None
    cos_distance: float | None = None
    signal_change: float | None = None  # TeaCache x
    output_change: float | None = None  # TeaCache y
    rate: float | None = None  # EasyCache k
    input_change: float | None = None  # EasyCache: mean|x_t - x_{t-1}|
    output_mean: float | None = None  # EasyCache: mean|v_t|


@dataclass
class _Previous:
    residual: torch.Tensor | None = None
    signal: torch.Tensor | None = None
    output: torch.Tensor | None = None
    latent: torch.Tensor | None = None
    expert: str | None = None


_COMPUTE = Decision(True, "calibrate", None)


class _Measuring(Method):
    """Not a cache method: a calibration pass computes everything (it skips neither the stack nor the model)."""
    name = "calibrate"
    skips = None


class CalibrationRunner(CacheRunner):
    """Takes the place of a cache runner: every pass computes, and the runner measures.

    It keeps the cache runner's notion of a generation (a branch's step going back, a new step count, a new
    latent shape), so that several prompts and seeds run through one installed model are told apart.
    """

    method = "calibrate"
    wants_signal = True

    def __init__(self, signal_name: str | None, group: SequenceGroup | None = None,
                 sharded: frozenset[str] = frozenset()):
        """``group``: the sequence-parallel group when the model runs sharded (the official Wan2.1 scripts under
        USP): the residual's per-token statistics are summed over it, and the measurements named in ``sharded``
        are reduced as a cache run reduces them, so every rank records the full-sequence value."""
        self.spec = _Measuring()
        self.config = None
        self.signal_name = signal_name
        self.group_of = lambda: group
        self.sharded = frozenset(sharded)
        self.separate_experts = False  # one measurement series per branch across the experts, as the reference
        self.stats = RunStats("calibrate")
        self.generation = 0
        self.current: PassContext | None = None
        self.measures: list[PassMeasure] = []
        self._reset_state()

    def _reset_state(self) -> None:
        super()._reset_state()
        self.previous: dict[str, _Previous] = {}

    def _finish_generation(self) -> None:
        self.generation_open = False  # every pass computes: nothing to warn about

    def _branch(self, name: str, expert: str | None = None):
        state = self.branches.get(name)
        if state is None:
            from .runner import BranchState
            state = self.branches[name] = BranchState(policy=None)
            self.previous[name] = _Previous()
        return state

    def _sum_over_group(self, sums: torch.Tensor) -> None:
        group = self.group_of()
        if group is not None:
            group.sum(sums)

    def begin_pass(self, branch, step, num_steps, latent, expert=None, switch_step=None):
        ctx = super().begin_pass(branch, step, num_steps, latent, expert, switch_step)
        ctx.decision = _COMPUTE
        ctx.measure = PassMeasure(self.generation, branch, step, expert)
        previous = self.previous[ctx.branch]
        ctx.measure.crosses_switch = previous.expert is not None and expert is not None and previous.expert != expert
        previous.expert = expert
        return ctx

    def enter_stack(self, h0, signal=None):
        ctx = self._require_pass()
        ctx.h0 = h0
        previous = self.previous[ctx.branch]
        if signal is not None:
            if previous.signal is not None and previous.signal.shape == signal.shape:
                ctx.measure.signal_change = relative_l1(self.signal_mean_abs, signal, previous.signal)
            previous.signal = signal.detach()
        return None

    def leave_stack(self, h_out):
        ctx = self._require_pass()
        if ctx.h0 is None:
            return
        residual = (h_out - ctx.h0).detach()
        previous = self.previous[ctx.branch]
        if previous.residual is not None and previous.residual.shape == residual.shape:
            ctx.measure.ratio, ctx.measure.ratio_std, ctx.measure.cos_distance = residual_ratio_stats(
                residual, previous.residual, self._sum_over_group)
        previous.residual = residual
        ctx.h0 = None

    def end_pass(self, output):
        ctx = self._require_pass()
        previous = self.previous[ctx.branch]
        latent = ctx.latent
        if output is not None:
            ctx.measure.output_mean = float(self.latent_mean_abs(output)[0])
        if output is not None and previous.output is not None and previous.output.shape == output.shape:
            ctx.measure.output_change = relative_l1(self.latent_mean_abs, output, previous.output)
            ctx.measure.input_change = float(self.latent_mean_abs(latent - previous.latent)[0])
            ctx.measure.rate = mean_abs_ratio(self.latent_mean_abs, output - previous.output, latent - previous.latent)
        previous.output = output.detach() if output is not None else None
        previous.latent = latent.detach()
        self.measures.append(ctx.measure)
        super().end_pass(output)


# ------------------------------------------------------------------------------------------------- analysis
@dataclass
class Calibration:
    """What a method's ``calibration_section`` reads: the measurements and the run's shape."""
    measures: list[PassMeasure]
    branches: list[str]
    steps: int
    base: Profile | None
    signal_name: str | None

    def grouped(self, attr: str) -> dict[tuple[str, int], list[float]]:
        """Values of one measurement, per (branch, step), over every prompt and seed."""
        out: dict[tuple[str, int], list[float]] = {}
        for m in self.measures:
            value = getattr(m, attr)
            if value is not None:
                out.setdefault((m.branch, m.step), []).append(value)
        return out

    def expert_steps(self) -> dict[str, list[int]]:
        """Each expert's steps ``[first, end)`` on a two-expert model (empty on one model). Every run must switch
        at the same step: calibration runs share one step count and one schedule."""
        spans: dict[str, set[tuple[int, int]]] = {}
        for run in self.runs().values():
            steps: dict[str, list[int]] = {}
            for m in run:
                if m.expert is not None:
                    steps.setdefault(m.expert, []).append(m.step)
            for expert, seen in steps.items():
                spans.setdefault(expert, set()).add((min(seen), max(seen) + 1))
        if any(len(found) > 1 for found in spans.values()):
            raise CalibrationError(f"the runs switch experts at different steps ({spans}); calibrate at one step "
                                   f"count and one boundary")
        return {expert: list(next(iter(found))) for expert, found in
                sorted(spans.items(), key=lambda item: next(iter(item[1])))}

    def runs(self, measures: list[PassMeasure] | None = None) -> dict[tuple[int, str], list[PassMeasure]]:
        """The measurements of each (generation, branch), in order."""
        out: dict[tuple[int, str], list[PassMeasure]] = {}
        for m in self.measures if measures is None else measures:
            out.setdefault((m.generation, m.branch), []).append(m)
        return out


def summary_stats(values: Sequence[float]) -> dict[str, float]:
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values), "n": len(values)}


def fit_polynomial(x: list[float], y: list[float], degree: int) -> list[float]:
    import numpy as np
    return [float(c) for c in np.polyfit(np.asarray(x), np.asarray(y), degree)]


def rmse(coefficients, x, y) -> float:
    poly = Polynomial(coefficients)
    return math.sqrt(sum((poly(a) - b) ** 2 for a, b in zip(x, y)) / len(x))


def threshold_for(fraction: float, reuse) -> float:
    """The smallest threshold (4 significant digits) at which ``reuse(thresh)`` reaches ``fraction``."""
    low, high = 0.0, 1e-3
    while reuse(high) < fraction and high < 1e6:
        high *= 2
    for _ in range(40):
        mid = (low + high) / 2
        if reuse(mid) < fraction:
            low = mid
        else:
            high = mid
    rounded = float(f"{high:.4g}")
    if rounded < high:  # rounding down can fall below the boundary: go up one unit of the 4th digit
        rounded = float(f"{rounded + 10 ** (math.floor(math.log10(rounded)) - 3):.4g}")
    return rounded


def speed_presets(reuse) -> tuple[dict, dict]:
    """Thresholds reusing about SPEED_LEVELS of the passes; where the warm-up leaves too few passes to reach a
    level, the threshold that reuses all it can, with a note saying how much that is."""
    ceiling = reuse(1e6)
    presets, notes = {}, {}
    for level, fraction in SPEED_LEVELS.items():
        if ceiling == 0:
            presets[level] = {"thresh": 0.05}
            notes[level] = "the warm-up covers the whole calibration run: nothing could be reused"
            continue
        target = min(fraction, ceiling)
        presets[level] = {"thresh": threshold_for(target, reuse)}
        notes[level] = (f"reuses about {int(fraction * 100)}% of the passes on the calibration runs"
                        if target == fraction else
                        f"reuses {target:.0%} of the passes on the calibration runs, all the warm-up leaves")
    return presets, notes


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class CalibrationRun:
    """What to run: one generation per (prompt, seed), each through ``generate(prompt, seed)``."""
    prompts: list[str]
    seeds: list[int]
    steps: int
    meta: dict[str, Any] = field(default_factory=dict)


def install_calibration(target, num_steps: int, signal_name: str | None = None, group: SequenceGroup | None = None):
    """Install a :class:`CalibrationRunner` on ``target`` (a pipeline or a transformer) in place of a cache: the
    one calibrator behind ``stepcache calibrate`` and the official scripts' ``--magcache_calibration``. Returns
    the ``CachedModel`` (``.runner`` holds the measurements; call ``start_generation(steps)`` before each
    generation a caller's own loop runs, and ``remove()`` after)."""
    from .api import StepClock, _resolve_target, adapter_for, install, targets_of
    model, pipeline = _resolve_target(target)
    adapter = adapter_for(model, pipeline)
    models, switch_step = targets_of(model, pipeline)
    runner = CalibrationRunner(signal_name or getattr(adapter, "default_signal", None), group,
                               getattr(adapter, "sequence_sharded", frozenset()))
    return install(models, adapter, "calibrate", None, StepClock(pipeline, num_steps), runner=runner,
                   switch_step=switch_step)


def measure(target, run: CalibrationRun, generate, signal_name: str | None = None, progress=True):
    """Install a :class:`CalibrationRunner` on ``target`` (a pipeline or a transformer), call
    ``generate(prompt, seed)`` for every pair, and return the runner with its measurements."""
    if not run.prompts:
        raise CalibrationError("calibration needs at least one prompt; the prompt list is empty")
    if run.steps < 2:
        raise CalibrationError(f"steps={run.steps} is too few; calibration needs at least 2 denoising steps")
    if not run.seeds:
        raise CalibrationError("calibration needs at least one seed")
    cached = install_calibration(target, run.steps, signal_name)
    runner, adapter, model = cached.runner, cached.adapter, cached.model
    pairs = [(p, s) for p in run.prompts for s in run.seeds]
    try:
        from tqdm.auto import tqdm
        for prompt, seed in tqdm(pairs, desc="calibrating", disable=not progress, file=sys.stderr):
            cached.start_generation(run.steps)
            generate(prompt, seed)
    finally:
        cached.remove()
    return runner, adapter, model


def build_profile(runner: CalibrationRunner, adapter, model, run: CalibrationRun, name: str,
                  base: Profile | None = None, description: str | None = None) -> dict[str, Any]:
    measures = [m for m in runner.measures]
    branches: list[str] = []
    for m in measures:
        if m.branch not in branches:
            branches.append(m.branch)
    if base is not None and base.has("magcache"):
        order = base.magcache_branches()
        branches.sort(key=lambda b: order.index(b) if b in order else len(order))
    config = dict(getattr(model, "config", {}) or {})
    steps = run.steps
    family = adapter.family
    data: dict[str, Any] = {
        "format": FORMAT, "name": name,
        "description": description or f"{type(model).__name__} calibrated by stepcache",
        "model": {"family": family, "task": (base.data.get("model", {}).get("task") if base else None),
                  "resolution": run.meta.get("resolution"), "config": adapter.describe_config(model),
                  "classes": [type(model).__name__], "detect": False},
        "measured_on": {"model_class": type(model).__name__, "config_hash": config_hash(config),
                        "steps": steps, "prompts": len(run.prompts), "seeds": list(run.seeds),
                        "branches": branches, **run.meta, "tool": calibrated_source()},
        "source": calibrated_source(),
    }
    calibration = Calibration(measures, branches, steps, base, runner.signal_name)
    for method in methods.names():
        data[method] = methods.get(method).calibration_section(calibration)
    if base is not None:
        data["measured_on"]["base_profile"] = base.name
    return data


# ------------------------------------------------------------------------------------------ resampling study
def resampling_errors(base: dict[str, Any], measured: dict[str, Any]) -> dict[str, float]:
    """Mean absolute error of each resampling mode's prediction of ``measured``'s ratios from ``base``'s.

    Both are MagCache sections; every branch and every step after the padding counts.
    """
    from .profiles import split_branch_ratios
    steps = int(measured["steps"])
    branches = measured["branches"]
    errors = {}
    for mode in ("nearest", "compose"):
        diffs = []
        for index, branch in enumerate(branches):
            truth = split_branch_ratios(measured["ratios"], len(branches), steps, index, "none", "measured")
            source = base["branches"].index(branch) if branch in base["branches"] else 0
            guess = split_branch_ratios(base["ratios"], len(base["branches"]), steps, source, mode, "base")
            diffs += [abs(a - b) for a, b in zip(guess[1:], truth[1:])]
        errors[mode] = sum(diffs) / len(diffs)
    return errors


# ------------------------------------------------------------------------------------------------------ CLI
def add_arguments(parser) -> None:
    parser.description = ("Run a model uncached over prompts and seeds, measure what TeaCache, MagCache and "
                          "EasyCache need, and write a profile file that every entry point accepts.")
    shipped = ", ".join(sorted(n for f in families.families() for n in f.calibration_targets))
    parser.add_argument("--model", required=True,
                        help=f"local diffusers pipeline folder ({', '.join(families.pipelines())}), or a model "
                             f"that ships with stepcache: {shipped}")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", default=None, help="a .txt (one per line) or .json file of prompts")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per prompt (default 0)")
    parser.add_argument("--image", default=None, help="the first frame, for image-to-video pipelines (every "
                                                      "calibration run starts from it)")
    add_size_arguments(parser, "denoising steps to calibrate at")
    parser.add_argument("--guidance", type=float, default=None, help="CFG / embedded guidance scale")
    parser.add_argument("--true-cfg", type=float, default=1.0,
                        help="true CFG scale, for pipelines that take one: " + ", ".join(
                            name for name, (_, spec) in families.pipelines().items() if spec.true_cfg))
    parser.add_argument("--base-profile", default=None,
                        help=f"a profile whose thresholds, presets and rules the new one keeps (default: the "
                             f"folder's {FOLDER_PROFILE} if it has one, else the shipped profile matched on the "
                             f"model's config, if any)")
    parser.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    parser.add_argument("--out", required=True, help="profile file to write (.json)")


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        from .eval.prompts import load_prompts
        prompts += load_prompts(args.prompts)
    return prompts


def _diffusers_target(args):
    """(pipeline, generate(prompt, seed), meta) for a local diffusers folder."""
    from .generate import load_pipeline, resolve_device
    folder = Path(args.model)
    pipeline_class, _, spec = pipeline_of(folder, CalibrationError)
    device = resolve_device(args.device, CalibrationError)
    pipe = load_pipeline(folder, pipeline_class, spec, args.dtype, device)
    pipe.set_progress_bar_config(disable=True)
    call = spec.call_kwargs(args.guidance, args.true_cfg, pipe)
    guidance = call.get("guidance_scale", getattr(getattr(pipe, "guider", None), "guidance_scale", None))
    if args.image:
        from diffusers.utils import load_image
        call["image"] = load_image(args.image)

    def generate(prompt, seed):
        out = pipe(prompt=prompt, negative_prompt="", num_frames=args.frames, num_inference_steps=args.steps,
                   output_type="latent", generator=torch.Generator(device="cpu").manual_seed(seed),
                   **spec.size_kwargs(args.height, args.width), **call)
        if spec.size_from_image:  # the pipeline sized the video from the first frame: record the size it ran at
            latents, scale = out.frames, pipe.vae_scale_factor_spatial
            meta["resolution"] = [int(latents.shape[-2]) * scale, int(latents.shape[-1]) * scale]

    scheduler = pipe.scheduler
    meta = {"resolution": [args.height, args.width], "frames": args.frames, "guidance": guidance,
            **{k: v for k, v in call.items() if k != "image"}, **({"image": args.image} if args.image else {}),
            "scheduler": type(scheduler).__name__, "shift": scheduler.config.get("shift",
                                                                                   scheduler.config.get("flow_shift")),
            "dtype": args.dtype, "pipeline": pipeline_class}
    return pipe, generate, meta


def run(args) -> int:
    from .api import adapter_for, _resolve_target
    try:
        prompts = _prompts(args)
        if not prompts:
            raise CalibrationError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
        if Path(args.out).suffix != ".json":
            raise CalibrationError(f"--out {args.out} must end in .json")
        base = load_profile(args.base_profile) if args.base_profile else None
        named = families.calibration_target(args.model)  # e.g. "demo": a model a family ships
        spec = None if named is not None else pipeline_of(Path(args.model), CalibrationError)[2]
        if spec is not None and spec.needs_image != bool(args.image):
            raise CalibrationError("this is an image-to-video pipeline: pass --image FIRST_FRAME" if spec.needs_image
                                   else "--image is for image-to-video pipelines; this one takes none")
        if args.image and not Path(args.image).is_file():
            raise CalibrationError(f"--image {args.image} does not exist")
        apply_pipeline_defaults(args, spec, CalibrationError)
        if args.steps < 2:
            raise CalibrationError(f"--steps {args.steps} is too few; calibration needs at least 2 steps")
        folder_profile = Path(args.model) / FOLDER_PROFILE
        if base is None and named is None and folder_profile.is_file():
            base = load_profile(str(folder_profile))
        target, generate, meta = named(args) if named is not None else _diffusers_target(args)
        model, _ = _resolve_target(target)
        adapter = adapter_for(model)
        if base is not None:
            check_profile_family(base, adapter.family)
            check_profile_fit(base, model)
        else:
            found = adapter.detect_profiles(model)
            base = found[0] if found else None
        run_spec = CalibrationRun(prompts, list(args.seeds), args.steps, meta)
        runner, adapter, model = measure(target, run_spec, generate)
        name = args.name or Path(args.out).stem
        data = build_profile(runner, adapter, model, run_spec, name, base)
        profile = write_profile(args.out, data)
    except (CalibrationError, ParameterError, ProfileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe_calibration(profile))
    return 0


def describe_calibration(profile: Profile) -> str:
    lines = [f"wrote profile {profile.name} ({profile.path})"]
    for method in methods.names():
        if profile.has(method):
            lines += methods.get(method).describe_calibration(profile.method(method))
    # A calibration target may say how to run what it measured (the demo model is run by `stepcache demo`).
    runner = profile.data.get("measured_on", {}).get("run_with") or "stepcache generate --profile {profile} ..."
    lines.append(f"use it with: {runner.format(profile=profile.path)}   or   "
                 f"stepcache schedule --profile {profile.path} --list-presets")
    return "\n".join(lines)
