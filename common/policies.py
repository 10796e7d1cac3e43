"""The three skip rules as pure state machines: numbers in, compute-or-reuse out.

A policy knows no model and no tensor. The runner measures what a rule needs (a relative L1 distance, a
magnitude ratio from the profile, EasyCache's input change) and asks the policy once per transformer pass.
One policy object serves one CFG branch; the runner keeps one per branch.

The defaults reproduce the published reference code exactly (see shared/reference/seed-methods.md §2-5).
Deliberate deviations are named options, off by default:

* ``TeaCachePolicy(clamp_polynomial=True)`` clamps the rescaling polynomial at 0 (the reference does not, and
  its polynomials go strongly negative outside their fit range, which makes skipping run away).

Two rules hold for every method, and live here once:

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
    reason: str  # "warmup", "forced-last", "threshold", "limit", "reuse", "no-cache", "disabled", "follow"
    accumulator: float | None = None


def _check_range(name: str, value, low=None, high=None, low_open=False, high_open=False, integer=False):
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
    _check_range(name, float(thresh), low=0.0)
    return float(thresh)


def _forced(step: int, num_steps: int, warmup_steps: int, force_last: bool) -> str | None:
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


class TeaCachePolicy:
    """TeaCache (§2.1): accumulate the rescaled relative L1 change of the signal; reuse while under ``thresh``."""

    def __init__(self, coefficients: Sequence[float], thresh: float, warmup_steps: int = 1, force_last: bool = True,
                 clamp_polynomial: bool = False):
        self.thresh = check_threshold("teacache thresh", thresh)
        _check_range("teacache warmup_steps", warmup_steps, low=0, integer=True)
        self.poly = Polynomial(coefficients)
        self.warmup_steps = int(warmup_steps)
        self.force_last = bool(force_last)
        self.clamp_polynomial = bool(clamp_polynomial)
        self.reset()

    def reset(self) -> None:
        self.accumulated = 0.0

    def restart_accumulation(self) -> None:
        """A pass was computed although this policy would have reused it (another rank computed it)."""
        self.accumulated = 0.0

    def rescale(self, distance: float) -> float:
        value = self.poly(distance)
        return max(value, 0.0) if self.clamp_polynomial else value

    def decide(self, step: int, num_steps: int, distance: float | None, have_cache: bool) -> Decision:
        forced = _forced(step, num_steps, self.warmup_steps, self.force_last)
        if forced or distance is None or not have_cache:
            self.accumulated = 0.0
            return Decision(True, forced or "no-cache", 0.0)
        self.accumulated += self.rescale(distance)
        if self.thresh > 0 and self.accumulated < self.thresh:
            return Decision(False, "reuse", self.accumulated)
        accumulated, self.accumulated = self.accumulated, 0.0
        return Decision(True, "threshold" if self.thresh > 0 else "disabled", accumulated)


class MagCachePolicy:
    """MagCache (§3.1): accumulated error of the calibrated magnitude ratios, at most ``K`` reuses in a row.

    The reference counts passes, not steps: a table calibrated with CFG interleaves the branches (cond, uncond,
    cond, ...), and the retention warm-up is ``int(retention_ratio * passes)`` over that interleaved count. So a
    policy is told its branch's position in the table layout (``branch_index`` of ``num_branches``) and works in
    pass units, which reproduces the published schedules exactly.
    """

    def __init__(self, ratios: Sequence[float], thresh: float, K: int, retention_ratio: float,
                 num_branches: int = 1, branch_index: int = 0, inclusive: bool = False,
                 ratio_power: float = 1.0, absolute_error: bool = True):
        self.thresh = check_threshold("magcache thresh", thresh)
        _check_range("magcache K", K, low=1, integer=True)
        _check_range("magcache retention_ratio", float(retention_ratio), low=0.0, high=1.0, high_open=True)
        _check_range("magcache num_branches", num_branches, low=1, integer=True)
        _check_range("magcache branch_index", branch_index, low=0, high=num_branches - 1, integer=True)
        self.ratios = [float(r) for r in ratios]
        self.K = int(K)
        self.retention_ratio = float(retention_ratio)
        self.num_branches = int(num_branches)
        self.branch_index = int(branch_index)
        self.inclusive = bool(inclusive)
        self.ratio_power = float(ratio_power)
        self.absolute_error = bool(absolute_error)
        self.reset()

    def reset(self) -> None:
        self.accumulated_ratio = 1.0
        self.accumulated_error = 0.0
        self.accumulated_steps = 0

    def restart_accumulation(self) -> None:
        """A pass was computed although this policy would have reused it (another rank computed it)."""
        self.reset()

    def decide(self, step: int, num_steps: int, have_cache: bool) -> Decision:
        if len(self.ratios) != num_steps:
            raise ParameterError(
                f"magcache ratio table has {len(self.ratios)} entries for this branch but the run has "
                f"{num_steps} steps; resample the profile to {num_steps} steps first")
        pass_index = step * self.num_branches + self.branch_index
        warmup_passes = int(self.retention_ratio * num_steps * self.num_branches)
        if pass_index < warmup_passes:
            return Decision(True, "warmup", 0.0)
        self.accumulated_ratio *= self.ratios[step] ** self.ratio_power
        self.accumulated_steps += 1
        drift = 1.0 - self.accumulated_ratio
        self.accumulated_error += abs(drift) if self.absolute_error else drift
        error = self.accumulated_error
        within = error <= self.thresh if self.inclusive else error < self.thresh
        if self.thresh > 0 and within and self.accumulated_steps <= self.K and have_cache:
            return Decision(False, "reuse", error)
        reason = "disabled" if self.thresh == 0 else ("no-cache" if not have_cache else
                                                      ("threshold" if not within else "limit"))
        self.reset()
        return Decision(True, reason, error)


class EasyCachePolicy:
    """EasyCache (§4.1): reuse the last output-minus-input while ``sum(k * input_change)`` stays under ``thresh``.

    ``k`` is the transformation rate measured between the last two computed passes; ``input_change`` is
    ``mean|x_t - x_prev| / mean|v_last_computed|``, both measured by the runner.
    """

    def __init__(self, thresh: float, warmup_steps: int, force_last: bool = True):
        self.thresh = check_threshold("easycache thresh", thresh)
        _check_range("easycache warmup_steps", warmup_steps, low=0, integer=True)
        self.warmup_steps = int(warmup_steps)
        self.force_last = bool(force_last)
        self.reset()

    def reset(self) -> None:
        self.accumulated = 0.0
        self.rate: float | None = None

    def restart_accumulation(self) -> None:
        """A pass was computed although this policy would have reused it (another rank computed it)."""
        self.accumulated = 0.0

    def observe_rate(self, rate: float | None) -> None:
        """Called after a computed pass with the freshly measured transformation rate (None when unknown)."""
        if rate is not None:
            self.rate = float(rate)

    def decide(self, step: int, num_steps: int, input_change: float | None, have_cache: bool) -> Decision:
        forced = _forced(step, num_steps, self.warmup_steps, self.force_last)
        if forced:
            self.accumulated = 0.0
            return Decision(True, forced, 0.0)
        if self.rate is None or input_change is None or not have_cache:
            return Decision(True, "no-cache", self.accumulated)
        self.accumulated += self.rate * input_change
        if self.thresh > 0 and self.accumulated < self.thresh:
            return Decision(False, "reuse", self.accumulated)
        accumulated, self.accumulated = self.accumulated, 0.0
        return Decision(True, "threshold" if self.thresh > 0 else "disabled", accumulated)


def compose_resample(values: Sequence[float], length: int) -> list[float]:
    """Ratios for ``length`` steps from a table measured at ``len(values)`` steps, by composing them.

    ``values[k]`` (k >= 1) is the magnitude ratio between steps k-1 and k of the measured schedule; index 0 is
    the padding. Coarse step j lies at position ``j * (n-1) / (length-1)`` of the measured schedule, so its
    ratio is the product of the measured ratios it spans, with fractional spans taken as fractional powers
    (log-linear inside a measured step). Merging steps multiplies their ratios instead of keeping one of them,
    which is what the drift between two coarse steps is; splitting a step shares its ratio out geometrically.
    Not in the reference (a deviation, named as such).
    """
    _check_range("resample length", length, low=1, integer=True)
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

    Resamples ratio *values*; it does not compound them (seed-methods.md §3.4 explains why that under-estimates
    drift for fewer steps). Python's ``round`` is half-to-even like numpy's.
    """
    _check_range("resample length", length, low=1, integer=True)
    n = len(values)
    if n == 0:
        raise ParameterError("cannot resample an empty ratio table")
    if length == 1:
        return [float(values[-1])]
    return [float(values[round(i * (n - 1) / (length - 1))]) for i in range(length)]
