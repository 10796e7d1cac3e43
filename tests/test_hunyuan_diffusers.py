"""stepcache on diffusers' HunyuanVideo (tiny random-weight pipelines, offline): exactness, real skipping, state,
CFG branches, the published MagCache schedule, the TeaCache signal, profiles and loading."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import hunyuan_tiny as T
from helpers import BlockWork
import stepcache
from stepcache.hunyuan.diffusers_adapter import HunyuanVideoDiffusersAdapter, load_pipeline
from stepcache.hunyuan.resolution import ResolutionWarning
from stepcache.profiles import ProfileError, load_profile
from stepcache.runner import NothingCachedWarning

METHODS = ("teacache", "magcache", "easycache")
PROFILE = "hunyuanvideo-t2v-720p"
SIGNAL_LINEAR = "transformer_blocks.0.norm1.linear"  # TeaCache evaluates block 0's modulation on every pass
# Thresholds that make the tiny random model reuse passes (its activations change far more than a real
# model's, so the published thresholds would compute everything).
REUSING = {"teacache": dict(thresh=5.0), "magcache": dict(), "easycache": dict(thresh=0.5)}
# Replayed from MagCache4HunyuanVideo's rule and tables.
PUBLISHED_720P_E024K6 = "CCCCCCCCCC....C...C....C.....C....C......C....C.CC"
PUBLISHED_720P_E012K4 = "CCCCCCCCCC..C..C..C...C..C...C...C....C....C..C.CC"
PUBLISHED_544P_E024K6 = "CCCCCCCCCC....C...C....C.....C....C......C....C.C."
MODES = {"distilled": 1.0, "true_cfg": 4.0}


@pytest.fixture(scope="module")
def pipe():
    return T.build_pipeline()


@pytest.fixture(autouse=True)
def _uncached_after(pipe):
    yield
    stepcache.disable(pipe)


@pytest.fixture(scope="module")
def baselines(pipe):
    return {mode: T.run(pipe, steps=10, true_cfg=cfg) for mode, cfg in MODES.items()}


def _quiet_run(pipe, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NothingCachedWarning)
        return T.run(pipe, **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_is_bit_identical(pipe, baselines, method, mode):
    stepcache.enable(pipe, method, profile=PROFILE, thresh=0)
    out = _quiet_run(pipe, steps=10, true_cfg=MODES[mode])
    assert torch.equal(out, baselines[mode])
    stats = stepcache.stats(pipe)
    assert stats.counts() == (10 * len(stats.branches()), 10 * len(stats.branches()))
    assert stats.branches() == (["cond", "uncond"] if mode == "true_cfg" else ["cond"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_reused_passes_run_no_block(pipe, method, mode):
    stepcache.enable(pipe, method, profile=PROFILE, **REUSING[method])
    work = BlockWork(pipe.transformer, T.DIFFUSERS_STACKS, exclude=(SIGNAL_LINEAR,))
    try:
        T.run(pipe, steps=20, true_cfg=MODES[mode])
    finally:
        work.remove()
    records = stepcache.stats(pipe).of()
    assert len(records) == len(work.block) == 20 * (2 if mode == "true_cfg" else 1)
    computed = [r.computed for r in records]
    assert any(computed) and not all(computed), stepcache.stats(pipe).pattern()
    full = max(work.block)
    for record, block, total in zip(records, work.block, work.total):
        assert block == (full if record.computed else 0), (record, block)
        if method == "easycache" and not record.computed:
            assert total == 0  # EasyCache skips the whole model, not only the blocks


def test_state_is_reset_between_generations(pipe):
    """A generation after another one (different prompt, an interrupted one, a different size) equals the same
    generation right after enabling: no residual, signal or accumulator leaks across."""
    kw = dict(steps=16, **REUSING["teacache"])

    def fresh(**run_kw):
        stepcache.enable(pipe, "teacache", profile=PROFILE, thresh=kw["thresh"])
        out = T.run(pipe, steps=kw["steps"], **run_kw)
        pattern = stepcache.stats(pipe).pattern()
        stepcache.disable(pipe)
        return out, pattern

    expected_b, pattern_b = fresh(prompt_seed=2)
    expected_big, pattern_big = fresh(prompt_seed=2, height=48, width=48)
    assert "." in pattern_b and "." in pattern_big

    stepcache.enable(pipe, "teacache", profile=PROFILE, thresh=kw["thresh"])
    T.run(pipe, steps=kw["steps"], prompt_seed=1)
    out = T.run(pipe, steps=kw["steps"], prompt_seed=2)
    assert torch.equal(out, expected_b) and stepcache.stats(pipe).pattern() == pattern_b

    def interrupt(p, i, t, tensors):
        if i == 5:
            p._interrupt = True
        return {}
    pipe(height=32, width=32, num_frames=9, num_inference_steps=kw["steps"], guidance_scale=6.0,
         generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=interrupt,
         **T.embeds(pipe, seed=1))
    out = T.run(pipe, steps=kw["steps"], prompt_seed=2)
    assert torch.equal(out, expected_b) and stepcache.stats(pipe).pattern() == pattern_b

    out = T.run(pipe, steps=kw["steps"], prompt_seed=2, height=48, width=48)  # shape change
    assert torch.equal(out, expected_big) and stepcache.stats(pipe).pattern() == pattern_big
    assert len(stepcache.stats(pipe).generation_ids()) == 5


def test_true_cfg_branches_are_kept_apart(pipe):
    """Observed from outside the cache: on every reused pass the final layer's input is the block input plus the
    residual this branch's own last computed pass produced, never the other branch's."""
    tr = pipe.transformer
    seen = []
    h0 = {}
    hooks = [tr.x_embedder.register_forward_hook(lambda m, a, out: h0.__setitem__("h", out)),
             tr.norm_out.register_forward_pre_hook(lambda m, args: seen.append((h0["h"], args[0])))]
    stepcache.enable(pipe, "magcache", profile=PROFILE)
    try:
        T.run(pipe, steps=50, true_cfg=4.0)
    finally:
        for h in hooks:
            h.remove()
    stats = stepcache.stats(pipe)
    assert stats.counts(branch="cond") == stats.counts(branch="uncond") == (19, 50)
    residual = {}
    reused = 0
    for record, (h, final_in) in zip(stats.of(), seen):
        other = "uncond" if record.branch == "cond" else "cond"
        if record.computed:
            residual[record.branch] = final_in - h
        else:
            reused += 1
            assert torch.equal(final_in, h + residual[record.branch])
            assert not torch.allclose(final_in, h + residual[other])
    assert reused == 2 * 31


@pytest.mark.parametrize("profile,params,expected", [
    ("hunyuanvideo-t2v-720p", {}, PUBLISHED_720P_E024K6),
    ("hunyuanvideo-t2v-720p", {"thresh": 0.24, "K": 6, "retention_ratio": 0.2}, PUBLISHED_720P_E024K6),
    ("hunyuanvideo-t2v-720p", {"preset": "E012K4R02"}, PUBLISHED_720P_E012K4),
    ("hunyuanvideo-t2v-544p", {"preset": "E024K6R02"}, PUBLISHED_544P_E024K6),
])
def test_magcache_schedule_is_the_published_one(pipe, profile, params, expected):
    stepcache.enable(pipe, "magcache", profile=profile, **params)
    work = BlockWork(pipe.transformer, T.DIFFUSERS_STACKS)
    try:
        T.run(pipe, steps=50)
    finally:
        work.remove()
    assert stepcache.stats(pipe).pattern() == expected
    assert work.ran() == expected
    if expected == PUBLISHED_720P_E024K6:
        assert expected.count("C") == 19


def _reference_signal(block, hidden, temb):
    """The reference's TeaCache input (TC-HY:82-97), written out from diffusers' weights: LayerNorm without
    affine, times 1 + scale1, plus shift1, with (shift1, scale1) the first two chunks of the modulation."""
    shift, scale = F.linear(F.silu(temb), block.norm1.linear.weight, block.norm1.linear.bias).chunk(6, dim=1)[:2]
    return F.layer_norm(hidden, hidden.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def test_teacache_signal_is_block0_modulated_input(pipe):
    tr = pipe.transformer
    first = tr.transformer_blocks[0]
    inputs = []
    hook = first.register_forward_pre_hook(lambda m, args: inputs.append((args[0], args[2])))
    stepcache.enable(pipe, "teacache", profile=PROFILE, **REUSING["teacache"])
    try:
        T.run(pipe, steps=12)
    finally:
        hook.remove()
    records = stepcache.stats(pipe).of()
    assert len(inputs) == len(records) == 12
    previous = None
    for record, (hidden, temb) in zip(records, inputs):
        with torch.no_grad():
            m = _reference_signal(first, hidden, temb)
        if previous is None:
            assert record.signal is None
        else:
            expected = float((m - previous).abs().mean() / previous.abs().mean())
            assert record.signal == pytest.approx(expected, rel=1e-5)
        previous = m


def test_output_head_reads_image_tokens_only(pipe):
    """Why passing text tokens through unchanged on a reused pass is harmless: after the block stacks, nothing
    reads them (norm_out and proj_out take the image tokens alone)."""
    tr = pipe.transformer
    base = T.run(pipe, steps=4)
    hook = tr.single_transformer_blocks[-1].register_forward_hook(
        lambda m, a, out: (out[0], torch.full_like(out[1], 1e4)))
    try:
        assert torch.equal(T.run(pipe, steps=4), base)
    finally:
        hook.remove()


@pytest.mark.parametrize("return_dict", [True, False])
def test_easycache_reused_output_honours_return_dict(pipe, return_dict):
    tr = pipe.transformer
    stepcache.enable(tr, "easycache", profile=PROFILE, num_steps=6, thresh=10.0, warmup_steps=2)
    g = torch.Generator().manual_seed(0)
    e = T.embeds(pipe)
    x = torch.randn(1, 4, 3, 4, 4, generator=g)
    outs = []
    with torch.no_grad():
        for step in range(6):
            outs.append(tr(hidden_states=x + 0.01 * step, timestep=torch.tensor([900.0 - 100 * step]),
                           encoder_hidden_states=e["prompt_embeds"], encoder_attention_mask=e["prompt_attention_mask"],
                           pooled_projections=e["pooled_prompt_embeds"], guidance=torch.tensor([6000.0]),
                           return_dict=return_dict))
    assert "." in stepcache.stats(tr).pattern()
    for out in outs:
        assert isinstance(out, tuple) != return_dict
        latent = out.sample if return_dict else out[0]
        assert latent.shape == x.shape


def test_disable_restores_the_original_forward(pipe, baselines):
    stepcache.enable(pipe, "teacache", profile=PROFILE)
    stepcache.disable(pipe)
    tr = pipe.transformer
    for module in (tr, *tr.transformer_blocks, *tr.single_transformer_blocks):
        assert "forward" not in module.__dict__
    assert "cache_context" not in tr.__dict__
    assert torch.equal(T.run(pipe, steps=10), baselines["distilled"])


def _config_stub(**config):
    full = dict(num_layers=20, num_single_layers=40, num_attention_heads=24, attention_head_dim=128,
                in_channels=16, image_condition_type=None)
    full.update(config)
    cls = type("HunyuanVideoTransformer3DModel", (), {})
    model = cls()
    model.config = full
    return model


def test_profile_detection_from_config():
    adapter = HunyuanVideoDiffusersAdapter()
    found = {p.name for p in adapter.detect_profiles(_config_stub())}
    assert found == {"hunyuanvideo-t2v-720p", "hunyuanvideo-t2v-544p"}
    assert adapter.detect_profiles(_config_stub(image_condition_type="token_replace")) == []
    assert adapter.detect_profiles(_config_stub(num_layers=2)) == []


def test_tiny_model_needs_a_profile(pipe):
    with pytest.raises(ProfileError, match="no shipped profile matches"):
        stepcache.enable(pipe, "magcache")


def test_unpublished_resolution_uses_nearest_table_with_a_warning(pipe, monkeypatch):
    published = [load_profile("hunyuanvideo-t2v-720p"), load_profile("hunyuanvideo-t2v-544p")]
    monkeypatch.setattr(HunyuanVideoDiffusersAdapter, "detect_profiles", lambda self, model: published)
    cached = stepcache.enable(pipe, "magcache")
    with pytest.warns(ResolutionWarning, match="calibrated at 32x32.*hunyuanvideo-t2v-544p"):
        T.run(pipe, steps=50)
    assert cached.config.profile.name == "hunyuanvideo-t2v-544p"
    assert stepcache.stats(pipe).pattern() == PUBLISHED_544P_E024K6
    stepcache.disable(pipe)
    stepcache.enable(pipe, "teacache")  # its coefficients do not depend on the resolution: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResolutionWarning)
        T.run(pipe, steps=4)


def test_load_pipeline_from_a_local_folder(pipe, baselines, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path, "fp32", "cpu", text_encoder=None, tokenizer=None, text_encoder_2=None,
                           tokenizer_2=None)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "HunyuanVideoPipeline"
    assert loaded.transformer.dtype == torch.float32
    # Same weights; loading may change memory layouts, hence last-bit differences in the uncached output.
    uncached = T.run(loaded, steps=10)
    torch.testing.assert_close(uncached, baselines["distilled"], rtol=0, atol=1e-5)
    stepcache.enable(loaded, "magcache", profile=PROFILE, thresh=0)
    assert torch.equal(_quiet_run(loaded, steps=10), uncached)
    stepcache.enable(loaded, "magcache", profile=PROFILE)
    T.run(loaded, steps=50)
    assert stepcache.stats(loaded).pattern() == PUBLISHED_720P_E024K6
