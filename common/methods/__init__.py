"""The methods, one module each (:mod:`.teacache`, :mod:`.magcache`, :mod:`.easycache`), and how a method, a
profile, a preset and a caller's values become validated settings and per-branch policies.

Validation happens here, when a method is enabled, so that a bad value fails before any model runs. Adding a
method is one module with a :class:`~stepcache.methods.base.Method` named ``METHOD`` plus one line in
``REGISTRY`` (or :func:`register` at run time).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError, ProfileError
from ..profiles import Profile, load_profile
from ..schema import EXPERT_STATES, PREDICTIONS, check_parameters
from .base import EXPERTS_HELP, PREDICT_HELP, Method

# Method name -> module holding its METHOD. Imported on first use.
REGISTRY: dict[str, str] = {
    "teacache": "stepcache.methods.teacache",
    "magcache": "stepcache.methods.magcache",
    "easycache": "stepcache.methods.easycache",
}
_LOADED: dict[str, Method] = {}


def register(method: Method) -> None:
    """Add a method defined outside this package (its ``name`` must be new)."""
    if method.name in REGISTRY or method.name in _LOADED:
        raise ValueError(f"a method named {method.name!r} is already registered")
    _LOADED[method.name] = method


def unregister(name: str) -> None:
    """Remove a method added with :func:`register`."""
    _LOADED.pop(name, None)


def names() -> list[str]:
    return [*REGISTRY, *(n for n in _LOADED if n not in REGISTRY)]


def get(name: str) -> Method:
    if name not in _LOADED:
        if name not in REGISTRY:
            raise ParameterError(f"unknown method {name!r}; known methods: {', '.join(names())}")
        _LOADED[name] = importlib.import_module(REGISTRY[name]).METHOD
    return _LOADED[name]


class _Parameters(dict):
    """``PARAMETERS[method][name]`` -> help text, read from the method modules (for --help texts)."""

    def __missing__(self, method: str) -> dict[str, str]:
        return {k: text for k, (text, _) in get(method).PARAMETERS.items()}


PARAMETERS = _Parameters()

# A per-video branch state is "BRANCH#INDEX" (enable(per_video=True)); its table and leader are BRANCH's.
VIDEO_MARK = "#"
# A per-expert branch state is "BRANCH@EXPERT" (experts="separate"); its table and leader are BRANCH's too.
EXPERT_MARK = "@"
# The experts of a two-expert model in the order a generation runs them (Wan2.2 A14B: high noise, then low).
EXPERTS = ("high", "low")


def base_branch(branch: str) -> str:
    """The CFG branch a state key belongs to: "cond" for "cond", "cond#1", "cond@low" and "cond#1@low"."""
    return branch.split(EXPERT_MARK, 1)[0].split(VIDEO_MARK, 1)[0]


def expert_of(branch: str) -> str | None:
    """The expert a state key serves with experts="separate" ("low" for "cond@low"), else None."""
    return branch.split(EXPERT_MARK, 1)[1] if EXPERT_MARK in branch else None


@dataclass
class MethodConfig:
    method: str
    profile: Profile
    params: dict[str, Any]
    preset: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def spec(self) -> Method:
        return get(self.method)

    @property
    def thresh(self) -> float:
        return float(self.params["thresh"])

    @property
    def decide_on(self) -> str | None:
        """The branch whose decision the other CFG branches follow, for a method that has that parameter."""
        return self.params.get("decide_on")

    @property
    def signal_name(self) -> str | None:
        """The activation the adapter must hand over at the block stack (None when the method reads none)."""
        spec = self.spec
        return spec.signal_name(self) if spec.wants_signal else None

    def branch_layout(self, branch: str) -> tuple[int, int]:
        """(index, count) of a CFG branch in the profile's MagCache table layout; unknown names use branch 0."""
        names = self.profile.magcache_branches()
        branch = base_branch(branch)
        return (names.index(branch) if branch in names else 0), len(names)

    def make_policy(self, branch: str, num_steps: int, window: tuple[int, int] | None = None,
                    switch_step: int | None = None):
        """The policy of one branch state. ``window`` ``(first, end)``: the state serves only those steps of the
        run (one expert's, with experts="separate") and is asked ``decide(step - first, end - first)``, so it
        treats them as a run of its own. ``switch_step``: where this run's low-noise expert starts, when the
        caller knows it (else a two-expert profile's own boundary gives it). Passed only when given, so a method
        written for one-expert models keeps its three-argument ``make_policy``."""
        given = {k: v for k, v in (("window", window), ("switch_step", switch_step)) if v is not None}
        return self.spec.make_policy(self, branch, num_steps, **given)

    def describe(self) -> str:
        shown = {k: v for k, v in self.params.items() if k != "coefficients"}
        preset = f" preset {self.preset}" if self.preset else ""
        return f"{self.method} on profile {self.profile.name}{preset}: {shown}"


def resolve_method(method: str, profile: str | Profile, preset: str | None = None, **overrides) -> MethodConfig:
    """Validated settings for ``method``: the profile's published defaults, then ``preset``, then ``overrides``.

    ``None`` values in ``overrides`` mean "not given".
    """
    spec = get(method)
    profile = load_profile(profile)
    section = profile.method(method)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    check_parameters(method, overrides, "")
    params: dict[str, Any] = spec.base_params(section)
    if preset is not None:
        presets = section.get("presets", {})
        if preset not in presets:
            raise ParameterError(f"unknown {method} preset {preset!r} for profile {profile.name!r}; "
                                 f"known presets: {', '.join(presets) or 'none'}")
        params.update(presets[preset])
    params.update(overrides)
    _resolve_experts(profile, params)
    params = spec.resolve(profile, section, params)
    params.setdefault("predict", "reuse")  # every value itself was checked: the profile at load, overrides above
    if "thresh" not in params:
        raise ProfileError(f"profile {profile.name!r} has no published {method} threshold; pass thresh=")
    config = MethodConfig(method, profile, params, preset)
    spec.validate(config)
    return config


def _resolve_experts(profile: Profile, params: dict[str, Any]) -> None:
    """A two-expert profile (``model.experts``) states the published rule. Whether the model has two experts is
    known when the method is installed (:func:`stepcache.api.install` refuses ``experts`` on one model)."""
    if profile.experts:
        params.setdefault("experts", EXPERT_STATES[0])


__all__ = ["PARAMETERS", "PREDICTIONS", "PREDICT_HELP", "REGISTRY", "VIDEO_MARK", "EXPERT_MARK", "EXPERTS",
           "EXPERTS_HELP", "MethodConfig", "Method", "base_branch", "get", "names", "register", "resolve_method", "unregister"]
