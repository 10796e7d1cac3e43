"""Invariants of every method on tiny random-weight diffusers Wan2.1 pipelines (T2V with CFG, and I2V)."""
import json

import pytest
import torch

import stepcache
from stepcache.api import UnsupportedModelError
from stepcache.methods import resolve_method
from stepcache.policies import ParameterError
from stepcache.profiles import ProfileError, choose_by_resolution, load_profile, match_profiles
from stepcache.runner import NothingCachedWarning
from stepcache.schedule import simulate
from helpers import BlockWork
from wan_tiny import build_i2v, build_t2v, run_i2v, run_t2v

PROFILE = "wan2.1-t2v-1.3b"
# Settings that make each method reuse passes on the tiny random model at 12 steps. Its random time embedding
# changes 50-90% per step (a trained one: 1-10%), so TeaCache needs a far larger budget than published ones.
REUSING = {"magcache": dict(thresh=0.24, K=4), "teacache": dict(thresh=800.0),
           "easycache": dict(thresh=0.3, warmup_steps=2)}
BUILD = {"t2v": (build_t2v, run_t2v), "i2v": (build_i2v, run_i2v)}


def profile_for(kind):
    return PROFILE if kind == "t2v" else "wan2.1-i2v-14b-480p"


@pytest.fixture(scope="module")
def baselines():
    """Unpatched outputs, each from a fresh pipeline."""
    out = {}
    for kind, (build, run) in BUILD.items():
        out[kind] = run(build())
        out[kind + "-prompt2-48"] = run(build(), height=48, width=32, prompt_seed=2)
    return out


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_threshold_zero_is_bit_identical(kind, method, baselines):
    build, run = BUILD[kind]
    pipe = build()
    stepcache.enable(pipe, method, profile=profile_for(kind), **{**REUSING[method], "thresh": 0.0})
    with pytest.warns(NothingCachedWarning, match="a threshold of 0 disables reuse"):
        out = run(pipe)
    assert torch.equal(out, baselines[kind])
    assert stepcache.stats(pipe).counts() == (24, 24)


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_reused_pass_runs_no_block_and_disable_restores(kind, method, baselines):
    build, run = BUILD[kind]
    pipe = build()
    transformer = pipe.transformer
    work = BlockWork(transformer)
    stepcache.enable(pipe, method, profile=profile_for(kind), **REUSING[method])
    cached = run(pipe)
    records = stepcache.stats(pipe).of()
    assert len(work.block) == len(records) == 24
    assert any(not r.computed for r in records), "precondition: the setting reuses passes on this model"
    for record, linear_calls in zip(records, work.block):
        assert linear_calls == (work.per_pass if record.computed else 0), record
    work.remove()
    assert not torch.equal(cached, baselines[kind])

    stepcache.disable(pipe)
    assert "forward" not in transformer.__dict__ and "cache_context" not in transformer.__dict__
    assert all("forward" not in block.__dict__ for block in transformer.blocks)
    assert not hasattr(transformer, "_stepcache")
    assert torch.equal(run(pipe), baselines[kind])


@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_state_resets_between_generations_and_sizes(method, baselines):
    """Two generations in a row (other prompt, other size) give what two fresh pipelines give."""
    pipe = build_t2v()
    stepcache.enable(pipe, method, profile=PROFILE, **REUSING[method])
    first = run_t2v(pipe)
    second = run_t2v(pipe, height=48, width=32, prompt_seed=2)
    again = run_t2v(pipe)
    for out, kwargs in ((first, {}), (second, dict(height=48, width=32, prompt_seed=2))):
        fresh = build_t2v()
        stepcache.enable(fresh, method, profile=PROFILE, **REUSING[method])
        assert torch.equal(out, run_t2v(fresh, **kwargs))
    assert torch.equal(first, again)
    assert stepcache.stats(pipe).generation_ids() == [1, 2, 3]


def test_state_is_per_instance():
    a, b = build_t2v(), build_t2v()
    stepcache.enable(a, "magcache", profile=PROFILE, **REUSING["magcache"])
    out_b = run_t2v(b)
    assert not hasattr(b.transformer, "_stepcache") and "forward" not in b.transformer.__dict__
    assert not torch.equal(run_t2v(a), out_b)


def test_magcache_run_follows_the_published_schedule_per_branch():
    """A real CFG run at 50 steps reproduces the table's 42/100 pattern: branches keyed by name, each with its
    own interleaved ratios, whatever order the pipeline calls them in."""
    pipe = build_t2v()
    stepcache.enable(pipe, "magcache", profile=PROFILE, thresh=0.12, K=4)
    run_t2v(pipe, steps=50)
    expected = simulate(resolve_method("magcache", PROFILE, thresh=0.12, K=4), 50)
    assert stepcache.stats(pipe).pattern() == expected.pattern()
    assert stepcache.stats(pipe).counts() == (42, 100)


def test_cond_and_uncond_keep_separate_residuals(tmp_path):
    """With flat ratios every pass after the first reuses. A reused pass with the same inputs as its branch's
    computed pass must return that branch's output, not the other branch's."""
    data = json.loads(load_profile(PROFILE).path.read_text())
    data["name"] = "flat"
    data["magcache"]["ratios"] = [1.0] * 8
    data["magcache"]["steps"] = 4
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(data))
    pipe = build_t2v()
    transformer = pipe.transformer
    stepcache.enable(transformer, "magcache", profile=str(flat), thresh=0.5, K=3, retention_ratio=0.0, num_steps=4)
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 2, 4, 4, generator=g)
    text = {"cond": torch.randn(1, 8, 32, generator=g), "uncond": torch.randn(1, 8, 32, generator=g)}
    t = torch.tensor([500.0])
    outputs = {}
    for step in range(2):
        for branch in ("cond", "uncond"):
            with transformer.cache_context(branch, step_index=step, num_inference_steps=4):
                outputs[branch, step] = transformer(latent, t, text[branch], return_dict=False)[0]
    assert stepcache.stats(transformer).pattern() == "CC.."
    for branch in ("cond", "uncond"):
        torch.testing.assert_close(outputs[branch, 1], outputs[branch, 0], rtol=0, atol=1e-5)
    assert (outputs["cond", 0] - outputs["uncond", 0]).abs().max() > 1e-2


def test_shape_change_mid_generation_starts_over():
    pipe = build_t2v()
    transformer = pipe.transformer
    stepcache.enable(transformer, "magcache", profile=PROFILE, thresh=10.0, K=5, retention_ratio=0.0, num_steps=6)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(1, 8, 32, generator=g)
    t = torch.tensor([500.0])
    for step, size in enumerate([4, 4, 4, 6]):
        latent = torch.randn(1, 16, 2, size, size, generator=g)
        with transformer.cache_context("cond", step_index=step, num_inference_steps=6):
            out = transformer(latent, t, text, return_dict=False)[0]
    records = stepcache.stats(transformer).records
    assert [(r.generation, r.computed) for r in records] == [(1, True), (1, False), (1, False), (2, True)]
    assert out.shape[-1] == 6


def test_easycache_uncond_follows_cond_decision():
    pipe = build_t2v()
    stepcache.enable(pipe, "easycache", profile=PROFILE, **REUSING["easycache"])
    run_t2v(pipe)
    stats = stepcache.stats(pipe)
    assert stats.pattern(branch="cond") == stats.pattern(branch="uncond")
    assert {r.reason for r in stats.of() if r.branch == "uncond" and r.step >= 2} <= {"follow"}


def test_guidance_off_runs_one_branch():
    pipe = build_t2v()
    stepcache.enable(pipe, "magcache", profile=PROFILE)
    run_t2v(pipe, steps=50, guidance=1.0)
    stats = stepcache.stats(pipe)
    assert stats.branches() == ["cond"] and stats.counts()[1] == 50
    one_branch = simulate(resolve_method("magcache", PROFILE), 50, branches=["cond"])
    assert stats.pattern() == one_branch.pattern()


def test_bad_targets_and_values_fail_before_touching_the_model():
    pipe = build_t2v()

    class FluxPipeline:
        transformer = pipe.transformer

    with pytest.raises(UnsupportedModelError, match="unsupported pipeline class FluxPipeline"):
        stepcache.enable(FluxPipeline(), "magcache", profile=PROFILE)
    with pytest.raises(UnsupportedModelError, match="no adapter for Linear"):
        stepcache.enable(torch.nn.Linear(2, 2), "magcache", profile=PROFILE)
    with pytest.raises(ProfileError, match="no shipped profile matches this WanTransformer3DModel.*calibrate"):
        stepcache.enable(pipe, "magcache")
    with pytest.raises(ProfileError, match="is for 'hunyuanvideo' models, not 'wan2.1'"):
        stepcache.enable(pipe, "magcache", profile="hunyuanvideo-t2v-720p")
    with pytest.raises(ParameterError, match="K=0 is outside the allowed range"):
        stepcache.enable(pipe, "magcache", profile=PROFILE, K=0)
    with pytest.raises(ParameterError, match="unknown method"):
        stepcache.enable(pipe, "deepcache", profile=PROFILE)
    assert "forward" not in pipe.transformer.__dict__


def test_profile_detection_from_config():
    t2v = match_profiles("wan2.1", {"num_layers": 30, "num_attention_heads": 12, "in_channels": 16},
                         "WanTransformer3DModel")
    assert [p.name for p in t2v] == ["wan2.1-t2v-1.3b"]
    i2v = match_profiles("wan2.1", {"num_layers": 40, "num_attention_heads": 40, "in_channels": 36},
                         "WanTransformer3DModel")
    assert sorted(p.name for p in i2v) == ["wan2.1-i2v-14b-480p", "wan2.1-i2v-14b-720p"]
    assert choose_by_resolution(i2v, 720, 1280) == (load_profile("wan2.1-i2v-14b-720p"), None)
    assert choose_by_resolution(i2v, 832, 480)[0].name == "wan2.1-i2v-14b-480p"  # portrait 480P
    profile, warning = choose_by_resolution(i2v, 576, 1024)
    assert profile.name == "wan2.1-i2v-14b-480p" and "no shipped profile was calibrated at 576x1024" in warning


def test_resampled_table_is_noted_in_the_stats():
    pipe = build_t2v()
    stepcache.enable(pipe, "magcache", profile=PROFILE)
    run_t2v(pipe, steps=12)
    stats = stepcache.stats(pipe)
    assert "measured at 50 steps; resampled to 12 (compose)" in stats.summary()  # the default
    assert stats.to_dict()["notes"][0] == ("the MagCache table of wan2.1-t2v-1.3b was measured at 50 steps; "
                                           "resampled to 12 (compose)")
    assert "merges 4.2 measured ones" in stats.to_dict()["notes"][1]   # a table stretched over a quarter of it
    stepcache.enable(pipe, "magcache", profile=PROFILE, resample="nearest")  # the reference's, by name
    run_t2v(pipe, steps=12)
    assert stepcache.stats(pipe).to_dict()["notes"][0].endswith("resampled to 12 (nearest)")
