"""What a method is, for the runner, the profile check and calibration. One module per method subclasses it.

A method says:

* ``skips``: what a reused pass leaves out. ``STACK``: the block stack (the runner decides when the stack is
  entered and caches ``h_L - h0``); ``MODEL``: the whole forward (the runner decides when the pass begins and
  caches ``v - x``, the model's output minus its input);
* ``PARAMETERS``: each parameter's help text and allowed values (:mod:`stepcache.schema` rules);
* ``resolve``: the parameters a run uses, from the profile's section, a preset and the caller's values;
* ``make_policy``: its pure decision rule, one per CFG branch;
* ``measure`` / ``observe``: what it reads from a pass (the number its policy decides on; what it keeps after a
  computed pass);
* ``check_section``: what its section of a profile file may hold;
* ``calibration_section``: how ``stepcache calibrate`` turns measurements into that section.

The runner and the front door call these and never name a method.
"""
from __future__ import annotations

import math
from typing import Any

STACK = "stack"
MODEL = "model"
# How a reused pass estimates what the skipped work would have produced (stepcache.schema.PREDICTIONS): "reuse"
# is what all three papers do; "linear" extrapolates from the last two computed passes (as diffusers' SeaCache
# and cache-dit's TaylorSeer do), which the published thresholds were not tuned for. The runner applies it.
PREDICT_HELP = ("how a reused pass estimates the skipped work: 'reuse' (default, as published: the last computed "
                "residual) or 'linear' (extrapolated, by step index, from the last two computed residuals)")
# Two-expert models (Wan2.2 A14B: a high-noise expert, then a low-noise one). "shared" is the published rule
# (MagCache4Wan2.2, EasyCache4Wan2.2: the state lives on the model class, which both experts share); "separate"
# is stepcache's: accumulators, residuals and history never cross the switch, and each expert's part of the run
# is treated as a run of its own (warm-up at its start, its last step where the method computes a last step).
EXPERTS_HELP = ("two-expert models only (Wan2.2 A14B): 'shared' (default, as published: one cache state for both "
                "experts, carried across the switch) or 'separate' (one state per expert, each expert's steps "
                "warmed up and decided as a run of their own)")


def mean_abs_ratio(mean_abs_of, numerator, denominator) -> float | None:
    """``mean|numerator| / mean|denominator|``, or None when it is not finite (a zero denominator); one host read.
    ``mean_abs_of(*tensors)`` gives each tensor's mean absolute value (over the whole sequence when sharded).
    TeaCache's relative L1 change and EasyCache's input change and transformation rate are all this."""
    return read_ratios([tuple(mean_abs_of(numerator, denominator))])[0]


def read_ratios(pairs: list[tuple[Any, Any]]) -> list[float | None]:
    """``num / den`` of each pair of 0-d tensors, read to the host in one transfer (a GPU waits once, however many
    numbers a pass needs); None where a ratio is not finite."""
    if not pairs:
        return []
    import torch
    values = torch.stack([num / den for num, den in pairs]).tolist()
    return [v if math.isfinite(v) else None for v in values]


class Method:
    name: str
    skips: str = STACK
    wants_signal = False  # whether the adapter must hand the runner an activation at the block stack
    # Why its schedule cannot be simulated without a model (None: it decides from the step and profile alone).
    needs_model: str | None = None
    PARAMETERS: dict[str, tuple[str, Any]] = {}

    def resolve(self, profile, section: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """``params`` (defaults, then preset, then the caller's) completed with this method's own defaults."""
        return params

    def base_params(self, section: dict[str, Any]) -> dict[str, Any]:
        """The profile section's default parameters, before any preset."""
        return dict(section.get("defaults", {}))

    def make_policy(self, config, branch: str, num_steps: int, window: tuple[int, int] | None = None,
                    switch_step: int | None = None):
        """A pure decision rule for one branch state (see :meth:`MethodConfig.make_policy` for ``window`` and
        ``switch_step``; a rule that reads only the step it is given needs neither)."""
        raise NotImplementedError

    def validate(self, config, num_steps: int | None = None) -> None:
        """Build what ``make_policy`` builds once (at ``num_steps``, the run's, when known), so that a bad value
        fails when the method is resolved, before any model runs."""
        config.make_policy("cond", num_steps or 2)

    def generation_notes(self, config, num_steps: int) -> list[str]:
        """What a generation of ``num_steps`` steps does differently from the profile, said once in the stats."""
        return []

    def generation_warnings(self, config, num_steps: int) -> list[str]:
        """What makes the profile's numbers unfit for a generation of ``num_steps`` steps: warned (and noted in the
        stats) at every such generation."""
        return []

    def start(self, config) -> Any:
        """Per-runner state of the method's own (e.g. a fitted range to compare signals with)."""
        return None

    def measure(self, runner, state, ctx, tensor, signal) -> float | None:
        """The number the policy decides on, read at the decision point (``tensor`` is ``h0`` for STACK methods,
        the latent ``x`` for MODEL methods; ``signal`` the adapter's activation when ``wants_signal``)."""
        return None

    def follow(self, runner, state, ctx, tensor) -> None:
        """The branch takes another branch's decision this pass (``decide_on``): see its input, measure nothing."""

    def observe(self, runner, state, ctx, output) -> None:
        """After a computed pass of a MODEL method: its output ``v`` (the residual ``v - x`` is stored by the
        runner)."""

    def check_section(self, checker, section: dict[str, Any]) -> None:
        checker.settings(section, self.name, self.name)

    def calibration_section(self, calibration) -> dict[str, Any]:
        raise NotImplementedError

    def describe_calibration(self, section: dict[str, Any]) -> list[str]:
        """Lines saying what calibration measured for this method (printed after `stepcache calibrate`)."""
        return [f"  {self.name}: presets {section.get('presets', {})}"]
