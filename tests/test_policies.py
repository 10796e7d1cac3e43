"""The skip rules on their own: published schedules, forced passes, accumulators, and bad values."""
import json
from pathlib import Path

import pytest

from stepcache.methods import resolve_method
from stepcache.methods.easycache import EasyCachePolicy
from stepcache.methods.magcache import MagCachePolicy
from stepcache.methods.teacache import TeaCachePolicy
from stepcache.policies import ParameterError, Polynomial, nearest_resample
from stepcache.profiles import ProfileError, load_profile
from stepcache.schedule import simulate

# (profile, thresh, K, computed, total, pattern or None): replayed from the released code (docs/profiles.md
# lists the published settings).
PUBLISHED = [
    ("hunyuanvideo-t2v-720p", 0.24, 6, 19, 50, "CCCCCCCCCC....C...C....C.....C....C......C....C.CC"),
    ("hunyuanvideo-t2v-720p", 0.12, 4, 22, 50, "CCCCCCCCCC..C..C..C...C..C...C...C....C....C..C.CC"),
    ("hunyuanvideo-t2v-544p", 0.24, 6, 18, 50, "CCCCCCCCCC....C...C....C.....C....C......C....C.C."),
    ("wan2.1-t2v-1.3b", 0.12, 2, 50, 100, "C" * 20 + "....CC" * 11 + "..CC" * 3 + "CC"),
    ("wan2.1-t2v-1.3b", 0.12, 4, 42, 100, None),
    ("wan2.1-t2v-14b", 0.24, 6, 36, 100, None),
    ("wan2.1-i2v-14b-480p", 0.24, 6, 30, 80, None),
    ("wan2.1-i2v-14b-720p", 0.24, 6, 28, 80, None),
    ("opensora-1.2", 0.12, 3, 12, 30, "CCCCCC...C...C...C...C...C...C"),
    ("opensora-1.2", 0.24, 5, 10, 30, None),
    ("wan2.1-t2v-1.3b-paper-eval", 0.12, 4, 38, 100, None),
]


@pytest.mark.parametrize("profile,thresh,K,computed,total,pattern", PUBLISHED)
def test_published_magcache_schedules(profile, thresh, K, computed, total, pattern):
    config = resolve_method("magcache", profile, thresh=thresh, K=K, retention_ratio=0.2)
    steps = load_profile(profile).method("magcache")["steps"]
    stats = simulate(config, steps)
    assert stats.counts() == (computed, total)
    if pattern is not None:
        assert stats.pattern() == pattern


def test_wan_table_gives_each_branch_its_own_ratios():
    # The 1.3B table's cond and uncond halves differ; each branch must read its own (interleaved) half.
    profile = load_profile("wan2.1-t2v-1.3b")
    cond, uncond = profile.magcache_ratios(50, 0), profile.magcache_ratios(50, 1)
    raw = profile.method("magcache")["ratios"]
    assert cond == raw[0::2] and uncond == raw[1::2] and cond != uncond


def test_nearest_resample_matches_reference_index_map():
    # The reference's nearest_interp (MagCache4Wan2.1): 50 -> 30 picks these indices (numpy round-half-to-even).
    expected = [0, 2, 3, 5, 7, 8, 10, 12, 14, 15, 17, 19, 20, 22, 24, 25, 27, 29, 30, 32, 34, 35, 37, 39, 41, 42,
                44, 46, 47, 49]
    assert nearest_resample(list(range(50)), 30) == [float(i) for i in expected]
    assert nearest_resample([1.0, 2.0, 3.0], 1) == [3.0]


def test_resampled_profile_schedule_runs_at_other_step_counts():
    config = resolve_method("magcache", "hunyuanvideo-t2v-720p")
    for steps in (10, 30, 75):
        computed, total = simulate(config, steps).counts()
        assert total == steps and 0 < computed < steps


def test_resample_none_refuses_other_step_counts():
    config = resolve_method("magcache", "hunyuanvideo-t2v-720p", resample="none")
    with pytest.raises(ProfileError, match="50 steps per branch but the run has 30"):
        simulate(config, 30)


def test_magcache_threshold_zero_never_reuses_even_with_flat_ratios():
    # Open-Sora's table has exact 1.0 ratios and compares with <=: an error of 0 would pass a 0 threshold.
    config = resolve_method("magcache", "opensora-1.2", thresh=0.0)
    assert simulate(config, 30).counts() == (30, 30)


def test_magcache_k_limits_consecutive_reuse():
    policy = MagCachePolicy([1.0] * 20, thresh=1.0, K=2, retention_ratio=0.0)
    pattern = "".join("C" if policy.decide(s, 20, have_cache=s > 0).compute else "." for s in range(20))
    assert pattern == "C..C..C..C..C..C..C."


def test_magcache_without_cache_computes_instead_of_crashing():
    policy = MagCachePolicy([1.0] * 4, thresh=1.0, K=3, retention_ratio=0.0)
    assert policy.decide(0, 4, have_cache=False).compute


def test_polynomial_is_numpy_poly1d_order():
    assert Polynomial([2.0, -3.0, 1.0])(2.0) == 2 * 4 - 3 * 2 + 1


def test_teacache_forced_passes_and_accumulator():
    policy = TeaCachePolicy([1.0, 0.0], thresh=0.25, warmup_steps=1, force_last=True)  # P(d) = d
    decisions = [policy.decide(s, 6, d, have_cache=True) for s, d in enumerate([None, 0.1, 0.1, 0.1, 0.1, 0.01])]
    assert [d.compute for d in decisions] == [True, False, False, True, False, True]
    assert decisions[2].accumulator == pytest.approx(0.2)
    assert decisions[3].reason == "threshold" and decisions[5].reason == "forced-last"


def test_teacache_unclamped_by_default_and_clamp_is_an_option():
    # Wan T2V-14B's polynomial is -13 at 0: the reference lets that drive the accumulator negative.
    coefficients = load_profile("wan2.1-t2v-14b").method("teacache")["variants"]["default"]["coefficients"]
    reference = TeaCachePolicy(coefficients, thresh=0.2)
    clamped = TeaCachePolicy(coefficients, thresh=0.2, clamp_polynomial=True)
    assert reference.rescale(0.0) == pytest.approx(-13.02252404)
    assert clamped.rescale(0.0) == 0.0
    reuse_ref = [not reference.decide(s, 10, 0.001, True).compute for s in range(1, 9)]
    reuse_clamped = [not clamped.decide(s, 10, 0.001, True).compute for s in range(1, 9)]
    assert all(reuse_ref) and all(reuse_clamped)
    assert reference.accumulated < 0 <= clamped.accumulated


def test_teacache_threshold_zero_never_reuses_even_with_negative_polynomial():
    policy = TeaCachePolicy([-1.0], thresh=0.0)
    assert all(policy.decide(s, 5, 0.1, True).compute for s in range(5))


def test_easycache_rule():
    policy = EasyCachePolicy(thresh=0.1, warmup_steps=2, force_last=True)
    assert policy.decide(0, 6, None, True).reason == "warmup"
    assert policy.decide(1, 6, None, True).reason == "warmup"
    policy.observe_rate(2.0)
    assert not policy.decide(2, 6, 0.02, True).compute  # 0.04
    assert not policy.decide(3, 6, 0.02, True).compute  # 0.08
    decision = policy.decide(4, 6, 0.02, True)  # 0.12 >= 0.1
    assert decision.compute and decision.accumulator == pytest.approx(0.12)
    assert policy.decide(5, 6, 0.0, True).reason == "forced-last"


@pytest.mark.parametrize("method,params,match", [
    ("magcache", {"thresh": -0.1}, r"thresh=-0.1 is outside the allowed range \[0, inf\]"),
    ("magcache", {"K": 0}, r"K=0 is outside the allowed range \[1, inf\]"),
    ("magcache", {"retention_ratio": 1.0}, r"retention_ratio=1.0 is outside the allowed range \[0, 1\)"),
    ("magcache", {"retention_ratio": -0.5}, r"retention_ratio=-0.5 is outside"),
    ("magcache", {"resample": "cubic"}, "resample='cubic' is not one of nearest, compose, none"),
    ("teacache", {"thresh": -1}, "outside the allowed range"),
    ("teacache", {"variant": "fast"}, "known variants: default, use_ret_steps"),
    ("easycache", {"warmup_steps": -1}, "warmup_steps=-1 is outside"),
    ("easycache", {"K": 3}, "easycache does not take K"),
])
def test_bad_parameters_name_value_and_range(method, params, match):
    with pytest.raises(ParameterError, match=match):
        resolve_method(method, "wan2.1-t2v-1.3b", **params)


def test_unknown_method_profile_and_preset():
    with pytest.raises(ParameterError, match="unknown method 'fastcache'; known methods: teacache, magcache"):
        resolve_method("fastcache", "wan2.1-t2v-1.3b")
    with pytest.raises(ProfileError, match="unknown profile 'wan2.1-t2v-2b'.*Known profiles:.*calibrate"):
        resolve_method("magcache", "wan2.1-t2v-2b")
    with pytest.raises(ParameterError, match="unknown magcache preset 'turbo'.*E012K2R02, E012K4R02"):
        resolve_method("magcache", "wan2.1-t2v-1.3b", preset="turbo")
    with pytest.raises(ProfileError, match="has no teacache table"):
        resolve_method("teacache", "wan2.1-vace-1.3b")


def test_ratio_table_that_fits_no_layout_is_refused(tmp_path: Path):
    data = json.loads(load_profile("wan2.1-t2v-1.3b").path.read_text())
    data["magcache"]["ratios"] = data["magcache"]["ratios"][:-1]  # 99 entries for 2 interleaved branches
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=r"broken.json'?: magcache.ratios has 99 values; allowed: steps x branches "
                                           r"= 50 x 2 = 100"):
        resolve_method("magcache", str(path))


def test_presets_are_the_published_settings():
    config = resolve_method("magcache", "hunyuanvideo-t2v-720p", preset="E012K4R02")
    assert (config.params["thresh"], config.params["K"]) == (0.12, 4)
    assert simulate(config, 50).counts() == (22, 50)
