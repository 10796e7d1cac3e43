"""The methods `stepcache bench` runs: the floors, stepcache's three methods, and the peers, each with its sweep.

Every method is a :class:`Method`: a key, a family, the package it needs, a sweep (the quick one a subset of
the full one), the full configuration of each run (printed and stored, so a reader can check that every peer
got a fair chance) and ``install``/``remove``. A peer that cannot run says why: a missing package
(:meth:`Method.unavailable`) or the error its run raised, stored as raised, never hidden. Each peer is
configured as its documentation allows; how, and why, is written for readers in the docs.

Design notes: docs/bench.md#against-the-peers-stepcache-bench (How each peer is configured)
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

# Wan's attention modules (A6 in the project's peer notes): TaylorSeer's default patterns do not match them.
WAN_ATTENTION_PATTERN = r"^(blocks|transformer_blocks|single_transformer_blocks)\.\d+\.attn\d*$"
CACHE_DIT_VERSION = "1.5.3"
# K=3 is the smallest K that can reach 2.5x on 30 steps after a 20 % retention (K=2 stops at 2.14x).
MAGCACHE_GRID = [dict(thresh=t, K=k) for k in (2, 3, 4, 6) for t in (0.03, 0.06, 0.12, 0.24, 0.5)]
MAGCACHE_QUICK = [dict(thresh=0.12, K=2), dict(thresh=0.24, K=2), dict(thresh=0.5, K=4)]
# TeaCache and EasyCache thresholds as multiples of the calibrated profile's `medium` preset (about 40 % of the
# passes reused on the calibration runs), so the sweep lands where this model's own scale puts it.
MULTIPLIERS = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0]
MULTIPLIERS_QUICK = [1.0, 2.0, 4.0]
# Linear prediction only: shorter warm-ups than the published ones (MagCache's 20 % retention, EasyCache's 10 of
# 50 steps), which were tuned for reuse. The first full run found them capping linear prediction's speedup
# (SeaCache, which also extrapolates, computes only its first step), so they are swept too: retention 0.04 and
# 0.1 keep 1 and 3 of 30 steps, EasyCache 3 steps instead of 6.
LINEAR_MAGCACHE_WARMUPS = [dict(thresh=t, K=k, retention_ratio=r) for r in (0.04, 0.1) for k in (2, 3)
                           for t in (0.24, 0.5, 1.0)]
LINEAR_EASYCACHE_WARMUPS = [{"x_medium": m, "warmup_steps": 3} for m in (1.0, 1.5, 2.0, 3.0)]
PROTECT_FRACTION = 0.3  # the exploratory "protected warm-up" variants always compute this share of the steps


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass
class Context:
    """What the methods need: the pipeline, the run's step count, and the calibrations (made on first use)."""
    demo: Any                      # DemoPipeline
    steps: int
    calibrations: Any              # bench.Calibrations: .profile, .fixed_profile, .mag_ratios, .summary()

    @property
    def pipe(self):
        return self.demo.pipe

    @property
    def transformer(self):
        return self.demo.pipe.transformer

    @property
    def denoisers(self) -> list:
        """The transformer, and a two-expert pipeline's second expert."""
        from .bench import denoisers
        return denoisers(self.demo.pipe)

    @property
    def expert_steps(self) -> list[int]:
        """The steps each denoiser runs in a run of ``steps``."""
        from .bench import expert_steps
        return expert_steps(self.demo.pipe, self.steps)


@dataclass
class Method:
    key: str
    label: str
    family: str
    grid_full: list[dict]
    grid_quick: list[dict]
    requires: str | None = None
    note: str = ""
    exploratory: bool = False      # shown, but not part of the verdict
    full_only: bool = False        # not in --quick
    needs_calibration: bool = False
    # True when a skipped pass skips the whole transformer call (fewer steps, EasyCache); otherwise the
    # embeddings, rope and output head still run on a skipped pass, which bounds wall/ideal on a small model
    skips_whole_pass: bool = False
    two_experts_only: bool = False  # a question only a two-expert pipeline asks (planned only there)

    def unavailable(self) -> str | None:
        if self.requires and importlib.util.find_spec(self.requires.replace("-", "_")) is None:
            pin = f"=={CACHE_DIT_VERSION}" if self.requires == "cache-dit" else ""
            return (f"{self.requires} is not installed (pip install '{self.requires}{pin}', or "
                    f"pip install 'stepcache[bench]')")
        return None

    def version(self) -> str | None:
        return package_version(self.requires or ("diffusers" if self.family == "diffusers" else "stepcache"))

    def grid(self, quick: bool, steps: int = 30) -> list[dict]:
        return [dict(p) for p in (self.grid_quick if quick else self.grid_full)]

    # The three hooks a method implements; the defaults are the uncached pipeline.
    def steps(self, ctx: Context, params: dict) -> int:
        return ctx.steps

    def config(self, ctx: Context, params: dict) -> dict:
        return {"num_inference_steps": self.steps(ctx, params)}

    def install(self, ctx: Context, params: dict) -> None:
        pass

    def remove(self, ctx: Context) -> None:
        pass

    def after_video(self, ctx: Context) -> dict:
        return {}


def run_id(key: str, params: dict) -> str:
    inside = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{key}[{inside}]"


# ------------------------------------------------------------------------------------------------- floors
class Baseline(Method):
    def __init__(self):
        super().__init__("baseline", "uncached", "baseline", [{}], [{}])


class FewerSteps(Method):
    """The same pipeline with fewer denoising steps: every skipped step saves both CFG passes."""
    FRACTIONS = [0.8, 0.67, 0.57, 0.5, 0.4, 0.33, 0.27, 0.2]
    QUICK = [0.67, 0.5, 0.33]

    def __init__(self):
        super().__init__("floor-steps", "fewer steps", "floor", [], [],
                         note="the honest floor: num_inference_steps reduced, nothing cached", skips_whole_pass=True)

    def grid(self, quick: bool, steps: int = 30) -> list[dict]:
        counts = []
        for f in (self.QUICK if quick else self.FRACTIONS):
            n = max(2, round(steps * f))
            if n < steps and n not in counts:
                counts.append(n)
        return [{"steps": n} for n in counts]

    def steps(self, ctx, params):
        return int(params["steps"])


class _StepcacheBase(Method):
    method = ""

    def stepcache_params(self, ctx: Context, params: dict) -> dict:
        return dict(params)

    def profile(self, ctx: Context):
        return ctx.calibrations.profile

    def config(self, ctx, params):
        from stepcache.methods import resolve_method
        resolved = resolve_method(self.method, self.profile(ctx), None, **self.stepcache_params(ctx, params))
        shown = {k: v for k, v in resolved.params.items() if k != "coefficients"}
        if "coefficients" in resolved.params:
            shown["coefficients"] = [float(f"{c:.6g}") for c in resolved.params["coefficients"]]
        return {"call": f"stepcache.enable(pipe, {self.method!r}, profile=<{self.profile(ctx).name}>, ...)",
                "num_inference_steps": ctx.steps, "profile": self.profile(ctx).name, **shown}

    def install(self, ctx, params):
        import stepcache
        stepcache.enable(ctx.pipe, self.method, profile=self.profile(ctx), **self.stepcache_params(ctx, params))

    def remove(self, ctx):
        import stepcache
        stepcache.disable(ctx.pipe)

    def after_video(self, ctx):
        import stepcache
        st = stepcache.stats(ctx.pipe)
        computed, total = st.counts()
        return {"stepcache_computed": computed, "stepcache_total": total, "pattern": st.pattern()}


class FixedSkip(_StepcacheBase):
    """Compute one pass in every k after the warm-up, reuse the cached residual in between (per CFG branch).

    Built from stepcache's own MagCache runner with a flat ratio table (every ratio 1.0, so the accumulated
    error stays 0 and only ``K = k - 1`` ends a run of reuses): no new policy, the same reuse mechanics.
    ``linear=True`` predicts the skipped passes linearly instead, the floor for stepcache's linear curves: it
    tells how much of their quality the threshold's choice of steps adds to the prediction itself."""
    method = "magcache"

    def __init__(self, linear: bool = False):
        self.linear = linear
        if linear:
            grid = [{"k": k, "retention_ratio": r} for r in (0.04, 0.2) for k in (2, 3, 4)]
            note = "as the fixed skip, with predict='linear' and the retention (warm-up) given"
        else:
            grid = [{"k": k} for k in (2, 3, 4, 5, 6)]
            note = ("stepcache MagCache runner with a flat ratio table: after the 20 % warm-up it computes one pass "
                    "in every k, the same pattern on both CFG branches")
        super().__init__("floor-fixed-linear" if linear else "floor-fixed",
                         "fixed skip, linear prediction" if linear else "fixed skip (1 of k computed)", "floor",
                         grid, [] if linear else [{"k": 2}, {"k": 4}], needs_calibration=True, full_only=linear,
                         note=note)

    def profile(self, ctx):
        return ctx.calibrations.fixed_profile

    def stepcache_params(self, ctx, params):
        p = {"thresh": 1e-6, "K": int(params["k"]) - 1, "retention_ratio": params.get("retention_ratio", 0.2)}
        if self.linear:
            p["predict"] = "linear"
        return p


class StepcacheMethod(_StepcacheBase):
    """One of stepcache's methods as published (``variant=None``), with linear residual prediction
    (``"linear"``: stepcache's ``predict="linear"`` option), or with a protected warm-up (``"protected"``,
    exploratory: not an option of stepcache, only a question the benchmark asks)."""

    VARIANTS = {None: ("", ""), "linear": ("-linear", " (linear prediction)"),
                "protected": ("-protected", " (protected warm-up)"),
                "separate": ("-separate", " (experts='separate')")}

    def __init__(self, method: str, label: str, variant: str | None = None):
        self.method = method
        self.variant = variant
        if method == "magcache":
            full, quick = MAGCACHE_GRID, MAGCACHE_QUICK
        else:
            full = [{"x_medium": m} for m in MULTIPLIERS]
            quick = [{"x_medium": m} for m in MULTIPLIERS_QUICK]
        if variant == "linear":
            full = full + {"magcache": LINEAR_MAGCACHE_WARMUPS, "easycache": LINEAR_EASYCACHE_WARMUPS}.get(method, [])
        suffix, label_suffix = self.VARIANTS[variant]
        note = ("calibrated in this session with stepcache's calibration (common/calibrate.py) on the "
                "calibration prompts, which the benchmark prompts do not include")
        if method != "magcache":
            note += "; threshold = multiple x_medium of the calibrated `medium` preset"
        if variant == "linear":
            note = ("predict='linear': a reused pass extrapolates the last two computed residuals by step index "
                    "(as diffusers' SeaCache and cache-dit's TaylorSeer do) instead of repeating the last one; " + note)
        if variant == "separate":
            note = ("experts='separate': each expert of a two-expert pipeline with its own state and its own "
                    "calibrated table, nothing carried across the switch (the unsuffixed method runs the profile's "
                    "published rule); " + note)
        protect = variant == "protected"
        if protect:
            note = (f"EXPLORATORY, not in the verdict: the first {PROTECT_FRACTION:.0%} of the steps always computed "
                    f"(the feasibility run saw reuse right after the warm-up change a whole video's layout). " + note)
        super().__init__(f"stepcache-{method}{suffix}", label + label_suffix, "stepcache", full, quick,
                         note=note, exploratory=protect, full_only=protect, needs_calibration=True,
                         skips_whole_pass=method == "easycache", two_experts_only=variant == "separate")

    def stepcache_params(self, ctx, params):
        p = dict(params)
        if "x_medium" in p:
            section = self.profile(ctx).method(self.method)
            medium = section["presets"]["medium"]["thresh"]
            p["thresh"] = float(f"{medium * p.pop('x_medium'):.4g}")
        if self.method == "easycache":
            p.setdefault("warmup_steps", ctx.calibrations.easycache_warmup)
        if self.variant == "linear":
            p["predict"] = "linear"
        if self.variant == "separate":
            p["experts"] = "separate"
        if self.variant == "protected":
            if self.method == "magcache":
                p["retention_ratio"] = PROTECT_FRACTION
            else:
                p["warmup_steps"] = max(p.get("warmup_steps", 1), round(PROTECT_FRACTION * ctx.steps))
        return p


# ---------------------------------------------------------------------------------------------- diffusers
class DiffusersMethod(Method):
    config_class = ""

    def __init__(self, key, label, full, quick, note=""):
        super().__init__(key, label, "diffusers", full, quick, requires="diffusers", note=note)

    def make_config(self, ctx, params) -> dict:
        raise NotImplementedError

    def expert_config(self, ctx, params, expert: int) -> dict:
        """The config of one denoiser (``expert``: its index); every denoiser alike unless a method says
        otherwise."""
        return self.make_config(ctx, params)

    def config(self, ctx, params):
        def shown(kwargs) -> dict:
            out = {}
            for k, v in kwargs.items():
                if k == "mag_ratios":
                    out[k] = (f"{len(v)} ratios from diffusers' MagCacheConfig(calibrate=True) on this model "
                              f"({ctx.calibrations.mag_ratio_source}): " + " ".join(f"{r:.4f}" for r in v))
                elif callable(v):
                    out[k] = "lambda: pipe.current_timestep"
                elif k == "taylor_factors_dtype":
                    out[k] = str(v)
                else:
                    out[k] = v
            return out
        two = len(ctx.denoisers) > 1
        out = {"call": f"pipe.transformer{' and pipe.transformer_2' if two else ''}.enable_cache("
                       f"{self.config_class}(...))", "num_inference_steps": ctx.steps,
               **shown(self.expert_config(ctx, params, 0))}
        if two:
            out["second_expert"] = shown(self.expert_config(ctx, params, 1))
        return out

    def install(self, ctx, params):
        import diffusers
        cls = getattr(diffusers, self.config_class)
        for index, model in enumerate(ctx.denoisers):   # a two-expert pipeline: a cache on each expert
            model.enable_cache(cls(**self.expert_config(ctx, params, index)))

    def remove(self, ctx):
        for model in ctx.denoisers:
            with contextlib.suppress(Exception):   # nothing installed when enable_cache itself failed
                model.disable_cache()


class DiffusersFBC(DiffusersMethod):
    config_class = "FirstBlockCacheConfig"

    def __init__(self):
        super().__init__("diffusers-fbc", "diffusers FirstBlockCache",
                         [{"threshold": t} for t in (0.03, 0.05, 0.08, 0.12, 0.16, 0.24, 0.32, 0.5)],
                         [{"threshold": t} for t in (0.05, 0.12, 0.24)])

    def make_config(self, ctx, params):
        return {"threshold": params["threshold"]}


class DiffusersMagCache(DiffusersMethod):
    config_class = "MagCacheConfig"

    def __init__(self):
        super().__init__("diffusers-magcache", "diffusers MagCache",
                         [{"threshold": p["thresh"], "max_skip_steps": p["K"]} for p in MAGCACHE_GRID],
                         [{"threshold": p["thresh"], "max_skip_steps": p["K"]} for p in MAGCACHE_QUICK],
                         note="ratios from diffusers' own calibrate=True pass on this model (mean over the "
                              "calibration prompts and both CFG contexts)")
        self.needs_calibration = True

    def make_config(self, ctx, params):
        return self.expert_config(ctx, params, 0)

    def expert_config(self, ctx, params, expert: int) -> dict:
        # each expert with the table diffusers calibrated on it, over the steps it runs
        steps = ctx.expert_steps[expert] if len(ctx.denoisers) > 1 else ctx.steps
        return {"threshold": params["threshold"], "max_skip_steps": params["max_skip_steps"],
                "retention_ratio": 0.2, "num_inference_steps": steps,
                "mag_ratios": list(ctx.calibrations.mag_ratios(expert))}


class DiffusersTaylorSeer(DiffusersMethod):
    config_class = "TaylorSeerCacheConfig"

    def __init__(self):
        full = [{"cache_interval": n, "max_order": 1} for n in (2, 3, 4, 5, 6, 8)]
        full += [{"cache_interval": n, "max_order": 2} for n in (4, 6)]
        super().__init__("diffusers-taylorseer", "diffusers TaylorSeer", full,
                         [{"cache_interval": n, "max_order": 1} for n in (2, 4, 6)],
                         note="cache_identifiers set to Wan's attention modules: the default patterns match "
                              "nothing on Wan")

    def make_config(self, ctx, params):
        import torch
        return {"cache_interval": params["cache_interval"], "max_order": params["max_order"],
                "disable_cache_before_step": max(1, round(ctx.steps / 10)),
                "taylor_factors_dtype": torch.float32, "cache_identifiers": [WAN_ATTENTION_PATTERN]}


class DiffusersSeaCache(DiffusersMethod):
    config_class = "SeaCacheConfig"

    def __init__(self):
        full = [{"threshold": t, "max_consecutive_cached": 2} for t in (0.1, 0.25, 0.5, 0.75, 1.0, 1.5)]
        full += [{"threshold": t, "max_consecutive_cached": 4} for t in (0.5, 1.0, 1.5)]
        super().__init__("diffusers-seacache", "diffusers SeaCache", full,
                         [{"threshold": 0.25, "max_consecutive_cached": 2},
                          {"threshold": 0.5, "max_consecutive_cached": 4},
                          {"threshold": 1.0, "max_consecutive_cached": 4}],
                         note="works out of the box on WanPipeline (step metadata through cache_context)")

    def make_config(self, ctx, params):
        return {"threshold": params["threshold"], "max_consecutive_cached": params["max_consecutive_cached"],
                "residual_order": 1, "retention_steps": 1, "cache_end_steps": 1}


class DiffusersPAB(DiffusersMethod):
    config_class = "PyramidAttentionBroadcastConfig"

    def __init__(self):
        full = [{"spatial": s, "cross": c} for s, c in ((2, None), (3, None), (4, None), (2, 4), (3, 6), (4, 8))]
        super().__init__("diffusers-pab", "diffusers PyramidAttentionBroadcast", full,
                         [{"spatial": 2, "cross": None}, {"spatial": 3, "cross": 6}, {"spatial": 4, "cross": 8}],
                         note="state per attention module, counted in calls: on Wan's separate CFG passes the "
                              "uncond pass reuses the cond pass's attention (cross-branch reuse), as shipped")

    def make_config(self, ctx, params):
        pipe = ctx.pipe
        out = {"spatial_attention_block_skip_range": params["spatial"],
               "spatial_attention_timestep_skip_range": (100, 800),
               "current_timestep_callback": lambda: pipe.current_timestep}
        if params.get("cross"):
            out["cross_attention_block_skip_range"] = params["cross"]
            out["cross_attention_timestep_skip_range"] = (100, 800)
        return out


class DiffusersFasterCache(DiffusersMethod):
    config_class = "FasterCacheConfig"

    def __init__(self):
        super().__init__("diffusers-fastercache", "diffusers FasterCache", [{}], [{}],
                         note="its CFG-cache needs batched CFG (uncond and cond in one batch); WanPipeline runs "
                              "them as separate batch-1 passes")

    def make_config(self, ctx, params):
        pipe = ctx.pipe
        return {"current_timestep_callback": lambda: pipe.current_timestep}   # everything else: its defaults


# ---------------------------------------------------------------------------------------------- cache-dit
class CacheDiT(Method):
    def __init__(self, taylorseer: bool):
        self.taylorseer = taylorseer
        grid = [{"rdt": t} for t in (0.04, 0.08, 0.12, 0.16, 0.24, 0.32, 0.48)]
        key = "cachedit-dbcache" + ("-taylorseer" if taylorseer else "")
        label = "cache-dit DBCache" + (" + TaylorSeer" if taylorseer else "")
        note = ("F1B0 (= FBCache), enable_separate_cfg=True: without it cache-dit treats the cond and uncond "
                "passes as consecutive steps")
        if taylorseer:
            note += "; TaylorSeer order 1 with at most 3 cached steps in a row, as in cache-dit's examples"
        super().__init__(key, label, "cache-dit", grid, [{"rdt": t} for t in (0.08, 0.16, 0.32)],
                         requires="cache-dit", note=note)

    def kwargs(self, ctx, params) -> tuple[dict, dict | None]:
        cache = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0, "residual_diff_threshold": params["rdt"],
                 "max_warmup_steps": 4, "max_cached_steps": -1,
                 "max_continuous_cached_steps": 3 if self.taylorseer else -1,
                 "enable_separate_cfg": True, "num_inference_steps": ctx.steps}
        calibrator = {"taylorseer_order": 1} if self.taylorseer else None
        return cache, calibrator

    def config(self, ctx, params):
        cache, calibrator = self.kwargs(ctx, params)
        out = {"call": "cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(...)"
                       + (", calibrator_config=TaylorSeerCalibratorConfig(...))" if calibrator else ")"),
               **cache}
        if calibrator:
            out["calibrator"] = {"TaylorSeerCalibratorConfig": calibrator}
        return out

    def install(self, ctx, params):
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
        cache, calibrator = self.kwargs(ctx, params)
        pipe = ctx.pipe
        # cache-dit wraps pipe.__class__.__call__; a throwaway subclass keeps that patch (and anything a failed
        # disable leaves) off the real class. cache-dit picks its adapter by class name, so the subclass takes the
        # name of the diffusers pipeline the class is (the saved demo's StepcacheDemoPipeline is a WanPipeline).
        self._original_class = type(pipe)
        name = next(c.__name__ for c in self._original_class.__mro__ if c.__module__.startswith("diffusers."))
        pipe.__class__ = type(name, (self._original_class,), {})
        try:
            cache_dit.enable_cache(pipe, cache_config=DBCacheConfig(**cache),
                                   calibrator_config=TaylorSeerCalibratorConfig(**calibrator) if calibrator else None)
        except BaseException:
            pipe.__class__ = self._original_class
            raise

    def remove(self, ctx):
        import cache_dit
        pipe = ctx.pipe
        try:
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                cache_dit.disable_cache(pipe)
        finally:
            pipe.__class__ = getattr(self, "_original_class", type(pipe))


def tidy(model) -> None:
    """Drop what a removed peer leaves behind on ``model`` and its submodules once it is off: diffusers' empty
    hook registries, and an instance ``forward`` that is just the class's own (diffusers and cache-dit restore
    ``forward`` that way). The next run then starts from the same model whatever ran before (cache-dit, for one,
    checks for ``_diffusers_hook`` and behaves differently when it finds one)."""
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and not getattr(registry, "_hook_order", None):
            del module._diffusers_hook
        forward = module.__dict__.get("forward")
        if forward is not None and getattr(forward, "__self__", None) is module and \
                getattr(forward, "__func__", None) is type(module).forward:
            del module.forward


def all_methods() -> list[Method]:
    return [
        Baseline(),
        FewerSteps(),
        FixedSkip(),
        FixedSkip(linear=True),
        StepcacheMethod("teacache", "stepcache TeaCache"),
        StepcacheMethod("magcache", "stepcache MagCache"),
        StepcacheMethod("easycache", "stepcache EasyCache"),
        DiffusersFBC(),
        DiffusersMagCache(),
        DiffusersTaylorSeer(),
        DiffusersSeaCache(),
        DiffusersPAB(),
        DiffusersFasterCache(),
        CacheDiT(taylorseer=False),
        CacheDiT(taylorseer=True),
        StepcacheMethod("teacache", "stepcache TeaCache", "linear"),
        StepcacheMethod("magcache", "stepcache MagCache", "linear"),
        StepcacheMethod("easycache", "stepcache EasyCache", "linear"),
        StepcacheMethod("teacache", "stepcache TeaCache", "protected"),
        StepcacheMethod("magcache", "stepcache MagCache", "protected"),
        StepcacheMethod("easycache", "stepcache EasyCache", "protected"),
        StepcacheMethod("teacache", "stepcache TeaCache", "separate"),
        StepcacheMethod("magcache", "stepcache MagCache", "separate"),
        StepcacheMethod("easycache", "stepcache EasyCache", "separate"),
    ]


def flat_ratio_profile(profile):
    """A copy of a calibrated profile whose MagCache table is all 1.0 (the fixed-skip floor)."""
    from stepcache.profiles import Profile
    data = copy.deepcopy(profile.data)
    section = data["magcache"]
    section["ratios"] = [1.0] * len(section["ratios"])
    section.pop("spread", None)
    data["name"] = "fixed-skip"
    data["description"] = "flat MagCache table: reuse decided by K alone (a fixed every-k-th-pass pattern)"
    return Profile("fixed-skip", data)
