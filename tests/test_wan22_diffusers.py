"""Wan2.2 on diffusers: both experts of A14B (``transformer`` then ``transformer_2``) and TI2V-5B, with the
published shared-state rule and stepcache's expert-aware one, on tiny random-weight pipelines."""
import json
import warnings

import pytest
import torch

import stepcache
from stepcache.methods import EXPERT_MARK
from stepcache.policies import ParameterError
from stepcache.profiles import ProfileError, ProfileFitWarning, load_profile
from stepcache.runner import NothingCachedWarning
from helpers import BlockWork
from wan22_tiny import BUILD, PROFILES, build_a14b, build_ti2v, run

pytestmark = pytest.mark.filterwarnings(f"ignore::{ProfileFitWarning.__module__}.{ProfileFitWarning.__name__}")

# Settings that reuse passes on the tiny random experts at 12 steps (their ratios are not the published table's).
REUSING = {"magcache": dict(thresh=0.3, K=4, retention_ratio=0.2), "teacache": dict(thresh=800.0),
           "easycache": dict(thresh=0.5, warmup_steps=2)}
A14B = ("t2v-a14b", "i2v-a14b")


def with_teacache(tmp_path, kind):
    """The Wan2.2 profile with Wan2.1-14B's TeaCache polynomial (none is published for Wan2.2)."""
    data = json.loads(load_profile(PROFILES[kind]).path.read_text())
    data["name"] = f"{data['name']}-test-teacache"
    data["teacache"] = load_profile("wan2.1-t2v-14b").method("teacache")
    path = tmp_path / f"{data['name']}.json"
    path.write_text(json.dumps(data))
    return str(path)


def profile_of(kind, method, tmp_path):
    return with_teacache(tmp_path, kind) if method == "teacache" else PROFILES[kind]


@pytest.fixture(scope="module")
def baselines():
    return {kind: run(build()) for kind, build in BUILD.items()}


def switch_of(pipe, steps=12):
    pipe.scheduler.set_timesteps(steps)
    return int((pipe.scheduler.timesteps >= pipe.config.boundary_ratio * 1000).sum())


# EasyCache4Wan2.2 runs I2V-A14B uncached, so that profile has no easycache table.
WITH_TABLE = [(kind, method) for kind in A14B for method in ("teacache", "magcache", "easycache")
              if load_profile(PROFILES[kind]).has(method) or method == "teacache"]


@pytest.mark.parametrize("experts", ["shared", "separate"])
@pytest.mark.parametrize("kind,method", WITH_TABLE)
def test_threshold_zero_is_bit_identical_on_both_experts(kind, method, experts, baselines, tmp_path):
    pipe = BUILD[kind]()
    stepcache.enable(pipe, method, profile=profile_of(kind, method, tmp_path), experts=experts,
                     **{**REUSING[method], "thresh": 0.0})
    with pytest.warns(NothingCachedWarning, match="a threshold of 0 disables reuse"):
        out = run(pipe)
    assert torch.equal(out, baselines[kind])
    experts_seen = stepcache.stats(pipe).experts()
    assert list(experts_seen) == ["high", "low"] and experts_seen["low"]["first_step"] == switch_of(pipe)


@pytest.mark.parametrize("kind", ["ti2v", "ti2v-i2v"])
@pytest.mark.parametrize("method", ["magcache", "easycache"])
def test_threshold_zero_is_bit_identical_on_ti2v(kind, method, baselines):
    pipe = BUILD[kind]()
    stepcache.enable(pipe, method, profile=PROFILES[kind], **{**REUSING[method], "thresh": 0.0})
    with pytest.warns(NothingCachedWarning):
        assert torch.equal(run(pipe), baselines[kind])
    assert stepcache.stats(pipe).experts() == {}  # one model: no expert in the stats


@pytest.mark.parametrize("experts", ["shared", "separate"])
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_a_reused_pass_runs_no_block_of_either_expert_and_disable_restores_both(method, experts, baselines,
                                                                                 tmp_path):
    kind = "t2v-a14b"
    pipe = BUILD[kind]()
    works = [BlockWork(pipe.transformer), BlockWork(pipe.transformer_2)]
    stepcache.enable(pipe, method, profile=profile_of(kind, method, tmp_path), experts=experts, **REUSING[method])
    cached = run(pipe)
    records = stepcache.stats(pipe).of()
    per_call = works[0].block + works[1].block  # the high expert's passes come first
    assert len(per_call) == len(records) == 24
    for expert in ("high", "low"):
        assert any(not r.computed for r in records if r.expert == expert), f"precondition: {expert} reuses"
    for record, linear_calls in zip(records, per_call):
        assert linear_calls == (works[0].per_pass if record.computed else 0), record
    assert not torch.equal(cached, baselines[kind])
    for work in works:
        work.remove()
    stepcache.disable(pipe)
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert "forward" not in transformer.__dict__ and "cache_context" not in transformer.__dict__
        assert all("forward" not in block.__dict__ for block in transformer.blocks)
        assert not hasattr(transformer, "_stepcache")
    assert torch.equal(run(pipe), baselines[kind])


def test_separate_state_never_crosses_the_switch_and_the_first_expert_is_released():
    pipe = build_a14b("t2v")
    cached = stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], experts="separate",
                              **{**REUSING["magcache"], "retention_ratio": 0.5})
    switch = switch_of(pipe)
    seen = []
    original = cached.runner.begin_pass

    def spy(branch, step, *args, **kwargs):
        ctx = original(branch, step, *args, **kwargs)
        seen.append((step, ctx.branch, sorted(cached.runner.branches)))
        return ctx

    cached.runner.begin_pass = spy
    run(pipe)
    for step, key, keys in seen:
        expert = "high" if step < switch else "low"
        assert key.endswith(EXPERT_MARK + expert)
        assert all(k.endswith(EXPERT_MARK + expert) for k in keys), (step, keys)  # the other expert's: gone
    # Each expert warms up on its own passes: half of the low expert's 2 x 4 passes, after the switch too.
    records = stepcache.stats(pipe).of()
    assert [r.reason for r in records if r.expert == "low"][:5] == ["warmup"] * 4 + ["reuse"]
    assert [r.reason for r in records if r.expert == "high"][:9] == ["warmup"] * 8 + ["reuse"]


def test_shared_state_carries_over_the_switch_as_published():
    """The reference keeps one state: the low expert's first passes see the high expert's accumulators (here
    with the start-only retention, so nothing forces them to compute)."""
    pipe = build_a14b("t2v")
    cached = stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], retention_rule="start",
                              thresh=10.0, K=100, retention_ratio=0.1)
    keys = []
    original = cached.runner.begin_pass
    cached.runner.begin_pass = lambda *a, **k: keys.append(original(*a, **k).branch) or cached.runner.current
    run(pipe)
    assert set(keys) == {"cond", "uncond"}
    records = stepcache.stats(pipe).of()
    first_low = next(r for r in records if r.expert == "low")
    assert not first_low.computed  # reused the high expert's residual at the switch


def test_stats_show_the_switch():
    pipe = build_a14b("t2v")
    stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], **REUSING["magcache"])
    run(pipe)
    stats = stepcache.stats(pipe)
    switch = switch_of(pipe)
    summary = stats.summary()
    assert f"pattern {stats.pattern()[:2 * switch]}|{stats.pattern()[2 * switch:]}" in summary
    assert f"expert low (from step {switch})" in summary
    assert stats.to_dict()["experts"]["low"]["first_step"] == switch


@pytest.mark.parametrize("experts", ["shared", "separate"])
def test_a_generation_cut_off_in_the_low_expert_does_not_leak_into_the_next(experts, baselines):
    pipe = build_a14b("t2v")
    stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], experts=experts, **REUSING["magcache"])
    fresh = build_a14b("t2v")
    stepcache.enable(fresh, "magcache", profile=PROFILES["t2v-a14b"], experts=experts, **REUSING["magcache"])
    expected = run(fresh)
    calls = {"n": 0}

    def stop(pipeline, step, t, callback_kwargs):
        calls["n"] += 1
        if step == 9:  # in the low expert (the switch is at 8)
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        run(pipe, callback_on_step_end=stop)
    assert torch.equal(run(pipe), expected)


def test_state_is_per_instance_and_other_sizes_start_afresh(baselines):
    pipe = build_a14b("t2v")
    stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], experts="separate", **REUSING["magcache"])
    first = run(pipe)
    other = run(pipe, height=48)
    again = run(pipe)
    assert torch.equal(first, again) and other.shape != first.shape
    untouched = build_a14b("t2v")
    assert torch.equal(run(untouched), baselines["t2v-a14b"])


def test_profiles_are_chosen_from_the_pipeline():
    """A14B's experts have Wan2.1-14B's config, so the pipeline (boundary_ratio, in_channels) names the profile."""
    big = dict(num_layers=40, num_attention_heads=40, attention_head_dim=2, ffn_dim=8)
    for kind, name in (("t2v", "wan2.2-t2v-a14b"), ("i2v", "wan2.2-i2v-a14b")):
        pipe = build_a14b(kind, **big)
        assert stepcache.enable(pipe, "magcache").config.profile.name == name
    ti2v = dict(num_layers=30, num_attention_heads=24, attention_head_dim=2, ffn_dim=8)
    for image, name in ((False, "wan2.2-ti2v-5b"), (True, "wan2.2-ti2v-5b-i2v")):
        assert stepcache.enable(build_ti2v(image, **ti2v), "easycache").config.profile.name == name
    with pytest.raises(ProfileError, match="no shipped profile matches"):
        stepcache.enable(build_a14b("t2v"), "magcache")  # a tiny config matches no published model


def test_bad_expert_settings_are_refused_before_anything_is_installed():
    pipe = build_a14b("t2v")
    with pytest.raises(ParameterError, match="experts='both' is not one of shared, separate"):
        stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], experts="both")
    with pytest.raises(ParameterError, match="applies to two-expert models .* and this is one model"):
        stepcache.enable(pipe.transformer, "magcache", profile="wan2.1-t2v-14b", experts="separate", num_steps=12)
    with pytest.raises(ParameterError, match="retention_rule='zones' is the shared-state rule"):
        stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], experts="separate", retention_rule="zones")
    with pytest.raises(ParameterError, match="experts='shared' applies to two-expert models"):
        stepcache.enable(build_a14b("t2v").transformer, "magcache", profile="wan2.1-t2v-14b", experts="shared",
                         num_steps=12)
    with pytest.raises(ProfileError, match="is for 'wan2.1' models, not 'wan2.2'"):
        stepcache.enable(pipe, "magcache", profile="wan2.1-t2v-14b")
    for transformer in (pipe.transformer, pipe.transformer_2):
        assert "forward" not in transformer.__dict__ and not hasattr(transformer, "_stepcache")


def test_the_published_rule_at_the_published_steps_is_the_schedule():
    """40 steps at Wan2.2 T2V's shift 12: the run switches where the profile says, and MagCache's pattern is the
    one `stepcache schedule` prints for the README command (52/80)."""
    from stepcache.methods import resolve_method
    from stepcache.schedule import simulate
    pipe = build_a14b("t2v", shift=12.0)
    stepcache.enable(pipe, "magcache", profile=PROFILES["t2v-a14b"], thresh=0.06, K=2, retention_ratio=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingCachedWarning)
        run(pipe, steps=40, height=16, width=16, frames=1)
    expected = simulate(resolve_method("magcache", PROFILES["t2v-a14b"], thresh=0.06, K=2, retention_ratio=0.4), 40)
    assert stepcache.stats(pipe).pattern(mark_switch=True) == expected.pattern(mark_switch=True)
    assert stepcache.stats(pipe).counts() == (52, 80)


def test_generate_runs_a_two_expert_folder(tmp_path):
    """`stepcache generate` on a saved Wan2.2 A14B folder: both experts cached and timed, --experts honoured; the
    profile is named (a tiny config matches no shipped one, which the automatic choice says)."""
    import subprocess
    import sys

    from wan22_tiny import save_a14b_folder
    folder = save_a14b_folder(tmp_path / "tiny-a14b")
    common = ["--model", str(folder), "--prompt", "a red ball moves left", "--height", "32", "--width", "32",
              "--frames", "5", "--steps", "12", "--dtype", "fp32", "--device", "cpu", "--fps", "4"]

    def generate(*extra):
        return subprocess.run([sys.executable, "-m", "stepcache.cli", "generate", *common, *extra],
                              capture_output=True, text=True, timeout=300)

    result = generate("--method", "magcache", "--profile", "wan2.2-t2v-a14b", "--experts", "separate", "--thresh",
                      "0.3", "--K", "4", "--out", str(tmp_path / "out" / "ball.mp4"))
    assert result.returncode == 0, result.stderr
    stats = json.loads((tmp_path / "out" / "ball.stats.json").read_text())
    assert stats["params"]["experts"] == "separate" and stats["profile"] == "wan2.2-t2v-a14b"
    assert list(stats["experts"]) == ["high", "low"] and stats["total_passes"] == 24
    assert "|" in result.stdout  # the printed pattern marks the switch
    missing = generate("--method", "magcache", "--out", str(tmp_path / "auto" / "ball.mp4"))
    assert missing.returncode == 2 and "no shipped profile matches" in missing.stderr
    assert not (tmp_path / "auto").exists()


def test_calibrate_measures_both_experts_and_teacache_then_runs_on_the_file(tmp_path):
    """No TeaCache coefficients are published for Wan2.2: `stepcache calibrate` on a saved two-expert folder
    measures both experts (every pass of both is in its tables) and the file runs TeaCache with either rule."""
    import subprocess
    import sys

    from wan22_tiny import save_a14b_folder
    folder = save_a14b_folder(tmp_path / "tiny-a14b")
    size = ["--height", "32", "--width", "32", "--frames", "5", "--steps", "12", "--dtype", "fp32", "--device", "cpu"]
    profile = tmp_path / "mine.json"
    result = subprocess.run([sys.executable, "-m", "stepcache.cli", "calibrate", "--model", str(folder), "--prompt",
                             "a red ball", "--seeds", "0", "1", *size, "--out", str(profile)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(profile.read_text())
    assert data["model"]["family"] == "wan2.2" and {"teacache", "magcache", "easycache"} <= set(data)
    assert data["magcache"]["steps"] == 12 and len(data["magcache"]["ratios"]) == 24  # 12 steps x cond, uncond
    # One table per expert: MagCache's entry across the switch named as the jump, TeaCache fitted per expert on
    # that expert's own pairs (the pair across the switch left out).
    switch = switch_of(build_a14b("t2v"))
    assert data["magcache"]["experts"]["steps"] == {"high": [0, switch], "low": [switch, 12]}
    jump = data["magcache"]["experts"]["switch_jump"]
    assert jump == {"cond": data["magcache"]["ratios"][2 * switch], "uncond": data["magcache"]["ratios"][2 * switch + 1]}
    fits = data["teacache"]["variants"]["default"]["experts"]
    # pairs from the second pass of each expert on, per branch and seed: (switch - 1) and (12 - switch - 1)
    assert {e: f["pairs"] for e, f in fits.items()} == {"high": 4 * (switch - 1), "low": 4 * (12 - switch - 1)}
    assert fits["high"]["coefficients"] != fits["low"]["coefficients"]
    assert "low expert alone" in result.stdout and "read by experts='shared' only" in result.stdout
    for experts in ("shared", "separate"):
        pipe = build_a14b("t2v")
        stepcache.enable(pipe, "teacache", profile=str(profile), experts=experts, thresh=1.0)
        run(pipe)
        stats = stepcache.stats(pipe)
        assert list(stats.experts()) == ["high", "low"] and stats.counts()[1] == 24


def _teacache_with_expert_fits(tmp_path, low):
    """wan2.2-t2v-a14b with a TeaCache polynomial of 0 for both rules, and per-expert fits: 0 for the high expert,
    ``low`` (constant) for the low one."""
    data = json.loads(load_profile(PROFILES["t2v-a14b"]).path.read_text())
    data["name"] = "t2v-a14b-expert-fits"
    variant = {"signal": "timestep_proj", "coefficients": [0.0, 0.0, 0.0, 0.0, 0.0], "warmup_steps": 1,
               "force_last": True, "experts": {"high": {"coefficients": [0.0] * 5},
                                               "low": {"coefficients": [0.0] * 4 + [low]}}}
    data["teacache"] = {"variants": {"default": variant}, "defaults": {"thresh": 0.5},
                        "source": "test: per-expert fits"}
    path = tmp_path / "expert-fits.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_separate_rule_reads_each_experts_own_teacache_fit(tmp_path):
    """A calibrated two-expert profile carries one TeaCache fit per expert: the separate rule decides each expert
    with its own (here the low expert's is large, so it computes every pass), the shared rule with the joint one."""
    profile = _teacache_with_expert_fits(tmp_path, low=10.0)
    pipe = build_a14b("t2v")
    switch = switch_of(pipe)
    patterns = {}
    for experts in ("shared", "separate"):
        stepcache.enable(pipe, "teacache", profile=profile, experts=experts)
        run(pipe)
        stats = stepcache.stats(pipe)
        patterns[experts] = [c == "C" for c in stats.pattern(branch="cond")]
        stepcache.disable(pipe)
    low_steps = range(switch + 1, 11)  # after the low expert's warm-up step, before the forced last step
    assert not any(patterns["shared"][s] for s in low_steps)  # a polynomial of 0 reuses everything
    assert all(patterns["separate"][s] for s in low_steps)  # the low expert's own fit forbids reuse
    # the high expert's own fit reuses (its own run ends at the switch, with a forced last step)
    assert not any(patterns["separate"][s] for s in range(1, switch - 1))


def test_the_separate_magcache_rule_never_reads_the_ratio_across_the_switch(tmp_path):
    """The entry at the switch compares two experts' residuals: the shared rule accumulates it, each expert's own
    run does not (its first ratio is its start)."""
    pipe = build_a14b("t2v")
    switch = switch_of(pipe)
    data = json.loads(load_profile(PROFILES["t2v-a14b"]).path.read_text())
    base = load_profile(PROFILES["t2v-a14b"]).magcache_ratios(12, 0, "compose")
    patterns = {}
    for jump in (1.0, 9.0):
        changed = dict(data, name=f"jump-{jump}")
        ratios = [r for step in range(12) for r in (base[step], base[step])]
        ratios[2 * switch] = ratios[2 * switch + 1] = jump
        changed["magcache"] = dict(data["magcache"], ratios=ratios, steps=12)
        path = tmp_path / f"jump-{jump}.json"
        path.write_text(json.dumps(changed))
        for experts in ("shared", "separate"):
            params = dict(thresh=0.3, K=4, retention_ratio=0.0)
            if experts == "shared":
                params["retention_rule"] = "start"
            stepcache.enable(pipe, "magcache", profile=str(path), experts=experts, **params)
            run(pipe)
            patterns[experts, jump] = stepcache.stats(pipe).pattern()
            stepcache.disable(pipe)
    assert patterns["separate", 1.0] == patterns["separate", 9.0]
    assert patterns["shared", 1.0] != patterns["shared", 9.0]
