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

RESAMPLE_MODES = ("nearest", "compose", "none")
PREDICTIONS = ("reuse", "linear")
# How a two-expert model (Wan2.2 A14B) keeps cache state: one state for both experts, as the published code does,
# or one per expert (stepcache's expert-aware rule). See stepcache.methods.base.EXPERTS_HELP.
EXPERT_STATES = ("shared", "separate")


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

PREDICT_RULE = one_of(*PREDICTIONS)
EXPERTS_RULE = one_of(*EXPERT_STATES)


def _rules(method: str) -> dict[str, tuple[Callable[[Any], bool], str]]:
    """Each parameter of ``method`` and its rule, from the method's own module."""
    from .methods import get
    return {name: rule for name, (_, rule) in get(method).PARAMETERS.items()}


def check_parameters(method: str, params: dict[str, Any], where: str) -> None:
    """Each of ``params`` is a parameter of ``method`` with an allowed value; ``where`` names their origin."""
    rules = _rules(method)
    prefix = f"{where}: " if where else ""
    unknown = [key for key in params if key not in rules]
    if unknown:
        raise ParameterError(f"{prefix}{method} does not take {', '.join(sorted(unknown))}; its parameters are: "
                             f"{', '.join(rules)}")
    for key, value in params.items():
        ok, allowed = rules[key]
        if not ok(value):
            raise ParameterError(f"{prefix}{method} {key}={value!r} {allowed}")


# ----------------------------------------------------------------------------------------- profile checks
class _Checker:
    def __init__(self, source: str, data: dict | None = None):
        self.source = source
        self.data = data or {}  # the whole profile, for a method's check that needs model-level facts

    def fail(self, key: str, value: Any, allowed: str) -> None:
        """``allowed`` is what the value should be ("a JSON object") or, from a rule, what it is not."""
        shown = repr(value)
        if len(shown) > 60:
            shown = shown[:57] + "..."
        verdict = allowed if allowed.startswith("is ") else f"is not allowed: expected {allowed}"
        raise SchemaError(f"profile {self.source}: {key}={shown} {verdict}")

    def fail_text(self, text: str) -> None:
        raise SchemaError(f"profile {self.source}: {text}")

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
        rules = _rules(method)
        for key, value in params.items():
            if key not in rules:
                self.fail(f"{path}.{key}", value, f"is not a {method} parameter ({', '.join(rules)})")
            self.value(value, rules[key], f"{path}.{key}")


def _check_experts(c: _Checker, experts: dict) -> None:
    """``model.experts``: where a two-expert model (Wan2.2 A14B) hands over from its high-noise expert to its
    low-noise one, as the pipeline's data (boundary, scheduler shift and sigmas), and the step that gives at
    ``steps``, which must follow from them."""
    from .policies import expert_switch_step
    rules = {"boundary": finite(0, 1, low_open=True, high_open=True), "shift": finite(0, low_open=True),
             "num_train_timesteps": integer(1), "sigma_max": finite(0, 1, low_open=True),
             "sigma_min": finite(0, 1, high_open=True), "steps": integer(2), "switch_step": integer(0)}
    for key, rule in rules.items():
        c.value(c.need(experts, key, "model.experts"), rule, f"model.experts.{key}")
    if not experts["sigma_min"] < experts["sigma_max"]:
        c.fail("model.experts.sigma_min", experts["sigma_min"], f"is not below sigma_max={experts['sigma_max']!r}")
    source = c.need(experts, "source", "model.experts")
    if not isinstance(source, str) or not source:
        c.fail("model.experts.source", source, "a non-empty string naming where the values come from")
    steps = int(experts["steps"])
    computed = expert_switch_step(steps, experts["boundary"], experts["shift"], int(experts["num_train_timesteps"]),
                                  experts["sigma_max"], experts["sigma_min"])
    if experts["switch_step"] != computed:
        c.fail("model.experts.switch_step", experts["switch_step"],
               f"is not the step the boundary, shift and sigmas give: at {steps} steps they switch at step "
               f"{computed}")


def check_profile_data(data: Any, source: str) -> None:
    """Raise :class:`SchemaError` naming ``source``, the key and what is allowed, for the first bad entry."""
    c = _Checker(source, data if isinstance(data, dict) else None)
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
    if "experts" in model:
        _check_experts(c, c.mapping(model["experts"], "model.experts"))
    from .methods import get, names
    if not any(data.get(m) for m in names()):
        raise SchemaError(f"profile {source}: holds no method table; allowed: at least one of {', '.join(names())}")
    for method in names():
        if data.get(method):
            get(method).check_section(c, c.mapping(data[method], method))
