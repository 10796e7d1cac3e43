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
    def __init__(self, source: str):
        self.source = source

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
    from .methods import get, names
    if not any(data.get(m) for m in names()):
        raise SchemaError(f"profile {source}: holds no method table; allowed: at least one of {', '.join(names())}")
    for method in names():
        if data.get(method):
            get(method).check_section(c, c.mapping(data[method], method))
