"""MagCache (Ma et al.): reuse the block stack's residual while the accumulated error of calibrated magnitude
ratios stays under a threshold, at most ``K`` reuses in a row.

* Table: per step and CFG branch, the mean over tokens of ``||r_t|| / ||r_{t-1}||`` of the residual
  ``r = h_L - h0``, measured once on uncached runs (the profile's ``ratios``, interleaved cond, uncond, ...).
* Rule: ``ratio *= table[t]; err += |1 - ratio|``; reuse while ``err < thresh`` (or ``<=``, per table) and at
  most K in a row; a warm-up of ``retention_ratio`` of the passes is always computed (``retention_rule``
  "start"), or, for a profile with ``retention_zones`` (MagCache4Wan2.2's two-expert rule), the zones it names
  around the expert switch. It reads nothing from the pass, so its whole schedule is known before a model runs
  (``stepcache schedule``).
* Calibration: the table (with its spread), and speed presets found by simulating the schedule on it.
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

from ..policies import Decision, check_range, check_threshold
from ..schema import BOOLEAN, EXPERTS_RULE, PREDICT_RULE, RESAMPLE_MODES, finite, integer, one_of
from .base import EXPERTS_HELP, PREDICT_HELP, STACK, Method

NAME = "magcache"
# The reference's table layout and decision rule, as the released Wan code has them (a table may say otherwise).
RULE = {"inclusive": False, "ratio_power": 1.0, "absolute_error": True}
# Named variants of the rule a table can be switched to (with_rule). The published Open-Sora numbers were made
# with square-rooted ratios and a signed error (the opensora-1.2 table carries that rule); MagCache's released
# model scripts use raw ratios and |1 - acc|, with <= in the single-branch script (MagCache4HunyuanVideo).
RULES = {"released": {"ratio_power": 1.0, "absolute_error": True, "inclusive": True}}
# MagCache's speed levels of a calibrated profile allow longer runs of reuse, as the published settings do.
SPEED_K = {"slow": 2, "medium": 3, "fast": 4}
# A ratio is ||r_t|| / ||r_{t-1}|| of consecutive residuals: measured tables stay within 0.5-1.5. Zero or negative
# ratios break the (fractional-)power accumulation; past 10 a table is not a measurement.
MAX_RATIO = 10.0
# Where a retention zone may start and end, in run order: the first pass, the first pass of the low-noise expert
# (a two-expert model's model.experts), the end of the run.
ANCHORS = ("start", "switch", "end")
ZONE_KEYS = ("from", "span", "closed")
# "start": the first retention_ratio of all passes (MagCache4Wan2.1, and MagCache4Wan2.2's one-model TI2V path);
# "zones": the profile's retention_zones (MagCache4Wan2.2's A14B paths).
RETENTION_RULES = ("start", "zones")


# A table is stretched too far when each step of a run merges this many measured steps or more: a run of at most
# half its steps (a step-distilled model's 8-12 against a 40- or 50-step table).
FEW_STEPS_FACTOR = 2

class MagCachePolicy:
    """Accumulated error of the calibrated magnitude ratios, at most ``K`` reuses in a row.

    The reference counts passes, not steps: a table calibrated with CFG interleaves the branches (cond, uncond,
    cond, ...), and the retention warm-up is ``int(retention_ratio * passes)`` over that interleaved count. So a
    policy is told its branch's position in the table layout (``branch_index`` of ``num_branches``) and works in
    pass units, which reproduces the published schedules exactly. A table with ``retention_unit: "step"``
    (ComfyUI-MagCache's rule, nodes.py:1212) computes the first ``int(retention_ratio * steps)`` steps instead,
    every branch of them: the two differ where ``retention_ratio * steps`` is not a whole number.

    ``retention_zones`` replaces that warm-up with zones, each ``(start, low, high, closed)`` in steps: the passes
    from ``start`` up to ``low + retention_ratio * (high - low)`` (in passes; below its integer part, or up to and
    including it when ``closed``) are computed. This is MagCache4Wan2.2's rule (magcache_generate.py:294-303),
    whose T2V zone at the low-noise expert's start compares with ``<=``. The accumulators are neither read nor
    reset inside a zone, nor at the expert switch: the reference keeps one state for both experts.
    """

    def __init__(self, ratios: Sequence[float], thresh: float, K: int, retention_ratio: float,
                 num_branches: int = 1, branch_index: int = 0, inclusive: bool = False,
                 ratio_power: float = 1.0, absolute_error: bool = True,
                 retention_zones: Sequence[tuple[int, int, int, bool]] | None = None,
                 retention_in_steps: bool = False):
        self.thresh = check_threshold("magcache thresh", thresh)
        check_range("magcache K", K, low=1, integer=True)
        check_range("magcache retention_ratio", float(retention_ratio), low=0.0, high=1.0, high_open=True)
        check_range("magcache num_branches", num_branches, low=1, integer=True)
        check_range("magcache branch_index", branch_index, low=0, high=num_branches - 1, integer=True)
        self.ratios = [float(r) for r in ratios]
        self.K = int(K)
        self.retention_ratio = float(retention_ratio)
        self.num_branches = int(num_branches)
        self.branch_index = int(branch_index)
        self.inclusive = bool(inclusive)
        self.ratio_power = float(ratio_power)
        self.absolute_error = bool(absolute_error)
        self.retention_in_steps = bool(retention_in_steps)
        self.retention_zones = None if retention_zones is None else [
            (int(start), int(low), int(high), bool(closed)) for start, low, high, closed in retention_zones]
        self.reset()

    def reset(self) -> None:
        self.accumulated_ratio = 1.0
        self.accumulated_error = 0.0
        self.accumulated_steps = 0

    def restart_accumulation(self) -> None:
        """A pass was computed although this policy would have reused it (another rank computed it)."""
        self.reset()

    def decide(self, step: int, num_steps: int, measurement: float | None = None,
               have_cache: bool = True) -> Decision:
        """``measurement`` is unused: MagCache decides from the step and its table alone."""
        from ..errors import ParameterError
        if len(self.ratios) != num_steps:
            raise ParameterError(
                f"magcache ratio table has {len(self.ratios)} entries for this branch but the run has "
                f"{num_steps} steps; resample the profile to {num_steps} steps first")
        pass_index = step * self.num_branches + self.branch_index
        if self.retention_zones is None:
            if self.retention_in_steps:  # the first int(ratio * steps) steps, every branch of them
                warm = step < int(self.retention_ratio * num_steps)
            else:
                warm = pass_index < int(self.retention_ratio * num_steps * self.num_branches)
            if warm:
                return Decision(True, "warmup", 0.0)
        elif self.retained(pass_index):
            return Decision(True, "retention", 0.0)
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

    def retained(self, pass_index: int) -> bool:
        """Whether a pass lies in a retention zone. Counted in passes (cond, uncond, ...) with the reference's
        arithmetic, ``low + (high - low) * ratio`` in float64, so a bound that is not a whole pass falls alike.
        (The reference compares its tensor counter with the closed bound in float32; for retention ratios in
        thousandths and up to 200 steps that puts no bound on the other side of a pass.)"""
        b = self.num_branches
        for start, low, high, closed in self.retention_zones:
            bound = low * b + (high * b - low * b) * self.retention_ratio
            if pass_index >= start * b and (pass_index <= bound if closed else pass_index < int(bound)):
                return True
        return False


def zone_steps(profile, zones, num_steps: int, switch_step: int | None = None) -> list[tuple[int, int, int, bool]]:
    """A profile's retention zones as steps of a run of ``num_steps`` steps: (from, span start, span end, closed),
    with 'switch' at ``switch_step`` (the run's, when its caller knows it), else where the profile's expert
    boundary puts the low-noise expert at that step count."""
    at = {"start": 0, "end": num_steps}
    if any("switch" in (zone["from"], *zone["span"]) for zone in zones):
        at["switch"] = profile.expert_switch_step(num_steps) if switch_step is None else int(switch_step)
    return [(at[zone["from"]], at[zone["span"][0]], at[zone["span"][1]], bool(zone.get("closed", False)))
            for zone in zones]


def residual_ratio_stats(current, previous, all_reduce=lambda t: None) -> tuple[float, float, float]:
    """(mean, std, mean cosine distance) over tokens of the per-token ``||r_t|| / ||r_prev||`` (MC-WAN:80-194).

    ``all_reduce`` sums the per-token statistics over a sequence-parallel group, so every rank gets the value
    over the whole sequence.
    """
    import torch
    # float32 whatever the model's dtype: a bf16 norm ratio near 1 has only ~3 significant digits.
    cur, prev = current.float(), previous.float()
    ratio = cur.norm(dim=-1) / prev.norm(dim=-1)
    cos = 1 - torch.nn.functional.cosine_similarity(cur, prev, dim=-1, eps=1e-8)
    sums = torch.stack([ratio.sum(), (ratio * ratio).sum(), cos.sum(),
                        torch.tensor(float(ratio.numel()), device=ratio.device)]).double()
    all_reduce(sums)
    total, total_sq, total_cos, count = (float(v) for v in sums)
    mean = total / count
    # The reference's torch.std is the unbiased estimate; the same from the reduced sums.
    var = max(total_sq - total * total / count, 0.0) / max(count - 1, 1)
    return mean, var ** 0.5, total_cos / count


def interleave_with_padding(per_branch: dict[str, Sequence[float]], order: Sequence[str],
                            pad: float = 1.0) -> list[float]:
    """The reference's table layout: ``[pad] * branches`` for step 0, then step 1 of every branch in ``order``,
    step 2, ... (cond, uncond, cond, ... for Wan)."""
    lengths = {b: len(per_branch[b]) for b in order}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"branches have different numbers of measured steps: {lengths}")
    out = [float(pad)] * len(order)
    for step in range(next(iter(lengths.values()), 0)):
        out.extend(float(per_branch[b][step]) for b in order)
    return out


def with_rule(profile, rule: str, description: str):
    """``profile`` with its MagCache section switched to the named rule of ``RULES`` (every other table
    unchanged); named ``<profile>-<rule>``."""
    import copy

    from ..errors import ParameterError
    from ..profiles import Profile
    if rule not in RULES:
        raise ParameterError(f"unknown MagCache rule {rule!r}; known rules: {', '.join(RULES)}")
    data = copy.deepcopy(profile.data)
    data["name"] = f"{profile.name}-{rule}"
    data["description"] = f"{data.get('description', profile.name)}; MagCache with the {rule} rule"
    data[NAME].update(RULES[rule])
    data[NAME]["rule"] = f"{rule}: {description}; derived from {profile.name} (same table, same source)"
    return Profile(data["name"], data, None)


class MagCache(Method):
    name = NAME
    skips = STACK
    PARAMETERS = {
        "thresh": ("accumulated magnitude-error budget; 0 disables reuse", finite(0)),
        "K": ("at most K reused passes in a row (>= 1)", integer(1)),
        "retention_ratio": ("fraction of passes always computed at the start, in [0, 1)",
                            finite(0, 1, high_open=True)),
        "resample": ("how a table is fitted to another step count: 'compose' (default: multiply the ratios of the "
                     "merged steps, split them geometrically for more steps), 'nearest' (the reference's) or "
                     "'none' (refuse)", one_of(*RESAMPLE_MODES)),
        "retention_rule": ("where the always-computed passes are: 'start' (the first retention_ratio of all passes) "
                           "or 'zones' (the profile's retention_zones: MagCache4Wan2.2's, around the expert switch; "
                           "the default for a profile that has them)", one_of(*RETENTION_RULES)),
        "predict": (PREDICT_HELP, PREDICT_RULE),
        "experts": (EXPERTS_HELP, EXPERTS_RULE),
    }

    def resolve(self, profile, section, params):
        from ..errors import ParameterError
        from ..profiles import DEFAULT_RESAMPLE
        params.setdefault("resample", DEFAULT_RESAMPLE)
        params.setdefault("retention_ratio", 0.2)
        if params.get("experts") == "separate":
            if params.get("retention_rule") == "zones":
                raise ParameterError("magcache retention_rule='zones' is the shared-state rule's (zones around the "
                                     "expert switch); with experts='separate' each expert computes the first "
                                     "retention_ratio of its own passes; leave retention_rule out")
        # Only a profile with zones gets the key by default, so every other profile's settings read as before.
        elif section.get("retention_zones"):
            params.setdefault("retention_rule", "zones")
        elif params.get("retention_rule") == "zones":
            raise ParameterError(f"magcache retention_rule='zones' needs retention zones, and profile "
                                 f"{profile.name!r} has none; allowed: 'start'")
        return params

    def make_policy(self, config, branch, num_steps, window=None, switch_step=None):
        p = config.params
        index, count = config.branch_layout(branch)
        table = config.profile.method(NAME)
        ratios = config.profile.magcache_ratios(num_steps, index, p["resample"])
        zones = None
        if window is not None:  # one expert's steps, as a run of their own: its ratios, its own warm-up
            # The first is the table's start for that expert: at the switch it is the jump from the other
            # expert's residual, which this expert's run never compares with.
            ratios = [1.0] + ratios[window[0] + 1:window[1]]
        elif p.get("retention_rule", "start") == "zones":
            zones = zone_steps(config.profile, table["retention_zones"], num_steps, switch_step)
        return MagCachePolicy(ratios, p["thresh"], p["K"], p["retention_ratio"], count, index,
                              inclusive=table.get("inclusive", False), ratio_power=table.get("ratio_power", 1.0),
                              absolute_error=table.get("absolute_error", True), retention_zones=zones,
                              retention_in_steps=table.get("retention_unit", "pass") == "step")

    def validate(self, config, num_steps=None):
        steps = num_steps or int(config.profile.method(NAME)["steps"])
        for branch in config.profile.magcache_branches():
            config.make_policy(branch, steps)  # K, retention and the table's shape (resampled to the run's steps)

    def generation_notes(self, config, num_steps):
        table_steps = int(config.profile.method(NAME)["steps"])
        if table_steps == num_steps:
            return []
        return [f"the MagCache table of {config.profile.name} was measured at {table_steps} steps; resampled to "
                f"{num_steps} ({config.params['resample']})"]

    def generation_warnings(self, config, num_steps):
        table_steps = int(config.profile.method(NAME)["steps"])
        if table_steps < FEW_STEPS_FACTOR * num_steps:
            return []
        return [f"this run has {num_steps} steps and the MagCache table of {config.profile.name} was measured at "
                f"{table_steps}: each of its steps merges {table_steps / num_steps:.1f} measured ones, so the table "
                f"says little about this run's steps (and a step-distilled model does not change per step as the "
                f"model the table was measured on does); use a table measured nearer this count, or calibrate at "
                f"{num_steps} steps (`stepcache calibrate --steps {num_steps}`) and check the reuse "
                f"against fewer steps before trusting it"]

    def check_section(self, c, section):
        steps = c.need(section, "steps", NAME)
        c.value(steps, integer(2), "magcache.steps")
        branches = section.get("branches") or ["cond"]
        if not (isinstance(branches, list) and all(isinstance(b, str) and b for b in branches)
                and len(set(branches)) == len(branches)):
            c.fail("magcache.branches", branches, "a list of distinct branch names")
        ratios = c.numbers(c.need(section, "ratios", NAME), finite(0, MAX_RATIO, low_open=True), "magcache.ratios")
        if len(ratios) != steps * len(branches):
            c.fail_text(f"magcache.ratios has {len(ratios)} values; allowed: steps x branches = {steps} x "
                        f"{len(branches)} = {steps * len(branches)} (one per step and branch)")
        for key, rule in (("inclusive", BOOLEAN), ("absolute_error", BOOLEAN),
                          ("ratio_power", finite(0, 4, low_open=True)), ("retention_unit", one_of("pass", "step"))):
            if key in section:
                c.value(section[key], rule, f"magcache.{key}")
        if "retention_zones" in section:
            self._check_zones(c, section["retention_zones"])
        c.settings(section, NAME, NAME)
        named = [("defaults", section.get("defaults", {}))] + [(f"presets.{n}", p)
                                                              for n, p in section.get("presets", {}).items()]
        for where, params in named:
            if params.get("retention_rule") == "zones" and not section.get("retention_zones"):
                c.fail(f"magcache.{where}.retention_rule", "zones",
                       "is not allowed: the profile has no magcache.retention_zones")

    @staticmethod
    def _check_zones(c, zones):
        """Each zone: ``from`` an anchor, ``span`` two anchors in run order (``from`` not after the span's start),
        ``closed`` a boolean; a zone at the expert switch needs the profile's ``model.experts``."""
        if not isinstance(zones, list) or not zones:
            c.fail("magcache.retention_zones", zones,
                   'a non-empty list of zones, each {"from": anchor, "span": [anchor, anchor], "closed": bool}')
        order = {a: i for i, a in enumerate(ANCHORS)}
        model = c.data.get("model")
        experts = model.get("experts") if isinstance(model, dict) else None
        for i, zone in enumerate(zones):
            key = f"magcache.retention_zones[{i}]"
            zone = c.mapping(zone, key)
            for extra in zone:
                if extra not in ZONE_KEYS:
                    c.fail(f"{key}.{extra}", zone[extra], f"is not a zone key ({', '.join(ZONE_KEYS)})")
            start = c.need(zone, "from", key)
            c.value(start, one_of(*ANCHORS), f"{key}.from")
            span = c.need(zone, "span", key)
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(a, str) and a in order for a in span)
                    and order[span[0]] < order[span[1]]):
                c.fail(f"{key}.span", span, f"two anchors in run order ({', '.join(ANCHORS)}), e.g. "
                                            f"['switch', 'end']")
            if order[start] > order[span[0]]:
                c.fail(f"{key}.from", start, f"is not allowed: a zone starts at or before its span ({span[0]!r})")
            if "closed" in zone:
                c.value(zone["closed"], BOOLEAN, f"{key}.closed")
            if "switch" in (start, *span) and not experts:
                c.fail(f"{key}.span", span, "is not allowed: 'switch' needs the profile's model.experts (where "
                                            "the low-noise expert takes over), which it lacks")

    # --------------------------------------------------------------------------------------------- calibration
    def calibration_section(self, cal) -> dict[str, Any]:
        """The mean ratio table with its spread; published presets kept, speed levels found on this table."""
        from ..calibrate import SPEED_LEVELS, CalibrationError, summary_stats, threshold_for
        grouped = cal.grouped("ratio")
        branches, steps, base = cal.branches, cal.steps, cal.base
        per = {b: [summary_stats(grouped[(b, s)]) for s in range(1, steps) if (b, s) in grouped] for b in branches}
        for b in branches:
            if len(per[b]) != steps - 1:
                raise CalibrationError(f"branch {b!r} is missing ratios; every run must have {steps} steps")
        stds = cal.grouped("ratio_std")
        coss = cal.grouped("cos_distance")

        def table(pick, pad=1.0):
            return interleave_with_padding({b: [round(pick(b, s, st), 5) for s, st in enumerate(per[b], start=1)]
                                            for b in branches}, branches, pad=pad)

        rule = base.data.get(NAME, {}) if base is not None and base.has(NAME) else {}
        section = {
            "ratios": table(lambda b, s, st: st["mean"]),
            "steps": steps,
            "branches": list(branches),
            **{key: rule.get(key, default) for key, default in RULE.items()},
            "spread": {"std": table(lambda b, s, st: st["std"], 0.0), "min": table(lambda b, s, st: st["min"]),
                       "max": table(lambda b, s, st: st["max"]), "runs": per[branches[0]][0]["n"]},
            "token_std": table(lambda b, s, st: summary_stats(stds[(b, s)])["mean"], 0.0),
            "cos_distance": table(lambda b, s, st: summary_stats(coss[(b, s)])["mean"], 0.0),
            "defaults": dict(rule.get("defaults", {"thresh": 0.12, "K": 2, "retention_ratio": 0.2})),
        }
        # Published presets keep their names; the speed levels are measured on this table, since the published
        # thresholds were chosen for another one.
        presets = {name: p for name, p in rule.get("presets", {}).items() if name not in SPEED_LEVELS}
        notes = {}
        retention = section["defaults"].get("retention_ratio", 0.2)
        for level, fraction in SPEED_LEVELS.items():
            k = SPEED_K[level]
            reuse = self._reuse(section, steps, k, retention)
            target = min(fraction, reuse(1e6))
            presets[level] = {"thresh": threshold_for(target, reuse) if target > 0 else 0.12, "K": k,
                              "retention_ratio": retention}
            notes[level] = f"reuses {reuse(presets[level]['thresh']):.0%} of the passes at {steps} steps"
        section["presets"] = presets
        section["preset_notes"] = notes
        experts = cal.expert_steps()
        if experts:
            # The entry at the switch compares the second expert's first residual with the first expert's last:
            # the shared rule reads it; the separate rule reads each expert's steps alone (make_policy's window).
            switch = experts[list(experts)[1]][0]
            section["experts"] = {"steps": experts, "switch_jump": {b: round(per[b][switch - 1]["mean"], 5)
                                                                    for b in branches}}
        if "defaults" not in rule:
            section["defaults"] = dict(presets["medium"])
        return section

    def describe_calibration(self, section):
        spread = max(section["spread"]["std"])
        lines = [f"  magcache: {len(section['ratios'])} ratios, {section['steps']} steps x {len(section['branches'])} "
                f"branch(es), {section['spread']['runs']} run(s) each; largest spread over runs (std) {spread:.4f}"]
        if "experts" in section:
            experts = section["experts"]
            (first, steps_a), (second, steps_b) = experts["steps"].items()
            jump = ", ".join(f"{b} {v:.4g}" for b, v in experts["switch_jump"].items())
            lines.append(f"            experts: {first} steps {steps_a[0]}-{steps_a[1] - 1}, {second} steps "
                         f"{steps_b[0]}-{steps_b[1] - 1}; the ratio across the switch ({jump}) is read by "
                         f"experts='shared' only")
        return lines

    @staticmethod
    def _reuse(section, steps, K, retention):
        """The reuse fraction at a threshold: the schedule follows from the table alone, so it is the one
        `stepcache schedule` simulates."""
        from ..profiles import FORMAT, Profile
        from ..runner import NothingCachedWarning
        from ..schedule import simulate
        from . import resolve_method
        profile = Profile("calibrated", {"format": FORMAT, "name": "calibrated", NAME: section})

        def reuse(thresh):
            config = resolve_method(NAME, profile, None, thresh=thresh, K=K, retention_ratio=retention)
            with warnings.catch_warnings():  # probing thresholds that reuse nothing is the point here
                warnings.simplefilter("ignore", NothingCachedWarning)
                computed, total = simulate(config, steps).counts()
            return 1 - computed / total
        return reuse


METHOD = MagCache()
