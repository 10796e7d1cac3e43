"""Turn (method, profile, preset, parameters) into validated settings and per-branch policies.

Validation happens here, when a method is enabled, so that a bad value fails before any model runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .policies import EasyCachePolicy, MagCachePolicy, ParameterError, TeaCachePolicy, check_threshold
from .profiles import DEFAULT_RESAMPLE, METHODS, RESAMPLE_MODES, Profile, ProfileError, load_profile
# How a reused pass estimates what the skipped work would have produced (schema.PREDICTIONS): "reuse" is what all
# three papers do; "linear" extrapolates from the last two computed passes (as diffusers' SeaCache and cache-dit's
# TaylorSeer do), which the published thresholds were not tuned for.
from .schema import PREDICTIONS, check_parameters
PREDICT_HELP = ("how a reused pass estimates the skipped work: 'reuse' (default, as published: the last computed "
                "residual) or 'linear' (extrapolated, by step index, from the last two computed residuals)")

# The parameters each method accepts, and what they mean; used for validation and for --help texts.
PARAMETERS = {
    "teacache": {
        "thresh": "accumulated rescaled relative-L1 budget; 0 disables reuse",
        "variant": "which published coefficient set: 'default' or 'use_ret_steps' (Wan)",
        "warmup_steps": "steps always computed at the start (default: the variant's)",
        "force_last": "always compute the last step (default: the variant's)",
        "clamp_polynomial": "clamp the rescaling polynomial at 0 (not in the reference; off by default)",
        "predict": PREDICT_HELP,
    },
    "magcache": {
        "thresh": "accumulated magnitude-error budget; 0 disables reuse",
        "K": "at most K reused passes in a row (>= 1)",
        "retention_ratio": "fraction of passes always computed at the start, in [0, 1)",
        "resample": "how a table is fitted to another step count: 'compose' (default: multiply the ratios of the "
                    "merged steps, split them geometrically for more steps), 'nearest' (the reference's) or 'none' "
                    "(refuse)",
        "predict": PREDICT_HELP,
    },
    "easycache": {
        "thresh": "accumulated transformation-rate budget (a fraction: 0.05 is 5%); 0 disables reuse",
        "warmup_steps": "steps always computed at the start",
        "force_last": "always compute the last step",
        "decide_on": "branch whose decision the other CFG branches follow ('cond' as published for Wan), or None",
        "predict": PREDICT_HELP,
    },
}


# A per-video branch state is "BRANCH#INDEX" (enable(per_video=True)); its table and leader are BRANCH's.
VIDEO_MARK = "#"


def base_branch(branch: str) -> str:
    return branch.split(VIDEO_MARK, 1)[0]


@dataclass
class MethodConfig:
    method: str
    profile: Profile
    params: dict[str, Any]
    preset: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def thresh(self) -> float:
        return float(self.params["thresh"])

    @property
    def decide_on(self) -> str | None:
        return self.params.get("decide_on") if self.method == "easycache" else None

    @property
    def teacache_signal(self) -> str | None:
        if self.method != "teacache":
            return None
        return self.profile.method("teacache")["variants"][self.params["variant"]]["signal"]

    def branch_layout(self, branch: str) -> tuple[int, int]:
        """(index, count) of a CFG branch in the profile's MagCache table layout; unknown names use branch 0."""
        names = self.profile.magcache_branches()
        branch = base_branch(branch)
        return (names.index(branch) if branch in names else 0), len(names)

    def make_policy(self, branch: str, num_steps: int):
        p = self.params
        if self.method == "teacache":
            return TeaCachePolicy(p["coefficients"], p["thresh"], p["warmup_steps"], p["force_last"],
                                  p["clamp_polynomial"])
        if self.method == "easycache":
            return EasyCachePolicy(p["thresh"], p["warmup_steps"], p["force_last"])
        index, count = self.branch_layout(branch)
        table = self.profile.method("magcache")
        ratios = self.profile.magcache_ratios(num_steps, index, p["resample"])
        return MagCachePolicy(ratios, p["thresh"], p["K"], p["retention_ratio"], count, index,
                              inclusive=table.get("inclusive", False), ratio_power=table.get("ratio_power", 1.0),
                              absolute_error=table.get("absolute_error", True))

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items() if k != "coefficients"}
        preset = f" preset {self.preset}" if self.preset else ""
        return f"{self.method} on profile {self.profile.name}{preset}: {shown}"


def resolve_method(method: str, profile: str | Profile, preset: str | None = None, **overrides) -> MethodConfig:
    """Validated settings for ``method``: the profile's published defaults, then ``preset``, then ``overrides``.

    ``None`` values in ``overrides`` mean "not given".
    """
    if method not in METHODS:
        raise ParameterError(f"unknown method {method!r}; known methods: {', '.join(METHODS)}")
    profile = load_profile(profile)
    section = profile.method(method)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(overrides) - set(PARAMETERS[method]))
    if unknown:
        raise ParameterError(f"{method} does not take {', '.join(unknown)}; "
                             f"its parameters are: {', '.join(PARAMETERS[method])}")
    check_parameters(method, overrides, "")
    params: dict[str, Any] = dict(section.get("defaults", {}))
    if method == "easycache":
        params.update({k: section[k] for k in ("thresh", "warmup_steps", "force_last", "decide_on") if k in section})
    if preset is not None:
        presets = section.get("presets", {})
        if preset not in presets:
            raise ParameterError(f"unknown {method} preset {preset!r} for profile {profile.name!r}; "
                                 f"known presets: {', '.join(presets) or 'none'}")
        params.update(presets[preset])
    params.update(overrides)
    notes: list[str] = []
    if method == "teacache":
        variants = section["variants"]
        params.setdefault("variant", "default")
        if params["variant"] not in variants:
            raise ParameterError(f"teacache variant {params['variant']!r} is not in profile {profile.name!r}; "
                                 f"known variants: {', '.join(variants)}")
        variant = variants[params["variant"]]
        params.setdefault("warmup_steps", variant["warmup_steps"])
        params.setdefault("force_last", variant["force_last"])
        params.setdefault("clamp_polynomial", False)
        params["coefficients"] = list(variant["coefficients"])
    elif method == "magcache":
        params.setdefault("resample", DEFAULT_RESAMPLE)
        if params["resample"] not in RESAMPLE_MODES:
            raise ParameterError(f"resample={params['resample']!r} is not one of {', '.join(RESAMPLE_MODES)}")
        params.setdefault("retention_ratio", 0.2)
    params.setdefault("predict", "reuse")
    if params["predict"] not in PREDICTIONS:
        raise ParameterError(f"predict={params['predict']!r} is not one of {', '.join(PREDICTIONS)}")
    if "thresh" not in params:
        raise ProfileError(f"profile {profile.name!r} has no published {method} threshold; pass thresh=")
    check_threshold(f"{method} thresh", params["thresh"])
    config = MethodConfig(method, profile, params, preset, notes)
    if method == "magcache":
        steps = int(section["steps"])
        for branch in profile.magcache_branches():
            config.make_policy(branch, steps)  # validates K, retention and the table's shape now
    else:
        config.make_policy("cond", 2)
    return config
