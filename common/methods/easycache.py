"""EasyCache (Zhou et al.): skip the whole transformer pass, returning ``x + (v - x)`` of the last computed pass,
while the accumulated predicted output change stays under a threshold.

* Measurement: the input change ``mean|x_t - x_prev| / mean|v_last|`` at the start of a pass, and after a
  computed pass the transformation rate ``k = mean|v_t - v_last| / mean|x_t - x_last|`` between the last two
  computed passes.
* Rule: ``acc += k * input_change``; reuse while ``acc < thresh``, else compute and reset. Warm-up steps and the
  last step are always computed. With CFG, the other branches follow the ``decide_on`` branch (Wan).
* Calibration: the rate per step, whose settling gives the suggested warm-up.
"""
from __future__ import annotations

from typing import Any

from ..policies import Decision, check_range, check_threshold, forced_reason
from ..schema import BOOLEAN, EXPERTS_RULE, NAME_OR_NONE, PREDICT_RULE, finite, integer
from .base import EXPERTS_HELP, MODEL, PREDICT_HELP, Method, read_ratios

NAME = "easycache"
# The rate counts as settled once it changes by less than this from step to step, SETTLED_RUN times in a row.
RATE_SETTLED = 0.1
SETTLED_RUN = 3
TOP_LEVEL = ("thresh", "warmup_steps", "force_last", "decide_on")  # its settings sit at the section's top


class EasyCachePolicy:
    """Reuse the last output-minus-input while ``sum(k * input_change)`` stays under ``thresh``."""

    def __init__(self, thresh: float, warmup_steps: int, force_last: bool = True):
        self.thresh = check_threshold("easycache thresh", thresh)
        check_range("easycache warmup_steps", warmup_steps, low=0, integer=True)
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
        forced = forced_reason(step, num_steps, self.warmup_steps, self.force_last)
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


class EasyCache(Method):
    name = NAME
    skips = MODEL
    needs_model = ("EasyCache decides from the change of the latent and of the model output, so its schedule "
                   "depends on the input")
    PARAMETERS = {
        "thresh": ("accumulated transformation-rate budget (a fraction: 0.05 is 5%); 0 disables reuse", finite(0)),
        "warmup_steps": ("steps always computed at the start", integer(0)),
        "force_last": ("always compute the last step", BOOLEAN),
        "decide_on": ("branch whose decision the other CFG branches follow ('cond' as published for Wan), or None",
                      NAME_OR_NONE),
        "predict": (PREDICT_HELP, PREDICT_RULE),
        "experts": (EXPERTS_HELP, EXPERTS_RULE),
    }

    def base_params(self, section):
        return {**section.get("defaults", {}), **{k: section[k] for k in TOP_LEVEL if k in section}}

    def make_policy(self, config, branch, num_steps, window=None, switch_step=None):
        p = config.params
        return EasyCachePolicy(p["thresh"], p["warmup_steps"], p["force_last"])

    def measure(self, runner, state, ctx, x, signal):
        # The rate of the last computed pass, measured after it, is read here with this pass's input change: one
        # host read per pass where reading each when measured made two
        pairs = [] if state.pending is None else [state.pending]
        if state.previous_input is not None and state.computed_output is not None:
            pairs.append(tuple(runner.latent_mean_abs(x - state.previous_input, state.computed_output)))
        values = read_ratios(pairs)
        if state.pending is not None:
            state.policy.observe_rate(values.pop(0))
            state.pending = None
        state.previous_input = x.detach()
        return values[0] if values else None

    def follow(self, runner, state, ctx, x):
        state.previous_input = x.detach()

    def observe(self, runner, state, ctx, v):
        x = ctx.latent
        if state.computed_input is not None and state.computed_input.shape == x.shape:
            state.pending = tuple(runner.latent_mean_abs(v - state.computed_output, x - state.computed_input))
        state.computed_input = x.detach()
        state.computed_output = v.detach()

    def check_section(self, c, section):
        c.parameters({k: section[k] for k in TOP_LEVEL if k in section}, NAME, NAME)
        if "suggested_warmup_steps" in section:
            c.value(section["suggested_warmup_steps"], integer(0), "easycache.suggested_warmup_steps")
        c.settings(section, NAME, NAME)

    # --------------------------------------------------------------------------------------------- calibration
    def calibration_section(self, cal) -> dict[str, Any]:
        """The rate per step and where it settles (the suggested warm-up); presets by reuse on the runs."""
        from ..calibrate import speed_presets, summary_stats
        steps, base = cal.steps, cal.base
        grouped = cal.grouped("rate")
        branch = cal.measures[0].branch
        rates = [(s, summary_stats(grouped[(branch, s)])) for s in range(1, steps) if (branch, s) in grouped]
        changes = [(rates[i][0], abs(rates[i][1]["mean"] / rates[i - 1][1]["mean"] - 1))
                   for i in range(1, len(rates))]
        # The rate predicts a step's output change from the last computed step's, which only works once it stops
        # jumping: the warm-up ends at the first step from which it changes by less than RATE_SETTLED for
        # SETTLED_RUN steps in a row (the final step does not count: it is always computed).
        candidates = changes[:-1]
        settled = steps - 1
        for i, (step, _) in enumerate(candidates):
            if all(c < RATE_SETTLED for _, c in candidates[i:i + SETTLED_RUN]):
                settled = step
                break
        base_section = base.data.get(NAME, {}) if base is not None else {}
        warmup = int(base_section.get("warmup_steps", max(settled, 1)))
        leader = base_section.get("decide_on", "cond" if len({m.branch for m in cal.measures}) > 1 else None)
        # Presets from the decisions of the leading branch (the others follow it when decide_on is set).
        lead = [m for m in cal.measures if leader is None or m.branch == leader]
        presets, notes = speed_presets(self._reuse(warmup, True, steps, cal.runs(lead)))
        return {"thresh": presets["medium"]["thresh"], "warmup_steps": warmup, "force_last": True,
                "decide_on": leader, "suggested_warmup_steps": settled,
                "rate": {"steps": [s for s, _ in rates], "mean": [st["mean"] for _, st in rates],
                         "std": [st["std"] for _, st in rates],
                         "relative_change": [round(c, 5) for _, c in changes]},
                "presets": presets, "preset_notes": notes,
                "source": "measured by stepcache calibrate; warm-up from "
                          + (base.name if base_section else "the rate's settling")}

    def describe_calibration(self, section):
        return [f"  easycache: rate settles from step {section['suggested_warmup_steps']} (warm-up used: "
                f"{section['warmup_steps']} steps)"]

    @staticmethod
    def _reuse(warmup, force_last, steps, runs):
        """The reuse fraction at a threshold, replayed on the measured trajectories with the rate of the last
        computed step standing in for the rate between the last two computed steps."""
        def reuse(thresh):
            reused = total = 0
            for items in runs.values():
                policy = EasyCachePolicy(thresh, warmup, force_last)
                last_output = None
                for m in items:
                    change = (m.input_change / last_output if m.input_change is not None and last_output else None)
                    decision = policy.decide(m.step, steps, change, have_cache=last_output is not None)
                    if decision.compute:
                        policy.observe_rate(m.rate)
                        last_output = m.output_mean
                    reused += not decision.compute
                    total += 1
            return reused / max(total, 1)
        return reuse


METHOD = EasyCache()
