"""How long a bench will take, and which runs fit a time budget.

Costs are counted in *baseline videos*: one video generated uncached at the bench's step count. A run's videos cost
at most its steps over the baseline's (fewer steps costs exactly that; a cache computes fewer passes than it
runs, so its cost is below the bound). Multiplied by the seconds one baseline video takes on this device, that
gives an upper estimate of the time.

When the estimate is over ``--budget-minutes``, the sweep is thinned instead of cut off at the end of the plan:
every method keeps its points spread over its sweep (middle first, then the ends, then between), taken in turn
across methods until the budget is spent. What is left out is said, and the same command with more budget runs
it (the bench resumes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

WARM_UP_CALLS = 2        # the bench's warm-up generations before anything is measured
WARM_UP_STEPS = 10       # ... each of at most this many steps


def run_steps(run, steps: int) -> int:
    """The steps a run's videos take (the method's own rule; only fewer-steps changes them)."""
    return int(run.method.steps(SimpleNamespace(steps=steps), run.params))


def run_cost(run, steps: int, videos: int, repeats: int) -> float:
    """Baseline videos' worth of work for scoring a run and timing it ``repeats`` times (an upper bound)."""
    return videos * (1 + repeats) * run_steps(run, steps) / steps


def baseline_timings(runs: int, repeats: int, every: int) -> int:
    """Baseline timings the bench interleaves: one before each round's runs, one after every ``every`` runs
    (but the last), one at the end of the round."""
    if runs == 0:
        return 0
    return repeats * (2 + (runs - 1) // every)


@dataclass
class Plan:
    runs: list            # the runs to score and time, in the bench's order
    left_out: list        # runs the budget leaves for a later call
    cost: float           # baseline videos, everything planned included
    seconds: float | None  # estimated, when the seconds per baseline video are known

    def describe(self, seconds_per_video: float | None) -> str:
        estimate = (f"about {self.seconds / 60:.1f} min at most ({seconds_per_video:.2f} s per uncached video on "
                    f"this device)" if self.seconds is not None else "time not estimated")
        return (f"plan: {len(self.runs)} run(s) to finish, {self.cost:.0f} uncached videos' worth of work: "
                f"{estimate}")


def spread_order(count: int) -> list[int]:
    """Indices 0..count-1 in an order that covers a sweep evenly early: the middle, the ends, then the midpoints
    between points already taken."""
    if count <= 0:
        return []
    order = [count // 2] + [i for i in (0, count - 1) if i != count // 2]
    taken = set(order)
    while len(order) < count:
        points = sorted(taken)
        gaps = sorted(((b - a, a, b) for a, b in zip(points, points[1:]) if b - a > 1), key=lambda g: (-g[0], g[1]))
        for _, a, b in gaps:
            middle = (a + b) // 2
            if middle not in taken:
                order.append(middle)
                taken.add(middle)
    return order


def fit(todo: list, steps: int, videos: int, repeats: int, every: int, fixed_cost: float,
        seconds_per_video: float | None, budget_seconds: float | None) -> Plan:
    """The runs of ``todo`` (unscored runs, in plan order) that fit the budget, with ``fixed_cost`` baseline videos
    already committed (the reference, calibration, timing rounds of runs scored before)."""
    def total(runs) -> float:
        return (fixed_cost + sum(run_cost(r, steps, videos, repeats) for r in runs)
                + videos * baseline_timings(len(runs), repeats, every))

    def plan(runs, left_out) -> Plan:
        cost = total(runs)
        return Plan(runs, left_out, cost, None if seconds_per_video is None else cost * seconds_per_video)

    if budget_seconds is None or seconds_per_video is None or total(todo) * seconds_per_video <= budget_seconds:
        return plan(list(todo), [])
    by_method: dict[str, list] = {}
    for run in todo:
        by_method.setdefault(run.method.key, []).append(run)
    queues = [[runs[i] for i in spread_order(len(runs))] for runs in by_method.values()]
    kept: set[str] = set()
    chosen: list = []
    progress = True
    while progress:
        progress = False
        for queue in queues:
            while queue:
                candidate = queue.pop(0)
                if total(chosen + [candidate]) * seconds_per_video <= budget_seconds:
                    chosen.append(candidate)
                    kept.add(candidate.id)
                    progress = True
                    break
    return plan([r for r in todo if r.id in kept], [r for r in todo if r.id not in kept])


def left_out_text(left_out: list) -> str:
    """One line per method: how many of its settings the budget left for a later call."""
    counts: dict[str, list] = {}
    for run in left_out:
        counts.setdefault(run.method.key, []).append(run.id)
    return "; ".join(f"{key}: {len(ids)} setting{'s' if len(ids) > 1 else ''}" for key, ids in counts.items())


def calibration_cost(calibration_pairs: int, calibrated: bool) -> float:
    """Baseline videos the in-session calibrations take (stepcache's, and diffusers MagCache's own pass), when
    they are not made yet."""
    return 0.0 if calibrated else 2.0 * calibration_pairs


def warm_up_cost(steps: int) -> float:
    return WARM_UP_CALLS * min(steps, WARM_UP_STEPS) / steps


def whole_plan_cost(runs: list, steps: int, videos: int, repeats: int, every: int, calibration_pairs: int) -> float:
    """Baseline videos' worth of work for a whole bench from an empty folder (what ``--list`` prints)."""
    measured = [r for r in runs if r.method.key != "baseline"]
    return (warm_up_cost(steps) + videos + calibration_cost(calibration_pairs, False)
            + sum(run_cost(r, steps, videos, repeats) for r in measured)
            + videos * baseline_timings(len(measured), repeats, every))


def minutes(cost: float, seconds_per_video: float) -> float:
    return math.ceil(cost * seconds_per_video / 60)
