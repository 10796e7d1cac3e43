"""What a profile file and a method's parameters may hold: the one check every entry point goes through.

A profile is checked whole when it is loaded (:func:`check_profile_data`, called by
:func:`stepcache.profiles.load_profile` for a name, a file or a ``Profile`` object), and the parameters a user
passes are checked by the same rules when a method is resolved (:func:`check_parameters`). So the Python API,
``stepcache`` subcommands and the official-repo drop-ins refuse the same bad values with the same one-line
message, naming the file, the key and what is allowed, before any model runs.

Nothing here imports torch.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from .errors import ParameterError, ProfileError

METHODS = ("teacache", "magcache", "easycache")
RESAMPLE_MODES = ("nearest", "compose", "none")
PREDICTIONS = ("reuse", "linear")
# The activations a TeaCache polynomial may be fitted on; each adapter computes the ones of its model.
TEACACHE_SIGNALS = ("temb", "timestep_proj", "block0_modulated")
# A magnitude ratio is ||r_t|| / ||r_{t-1}|| of consecutive residuals: measured tables stay within 0.5-1.5.
# Zero or negative ratios break the (fractional-)power accumulation; past 10 a table is not a measurement.
MAX_RATIO = 10.0


class SchemaError(ProfileError):
    """A profile entry that the rules below do not allow."""


# ------------------------------------------------------------------------------------------ value checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# A rule is (test, what a failing value "is": the words after "key=value").
def finite(low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> tuple[Callable[[Any], bool], str]:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    text = (f"is outside the allowed range {lo}{'-inf' if low is None else f'{low:g}'}, "
            f"{'inf' if high is None else f'{high:g}'}{hi} (a finite number)")

    def ok(v):
        if not _is_number(v) or not math.isfinite(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))
    return ok, text


def integer(low: int) -> tuple[Callable[[Any], bool], str]:
    return ((lambda v: _is_number(v) and float(v).is_integer() and v >= low),
            f"is outside the allowed range [{low}, inf] (an integer)")


BOOLEAN = (lambda v: isinstance(v, bool), "is not a boolean (true or false)")


def one_of(*allowed) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: isinstance(v, str) and v in allowed), "is not one of " + ", ".join(allowed)


NAME_OR_NONE = (lambda v: v is None or (isinstance(v, str) and bool(v)), "is not a branch name or null")

# Every parameter a method accepts, and what it may be. (Help texts live in stepcache.methods.PARAMETERS.)
PARAMETER_RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "teacache": {"thresh": finite(0), "variant": (lambda v: isinstance(v, str) and bool(v), "is not a variant name"),
                 "warmup_steps": integer(0), "force_last": BOOLEAN, "clamp_polynomial": BOOLEAN,
                 "predict": one_of(*PREDICTIONS)},
    "magcache": {"thresh": finite(0), "K": integer(1), "retention_ratio": finite(0, 1, high_open=True),
                 "resample": one_of(*RESAMPLE_MODES), "predict": one_of(*PREDICTIONS)},
    "easycache": {"thresh": finite(0), "warmup_steps": integer(0), "force_last": BOOLEAN,
                  "decide_on": NAME_OR_NONE, "predict": one_of(*PREDICTIONS)},
}


def check_parameters(method: str, params: dict[str, Any], where: str) -> None:
    """Each of ``params`` is a parameter of ``method`` with an allowed value; ``where`` names their origin."""
    rules = PARAMETER_RULES[method]
    prefix = f"{where}: " if where else ""
    for key, value in params.items():
        if key not in rules:
            raise ParameterError(f"{prefix}{method} does not take {key!r}; its parameters are: {', '.join(rules)}")
        ok, allowed = rules[key]
        if not ok(value):
            raise ParameterError(f"{prefix}{method} {key}={value!r} {allowed}")


# ----------------------------------------------------------------------------------------- profile checks
class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, value: Any, allowed: str) -> None:
        """``allowed`` is what the value should be ("a JSON object") or, from a rule, what it is not."""
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        verdict = allowed if allowed.startswith("is ") else f"is not allowed: expected {allowed}"
        raise SchemaError(f"profile {self.source}: {key}={shown} {verdict}")

    def need(self, section: dict, key: str, path: str) -> Any:
        if key not in section:
            raise SchemaError(f"profile {self.source}: {path}.{key} is missing")
        return section[key]

    def value(self, value: Any, rule: tuple[Callable[[Any], bool], str], key: str) -> None:
        ok, allowed = rule
        if not ok(value):
            self.fail(key, value, allowed)

    def mapping(self, value: Any, key: str) -> dict:
        if not isinstance(value, dict):
            self.fail(key, value, "a JSON object")
        return value

    def numbers(self, values: Any, rule: tuple[Callable[[Any], bool], str], key: str, min_len: int = 1) -> list:
        if not isinstance(values, list) or len(values) < min_len:
            self.fail(key, values, f"a list of at least {min_len} number(s)")
        for i, v in enumerate(values):
            self.value(v, rule, f"{key}[{i}]")
        return values

    def settings(self, section: dict, method: str, path: str) -> None:
        """``defaults`` and every preset of a method section hold valid parameters."""
        self.parameters(section.get("defaults", {}), method, f"{path}.defaults")
        presets = self.mapping(section.get("presets", {}), f"{path}.presets")
        for name, preset in presets.items():
            self.parameters(preset, method, f"{path}.presets.{name}")

    def parameters(self, params: Any, method: str, path: str) -> None:
        params = self.mapping(params, path)
        rules = PARAMETER_RULES[method]
        for key, value in params.items():
            if key not in rules:
                self.fail(f"{path}.{key}", value, f"is not a {method} parameter ({', '.join(rules)})")
            self.value(value, rules[key], f"{path}.{key}")


def check_profile_data(data: Any, source: str) -> None:
    """Raise :class:`SchemaError` naming ``source``, the key and what is allowed, for the first bad entry."""
    c = _Checker(source)
    c.mapping(data, "the file")
    name = c.need(data, "name", "profile")
    if not isinstance(name, str) or not name:
        c.fail("name", name, "a non-empty string")
    model = c.mapping(data.get("model", {}), "model")
    if "family" in model and not isinstance(model["family"], str):
        c.fail("model.family", model["family"], "a string")
    if model.get("resolution") is not None:
        res = model["resolution"]
        if not (isinstance(res, list) and len(res) == 2 and all(integer(1)[0](v) for v in res)):
            c.fail("model.resolution", res, "[height, width] in pixels")
    if "detect" in model:
        c.value(model["detect"], BOOLEAN, "model.detect")
    c.mapping(model.get("config", {}), "model.config")
    if not any(data.get(m) for m in METHODS):
        raise SchemaError(f"profile {source}: holds no method table; allowed: at least one of {', '.join(METHODS)}")
    if data.get("teacache"):
        _check_teacache(c, c.mapping(data["teacache"], "teacache"))
    if data.get("magcache"):
        _check_magcache(c, c.mapping(data["magcache"], "magcache"))
    if data.get("easycache"):
        _check_easycache(c, c.mapping(data["easycache"], "easycache"))


def _check_teacache(c: _Checker, section: dict) -> None:
    variants = c.mapping(c.need(section, "variants", "teacache"), "teacache.variants")
    if not variants:
        c.fail("teacache.variants", variants, "at least one variant")
    for name, variant in variants.items():
        path = f"teacache.variants.{name}"
        variant = c.mapping(variant, path)
        c.value(c.need(variant, "signal", path), one_of(*TEACACHE_SIGNALS), f"{path}.signal")
        c.numbers(c.need(variant, "coefficients", path), finite(), f"{path}.coefficients")
        c.value(c.need(variant, "warmup_steps", path), integer(0), f"{path}.warmup_steps")
        c.value(c.need(variant, "force_last", path), BOOLEAN, f"{path}.force_last")
        if variant.get("fit_range") is not None:
            fit = c.numbers(variant["fit_range"], finite(), f"{path}.fit_range", min_len=2)
            if len(fit) != 2 or fit[0] > fit[1]:
                c.fail(f"{path}.fit_range", fit, "[low, high] with low <= high")
    c.settings(section, "teacache", "teacache")
    for where, params in [("defaults", section.get("defaults", {}))] + [
            (f"presets.{k}", v) for k, v in section.get("presets", {}).items()]:
        if "variant" in params and params["variant"] not in variants:
            c.fail(f"teacache.{where}.variant", params["variant"], "is not one of " + ", ".join(variants))


def _check_magcache(c: _Checker, section: dict) -> None:
    steps = c.need(section, "steps", "magcache")
    c.value(steps, integer(2), "magcache.steps")
    branches = section.get("branches") or ["cond"]
    if not (isinstance(branches, list) and all(isinstance(b, str) and b for b in branches)
            and len(set(branches)) == len(branches)):
        c.fail("magcache.branches", branches, "a list of distinct branch names")
    ratios = c.numbers(c.need(section, "ratios", "magcache"), finite(0, MAX_RATIO, low_open=True), "magcache.ratios")
    if len(ratios) != steps * len(branches):
        raise SchemaError(f"profile {c.source}: magcache.ratios has {len(ratios)} values; allowed: steps x branches "
                          f"= {steps} x {len(branches)} = {steps * len(branches)} (one per step and branch)")
    for key, rule in (("inclusive", BOOLEAN), ("absolute_error", BOOLEAN),
                      ("ratio_power", finite(0, 4, low_open=True))):
        if key in section:
            c.value(section[key], rule, f"magcache.{key}")
    c.settings(section, "magcache", "magcache")


def _check_easycache(c: _Checker, section: dict) -> None:
    top = {k: section[k] for k in ("thresh", "warmup_steps", "force_last", "decide_on") if k in section}
    c.parameters(top, "easycache", "easycache")
    if "suggested_warmup_steps" in section:
        c.value(section["suggested_warmup_steps"], integer(0), "easycache.suggested_warmup_steps")
    c.settings(section, "easycache", "easycache")
