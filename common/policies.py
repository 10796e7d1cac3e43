"""What the three skip rules share, pure: a decision, range checks, warm-up and forced steps, the polynomial
TeaCache rescales with, and the resampling of a MagCache table to another step count.

Each method's own rule is a pure state machine in its module (``stepcache.methods.teacache.TeaCachePolicy``,
``...magcache.MagCachePolicy``, ``...easycache.EasyCachePolicy``): numbers in, compute-or-reuse out. A policy
knows no model and no tensor; the runner measures what a rule needs and asks the policy once per pass, one
policy per CFG branch. The defaults reproduce the published reference code exactly; deliberate deviations are
named options, off by default (TeaCache's ``clamp_polynomial``, MagCache's ``resample="compose"``).

Two rules hold for every method, and live in each policy's decide:

* a threshold of 0 never reuses (the reference's ``<=`` comparisons and negative polynomials would otherwise
  still skip at 0, and "threshold 0 is the uncached model" is the invariant users rely on);
* nothing is reused before a cache exists (the runner passes ``have_cache``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .errors import ParameterError


@dataclass(frozen=True)
class Decision:
    compute: bool
    # "warmup", "retention" (a retention zone of a profile), "forced-last", "threshold", "limit", "reuse",
    # "no-cache", "disabled", "follow"
    reason: str
    accumulator: float | None = None


def check_range(name: str, value, low=None, high=None, low_open=False, high_open=False, integer=False):
    if integer and (isinstance(value, bool) or int(value) != value):
        raise ParameterError(f"{name}={value!r} must be an integer")
    if value is None or isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
        raise ParameterError(f"{name}={value!r} must be a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        lo_txt = "-inf" if low is None else f"{low:g}"
        hi_txt = "inf" if high is None else f"{high:g}"
        raise ParameterError(f"{name}={value!r} is outside the allowed range {lo}{lo_txt}, {hi_txt}{hi}")


def check_threshold(name: str, thresh: float) -> float:
    check_range(name, float(thresh), low=0.0)
    return float(thresh)


def forced_reason(step: int, num_steps: int, warmup_steps: int, force_last: bool) -> str | None:
    if step < warmup_steps:
        return "warmup"
    if force_last and step >= num_steps - 1:
        return "forced-last"
    return None


class Polynomial:
    """``numpy.poly1d`` semantics (coefficients highest power first), evaluated in float64 by Horner's rule."""

    def __init__(self, coefficients: Sequence[float]):
        if len(coefficients) == 0:
            raise ParameterError("a TeaCache polynomial needs at least one coefficient")
        self.coefficients = [float(c) for c in coefficients]

    def __call__(self, x: float) -> float:
        acc = 0.0
        for c in self.coefficients:
            acc = acc * x + c
        return acc


def compose_resample(values: Sequence[float], length: int) -> list[float]:
    """Ratios for ``length`` steps from a table measured at ``len(values)`` steps, by composing them.

    ``values[k]`` (k >= 1) is the magnitude ratio between steps k-1 and k of the measured schedule; index 0 is
    the padding. Coarse step j lies at position ``j * (n-1) / (length-1)`` of the measured schedule, so its
    ratio is the product of the measured ratios it spans, with fractional spans taken as fractional powers
    (log-linear inside a measured step). Merging steps multiplies their ratios instead of keeping one of them,
    which is what the drift between two coarse steps is; splitting a step shares its ratio out geometrically.
    Not in the reference (a deviation, named as such).
    """
    check_range("resample length", length, low=1, integer=True)
    n = len(values)
    if n < 2:
        raise ParameterError("composing needs a table of at least 2 steps")
    if length == 1:
        return [float(values[0])]
    logs = [math.log(float(v)) for v in values[1:]]  # logs[k-1] spans measured positions (k-1, k]
    scale = (n - 1) / (length - 1)
    out = [float(values[0])]
    for j in range(1, length):
        # min(): j * scale can round past the last measured position, which has no ratio after it
        start, end = (j - 1) * scale, min(j * scale, n - 1)
        total = 0.0
        for k in range(int(math.floor(start)), min(int(math.ceil(end)), n - 1)):
            overlap = min(end, k + 1) - max(start, k)
            if overlap > 0:
                total += overlap * logs[k]
        out.append(math.exp(total))
    return out


def nearest_resample(values: Sequence[float], length: int) -> list[float]:
    """The reference's ``nearest_interp``: ``round(arange(L) * (n-1)/(L-1))`` with round-half-to-even.

    Resamples ratio *values*; it does not compound them (merging steps keeps one ratio instead of their product,
    which under-estimates the drift for fewer steps). Python's ``round`` is half-to-even like numpy's.
    """
    check_range("resample length", length, low=1, integer=True)
    n = len(values)
    if n == 0:
        raise ParameterError("cannot resample an empty ratio table")
    if length == 1:
        return [float(values[-1])]
    return [float(values[round(i * (n - 1) / (length - 1))]) for i in range(length)]


def expert_switch_step(num_steps: int, boundary: float, shift: float, num_train_timesteps: int,
                       sigma_max: float, sigma_min: float) -> int:
    """The first step of the low-noise expert in a two-expert (Wan2.2 A14B) run of ``num_steps`` steps, which is
    also the number of steps the high-noise expert serves.

    Wan2.2 runs the high-noise expert while the step's timestep is ``>= boundary * num_train_timesteps``, with the
    timesteps its flow-matching scheduler makes: ``num_steps + 1`` sigmas evenly spaced from ``sigma_max`` to
    ``sigma_min`` (the last dropped), shifted (``shift * s / (1 + (shift - 1) * s)``), times
    ``num_train_timesteps``, truncated to integers. The arithmetic is numpy.linspace's (``i * delta + start``, in
    float64), so the step is the one the pipeline switches at.
    """
    check_range("expert switch steps", num_steps, low=1, integer=True)
    delta = (sigma_min - sigma_max) / num_steps
    limit = boundary * num_train_timesteps
    for step in range(num_steps):
        sigma = step * delta + sigma_max
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        if int(sigma * num_train_timesteps) < limit:  # timesteps fall with the step: the first one below
            return step
    return num_steps
