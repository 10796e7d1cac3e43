"""TeaCache (Liu et al.): reuse the block stack's residual while the accumulated, polynomial-rescaled relative L1
change of a cheap activation (the "signal") stays under a threshold.

* Signal: the adapter hands the runner an activation at the block stack (the timestep embedding ``temb`` or its
  projection on Wan, block 0's modulated input on HunyuanVideo and Open-Sora); the profile's variant names it.
* Rule: ``acc += poly(|s_t - s_{t-1}|_1 / |s_{t-1}|_1)``; reuse while ``acc < thresh``, else compute and reset.
  Warm-up steps and (per variant) the last step are always computed.
* Calibration: a degree-4 polynomial fitted to (signal change, output change) pairs of uncached runs.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..policies import Decision, Polynomial, check_threshold, check_range, forced_reason
from ..schema import BOOLEAN, EXPERTS_RULE, PREDICT_RULE, finite, integer, one_of
from . import EXPERTS
from .base import EXPERTS_HELP, PREDICT_HELP, STACK, Method, mean_abs_ratio

NAME = "teacache"
DEGREE = 4  # of the fitted polynomial, as published
# The activations a polynomial may be fitted on; each adapter computes the ones of its model.
SIGNALS = ("temb", "timestep_proj", "block0_modulated")


class TeaCachePolicy:
    """Accumulate the rescaled relative L1 change of the signal; reuse while under ``thresh``."""

    def __init__(self, coefficients: Sequence[float], thresh: float, warmup_steps: int = 1, force_last: bool = True,
                 clamp_polynomial: bool = False):
        self.thresh = check_threshold("teacache thresh", thresh)
        check_range("teacache warmup_steps", warmup_steps, low=0, integer=True)
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
        forced = forced_reason(step, num_steps, self.warmup_steps, self.force_last)
        if forced or distance is None or not have_cache:
            self.accumulated = 0.0
            return Decision(True, forced or "no-cache", 0.0)
        self.accumulated += self.rescale(distance)
        if self.thresh > 0 and self.accumulated < self.thresh:
            return Decision(False, "reuse", self.accumulated)
        accumulated, self.accumulated = self.accumulated, 0.0
        return Decision(True, "threshold" if self.thresh > 0 else "disabled", accumulated)


def relative_l1(mean_abs_of, current, previous) -> float | None:
    """``mean|current - previous| / mean|previous|``, the change TeaCache rescales (and calibrates on)."""
    return mean_abs_ratio(mean_abs_of, current - previous, previous)


class TeaCache(Method):
    name = NAME
    skips = STACK
    wants_signal = True
    needs_model = ("TeaCache decides from the change of a model activation (the timestep embedding on Wan, the "
                   "modulated block input on HunyuanVideo and Open-Sora), so its schedule needs the model")
    PARAMETERS = {
        "thresh": ("accumulated rescaled relative-L1 budget; 0 disables reuse", finite(0)),
        "variant": ("which published coefficient set: 'default' or 'use_ret_steps' (Wan)",
                    (lambda v: isinstance(v, str) and bool(v), "is not a variant name")),
        "warmup_steps": ("steps always computed at the start (default: the variant's)", integer(0)),
        "force_last": ("always compute the last step (default: the variant's)", BOOLEAN),
        "clamp_polynomial": ("clamp the rescaling polynomial at 0 (not in the reference; off by default)", BOOLEAN),
        "predict": (PREDICT_HELP, PREDICT_RULE),
        "experts": (EXPERTS_HELP, EXPERTS_RULE),
    }

    def resolve(self, profile, section, params):
        from ..errors import ParameterError
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
        return params

    def signal_name(self, config) -> str:
        return config.profile.method(NAME)["variants"][config.params["variant"]]["signal"]

    def make_policy(self, config, branch, num_steps, window=None, switch_step=None):
        from . import expert_of
        p = config.params
        # A calibrated two-expert profile has a fit per expert, for the separate rule (each expert's own pairs).
        own = config.profile.method(NAME)["variants"][p["variant"]].get("experts", {}).get(expert_of(branch))
        coefficients = own["coefficients"] if own else p["coefficients"]
        return TeaCachePolicy(coefficients, p["thresh"], p["warmup_steps"], p["force_last"], p["clamp_polynomial"])

    def start(self, config):
        # A calibrated polynomial knows the signal changes it was fitted on; outside them it guesses.
        return config.profile.method(NAME)["variants"][config.params["variant"]].get("fit_range")

    def measure(self, runner, state, ctx, tensor, signal):
        if signal is None:
            raise RuntimeError("TeaCache needs the adapter's signal tensor at the block stack")
        distance = None
        if state.previous_signal is not None and state.previous_signal.shape == signal.shape:
            distance = relative_l1(runner.signal_mean_abs, signal, state.previous_signal)
        state.previous_signal = signal.detach()
        fit_range = runner.method_state
        if fit_range and distance is not None and not fit_range[0] <= distance <= fit_range[1]:
            runner.tally("signal change(s) fell outside the range the TeaCache polynomial was fitted on: its "
                         "rescaling is extrapolated there")
        return distance

    def check_section(self, c, section):
        variants = c.mapping(c.need(section, "variants", NAME), "teacache.variants")
        if not variants:
            c.fail("teacache.variants", variants, "at least one variant")
        for name, variant in variants.items():
            path = f"teacache.variants.{name}"
            variant = c.mapping(variant, path)
            c.value(c.need(variant, "signal", path), one_of(*SIGNALS), f"{path}.signal")
            c.numbers(c.need(variant, "coefficients", path), finite(), f"{path}.coefficients")
            c.value(c.need(variant, "warmup_steps", path), integer(0), f"{path}.warmup_steps")
            c.value(c.need(variant, "force_last", path), BOOLEAN, f"{path}.force_last")
            if variant.get("fit_range") is not None:
                fit = c.numbers(variant["fit_range"], finite(), f"{path}.fit_range", min_len=2)
                if len(fit) != 2 or fit[0] > fit[1]:
                    c.fail(f"{path}.fit_range", fit, "[low, high] with low <= high")
            for expert, own in c.mapping(variant.get("experts", {}), f"{path}.experts").items():
                if expert not in EXPERTS:
                    c.fail(f"{path}.experts", expert, "an expert name: " + ", ".join(EXPERTS))
                c.numbers(c.need(c.mapping(own, f"{path}.experts.{expert}"), "coefficients", f"{path}.experts"),
                          finite(), f"{path}.experts.{expert}.coefficients")
        c.settings(section, NAME, NAME)
        for where, params in [("defaults", section.get("defaults", {}))] + [
                (f"presets.{k}", v) for k, v in section.get("presets", {}).items()]:
            if "variant" in params and params["variant"] not in variants:
                c.fail(f"teacache.{where}.variant", params["variant"], "is not one of " + ", ".join(variants))

    # --------------------------------------------------------------------------------------------- calibration
    def calibration_section(self, cal) -> dict[str, Any]:
        """Fit the polynomial to (signal change, output change) pairs; presets by reuse on those runs."""
        from ..calibrate import CalibrationError, fit_polynomial, rmse, speed_presets
        pairs = [(m.generation, m.signal_change, m.output_change) for m in cal.measures
                 if m.signal_change is not None and m.output_change is not None]
        if len(pairs) < DEGREE + 2:
            raise CalibrationError(f"TeaCache needs at least {DEGREE + 2} (signal, output) pairs; got "
                                   f"{len(pairs)} (run more steps or more prompts)")
        x = [p[1] for p in pairs]
        y = [p[2] for p in pairs]
        coefficients = fit_polynomial(x, y, DEGREE)
        line = fit_polynomial(x, y, 1)
        # Held-out errors: fit on every other run, measure on the rest (in-sample error favours the higher degree).
        generations = sorted({p[0] for p in pairs})
        odd = {g: i % 2 == 1 for i, g in enumerate(generations)}

        def halves(points):
            return [p for p in points if not odd[p[0]]], [p for p in points if odd[p[0]]]

        def fitted(points, degree=DEGREE):
            return fit_polynomial([p[1] for p in points], [p[2] for p in points], degree)

        def error(fit, points):
            return rmse(fit, [p[1] for p in points], [p[2] for p in points])

        held, joint_train_fit = {}, None
        train, test = halves(pairs)
        if len(generations) >= 2 and len(train) > DEGREE + 1:
            joint_train_fit = fitted(train)
            held = {"heldout_rmse": error(joint_train_fit, test), "heldout_linear_rmse": error(fitted(train, 1), test),
                    "heldout_pairs": len(test)}
        low, high = min(x), max(x)
        poly = Polynomial(coefficients)
        grid = [low + (high - low) * i / 200 for i in range(201)]
        negative = [g for g in grid if poly(g) < 0]
        base_variant = {}
        if cal.base is not None and cal.base.has(NAME):
            section = cal.base.method(NAME)
            base_variant = section["variants"].get(section.get("defaults", {}).get("variant", "default"), {})
        warmup = int(base_variant.get("warmup_steps", 1))
        force_last = bool(base_variant.get("force_last", True))
        variant = {
            "signal": cal.signal_name, "coefficients": coefficients, "warmup_steps": warmup,
            "force_last": force_last,
            "source": "fitted by stepcache calibrate (numpy.polyfit, degree 4, highest power first)",
            "fit_range": [low, high], "fit_rmse": rmse(coefficients, x, y), "linear_coefficients": line,
            "linear_rmse": rmse(line, x, y), "pairs": len(pairs), **held,
            "negative_inside_range": bool(negative),
        }
        experts = cal.expert_steps()
        if experts:
            # The pairs of each expert alone (the pair across the switch is the jump between experts, which the
            # separate rule never sees): its own fit, and how far the joint fit is from its pairs.
            variant["experts"] = {}
            for expert in experts:
                own = [(m.generation, m.signal_change, m.output_change) for m in cal.measures
                       if m.expert == expert and not m.crosses_switch and m.signal_change is not None
                       and m.output_change is not None]
                if len(own) < DEGREE + 2:
                    raise CalibrationError(f"TeaCache needs at least {DEGREE + 2} (signal, output) pairs per "
                                           f"expert; the {expert} expert has {len(own)} (run more steps)")
                fit = fitted(own)
                entry = variant["experts"][expert] = {
                    "coefficients": fit, "fit_range": [min(p[1] for p in own), max(p[1] for p in own)],
                    "fit_rmse": error(fit, own), "joint_rmse": error(coefficients, own), "pairs": len(own)}
                # Held out as above: both fits made on the even runs, measured on this expert's odd-run pairs.
                own_train, own_test = halves(own)
                if own_test and len(own_train) > DEGREE + 1:
                    entry["heldout_rmse"] = error(fitted(own_train), own_test)
                    entry["heldout_joint_rmse"] = error(joint_train_fit, own_test)
        presets, notes = speed_presets(self._reuse(coefficients, warmup, force_last, cal))
        return {"variants": {"default": variant}, "defaults": {"thresh": presets["medium"]["thresh"],
                                                               "variant": "default"},
                "presets": presets, "preset_notes": notes}

    def describe_calibration(self, section):
        variant = section["variants"]["default"]
        lines = [f"  teacache: degree-{DEGREE} fit on {variant['pairs']} pairs over signal change "
                 f"[{variant['fit_range'][0]:.4g}, {variant['fit_range'][1]:.4g}]: rmse {variant['fit_rmse']:.4g} "
                 f"(straight line {variant['linear_rmse']:.4g})"]
        if "heldout_rmse" in variant:
            lines.append(f"            held-out runs: rmse {variant['heldout_rmse']:.4g} (straight line "
                         f"{variant['heldout_linear_rmse']:.4g})")
        for expert, own in variant.get("experts", {}).items():
            held = (f"; held-out {own['heldout_rmse']:.4g} against {own['heldout_joint_rmse']:.4g}"
                    if "heldout_rmse" in own else "")
            lines.append(f"            {expert} expert alone: its own fit rmse {own['fit_rmse']:.4g} on {own['pairs']} "
                         f"pairs, the joint fit's {own['joint_rmse']:.4g}{held} (experts='separate' uses its own)")
        if variant["negative_inside_range"]:
            lines.append("            WARNING: the fitted polynomial is negative inside its fitted range")
        lines.append(f"            presets {section['presets']}")
        return lines

    @staticmethod
    def _reuse(coefficients, warmup, force_last, cal):
        """The reuse fraction at a threshold, on the measured (uncached) trajectories: the signal's changes do
        not depend on what was skipped, only the trajectory drifts a little."""
        def reuse(thresh):
            reused = total = 0
            for items in cal.runs().values():
                policy = TeaCachePolicy(coefficients, thresh, warmup, force_last)
                for m in items:
                    reused += not policy.decide(m.step, cal.steps, m.signal_change, have_cache=m.step > 0).compute
                    total += 1
            return reused / max(total, 1)
        return reuse


METHOD = TeaCache()
