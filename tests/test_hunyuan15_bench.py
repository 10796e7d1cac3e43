"""The HunyuanVideo 1.5 bench's threshold search (hunyuan15/official_bench.py closest_fit), without a checkout:
the bench's runs through upstream's generate.py are in test_hunyuan15_official.py (opt-in)."""
import math

import pytest

from stepcache.hunyuan15.official_bench import closest_fit


def passes_of(steps: int, scale: float):
    """A stand-in method: computed passes fall as the threshold rises (monotone, as TeaCache's and EasyCache's
    do), and every call is recorded."""
    tried = []

    def passes(thresh):
        return max(2, min(steps, round(steps - scale * math.log1p(thresh))))

    def passes_at(thresh):
        tried.append(thresh)
        return passes(thresh)
    return passes_at, passes, tried


@pytest.mark.parametrize("first", [2.0, 8.0, 20.0, 60.0])  # below and above the threshold of the budget (~11)
def test_the_search_ends_on_the_closest_fit_from_either_side(first):
    passes_at, passes, tried = passes_of(50, 10.0)
    budget = 25
    best = closest_fit(passes_at, first, budget, 8)
    assert best in tried and passes(best) <= budget
    assert passes(best) == max(passes(t) for t in tried if passes(t) <= budget)
    assert passes(best) >= budget - 1  # the bracket is closed to within one pass in 8 tries


def test_a_run_on_the_budget_ends_the_search():
    passes_at, passes, tried = passes_of(50, 10.0)
    best = closest_fit(passes_at, 8.0, passes(8.0), 5)
    assert tried == [8.0] and best == 8.0


def test_no_fit_within_the_tries_gives_none():
    passes_at, _, tried = passes_of(50, 0.1)  # the threshold barely moves the passes
    assert closest_fit(passes_at, 1.0, 10, 4) is None and len(tried) == 4
