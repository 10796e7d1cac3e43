"""What outside tests found in the core: aborted generations continued, dtype changes taken for new generations,
tensors kept after a failed or finished call, accelerate's offload hooks dropping the cache, profiles and
parameters accepted silently. Each test here failed on the code before its fix."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import stepcache
from stepcache.errors import ParameterError, ProfileError
from stepcache.methods import resolve_method
from stepcache.profiles import load_profile
from stepcache.runner import CacheRunner, NothingCachedWarning

import wan_tiny as W

PROFILE = "wan2.1-t2v-1.3b"


# ------------------------------------------------------------------ 1. a bare transformer in the caller's loop
def _own_loop(transformer, prompt_seed: int, steps: int = 8, abort_after: int | None = None):
    """A caller's own flow-matching loop over a bare transformer, one CFG branch, with cache_context."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(prompt_seed)
    text = torch.randn(1, 8, 32, generator=g)
    x = torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(scheduler.timesteps):
        if abort_after is not None and i == abort_after:
            raise KeyboardInterrupt("the user stopped the run")
        with transformer.cache_context("cond"):
            v = transformer(x, t.expand(1), text, return_dict=False)[0]
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("method,params", [("magcache", dict(thresh=0.5, K=3, retention_ratio=0.0)),
                                           ("easycache", dict(thresh=0.5, warmup_steps=1, decide_on=None)),
                                           ("teacache", dict(thresh=50.0))])
def test_an_aborted_generation_is_not_continued_by_the_next(method, params):
    """A generation stopped part-way (the caller's loop raised between passes) leaves step counters behind; the
    next generation must start afresh, recognised by its timestep going back up, with no help from the caller."""
    steps = 8
    cached = W.build_t2v(seed=0).transformer
    fresh = W.build_t2v(seed=0).transformer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stepcache.enable(cached, method, profile=PROFILE, num_steps=steps, **params)
        stepcache.enable(fresh, method, profile=PROFILE, num_steps=steps, **params)
        with pytest.raises(KeyboardInterrupt):
            _own_loop(cached, prompt_seed=7, steps=steps, abort_after=5)
        after_abort = _own_loop(cached, prompt_seed=1, steps=steps)
        alone = _own_loop(fresh, prompt_seed=1, steps=steps)
    assert torch.equal(after_abort, alone)
    assert stepcache.stats(cached).pattern() == stepcache.stats(fresh).pattern()
    assert "." in stepcache.stats(fresh).pattern(), "the setting must reuse something for the test to mean anything"


# ------------------------------------------------------------------------- 8. a dtype change the pipeline makes
def test_a_dtype_change_within_a_generation_is_not_a_new_generation():
    """HunyuanVideo's step-0 latent is fp16 and fp32 from step 1 on: one generation, all passes in the stats, no
    NothingCachedWarning, and no tensor kept once it completes."""
    config = resolve_method("magcache", "hunyuanvideo-t2v-720p", preset="E024K6R02")
    runner = CacheRunner(config)
    steps = 50
    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingCachedWarning)
        for step in range(steps):
            dtype = torch.float16 if step == 0 else torch.float32
            x = torch.ones(1, 4, dtype=dtype)
            runner.begin_pass("cond", step, steps, x)
            h0 = torch.ones(1, 3, dtype=dtype)
            if runner.enter_stack(h0) is None:
                runner.leave_stack(h0 * 2)
            runner.end_pass(x)
    assert runner.stats.generation_ids() == [1]
    assert runner.stats.counts() == (19, 50)  # the published 0.24/K6 pattern, over all 50 passes
    assert runner.branches == {}


def test_a_reused_residual_takes_the_dtype_of_the_pass():
    config = resolve_method("magcache", "hunyuanvideo-t2v-720p", preset="E024K6R02")
    runner = CacheRunner(config)
    for step in range(50):
        runner.begin_pass("cond", step, 50, torch.ones(1, 4))
        h0 = torch.ones(1, 3, dtype=torch.float32 if step < 20 else torch.bfloat16)
        out = runner.enter_stack(h0)
        if out is None:
            runner.leave_stack(h0 * 2)
        else:
            assert out.dtype == h0.dtype
        runner.end_pass(None)


# ------------------------------------------------------------- 9. tensors released when a call fails or ends
def _residuals(pipe) -> int:
    runner = pipe.transformer._stepcache.runner
    return sum(s.residual is not None for s in runner.branches.values())


def test_a_pass_that_raises_releases_the_cache_and_the_next_call_starts_afresh():
    pipe, fresh = W.build_t2v(), W.build_t2v()
    for p in (pipe, fresh):
        stepcache.enable(p, "magcache", profile=PROFILE, thresh=0.5, K=3, retention_ratio=0.0)
    calls = {"n": 0}

    def fail_on_the_fifth_pass(module, args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("out of memory (simulated)")

    handle = pipe.transformer.blocks[1].register_forward_pre_hook(fail_on_the_fifth_pass)
    with pytest.raises(RuntimeError, match="simulated"):
        W.run_t2v(pipe, steps=8)
    handle.remove()
    assert _residuals(pipe) == 0, "a failed generation must not keep its residuals on the device"
    assert torch.equal(W.run_t2v(pipe, steps=8, prompt_seed=3), W.run_t2v(fresh, steps=8, prompt_seed=3))


def test_an_interrupted_pipeline_call_releases_the_cache_when_it_returns():
    """diffusers' own interrupt (``pipe._interrupt``) skips the remaining steps; the call still ends with
    ``_reset_stateful_cache``, and nothing may stay cached through VAE decoding or until the next call."""
    pipe = W.build_t2v()
    stepcache.enable(pipe, "magcache", profile=PROFILE, thresh=0.5, K=3, retention_ratio=0.0)

    def stop_at_step_3(p, step, timestep, kwargs):
        if step == 3:
            p._interrupt = True
        return {}

    pipe(height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=5.0, output_type="latent",
         generator=torch.Generator().manual_seed(0), callback_on_step_end=stop_at_step_3, **W.embeds(1))
    assert _residuals(pipe) == 0


# ------------------------------------------------------------------------- 7. accelerate's model CPU offload
@pytest.mark.parametrize("offload_first", [True, False])
def test_model_cpu_offload_keeps_the_cache_across_generations(offload_first):
    """diffusers removes and re-adds accelerate's hook after every call; the cache must survive it in both
    orders, cache every generation, and come off cleanly."""
    pipe, plain = W.build_t2v(), W.build_t2v()
    stepcache.enable(plain, "magcache", profile=PROFILE, thresh=0.5, K=3, retention_ratio=0.0)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    stepcache.enable(pipe, "magcache", profile=PROFILE, thresh=0.5, K=3, retention_ratio=0.0)
    if not offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    for generation in (1, 2, 3):
        video = W.run_t2v(pipe, steps=8, prompt_seed=generation)
        assert torch.equal(video, W.run_t2v(plain, steps=8, prompt_seed=generation))
        stats = stepcache.stats(pipe)
        assert stats.generation_ids()[-1] == generation
        assert "." in stats.pattern(), f"generation {generation} reused nothing: the cache was dropped"
    stepcache.disable(pipe)
    W.run_t2v(pipe, steps=8)  # still runs, uncached, with the offload hook in place
    assert not hasattr(pipe.transformer, "_stepcache")


# ----------------------------------------------------------------------- 4. one schema check for profiles
def _profile_file(tmp_path: Path, edit) -> str:
    data = json.loads(load_profile(PROFILE).path.read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return str(path)


def _set(section, key, value):
    def edit(data):
        target = data
        for part in section:
            target = target[part]
        target[key] = value
    return edit


BAD_PROFILES = [
    ("nan ratio", lambda d: d["magcache"]["ratios"].__setitem__(17, float("nan")), r"magcache.ratios\[17\]=nan"),
    ("zero ratio", lambda d: d["magcache"]["ratios"].__setitem__(5, 0.0), r"magcache.ratios\[5\]=0.0 is outside"),
    ("negative ratio", lambda d: d["magcache"]["ratios"].__setitem__(5, -0.9), r"magcache.ratios\[5\]=-0.9"),
    ("huge ratio", lambda d: d["magcache"]["ratios"].__setitem__(5, 1e30), r"magcache.ratios\[5\]=1e\+30"),
    ("98 ratios for 50 steps", lambda d: d["magcache"].__setitem__("ratios", d["magcache"]["ratios"][:98]),
     r"magcache.ratios has 98 values; allowed: steps x branches = 50 x 2 = 100"),
    ("unknown signal", _set(["teacache", "variants", "default"], "signal", "tmeb"),
     r"teacache.variants.default.signal='tmeb' is not one of temb, timestep_proj, block0_modulated"),
    ("missing steps", lambda d: d["magcache"].pop("steps"), r"magcache.steps is missing"),
    ("missing coefficients", lambda d: d["teacache"]["variants"]["default"].pop("coefficients"),
     r"teacache.variants.default.coefficients is missing"),
    ("force_last as a string", _set(["easycache"], "force_last", "no"), r"easycache.force_last='no' is not a boolean"),
    ("infinite preset threshold", _set(["magcache", "presets", "slow"], "thresh", float("inf")),
     r"magcache.presets.slow.thresh=inf is outside the allowed range \[0, inf\]"),
    ("decide_on a number", _set(["easycache"], "decide_on", 5), r"easycache.decide_on=5 is not a branch name"),
    ("K zero in defaults", _set(["magcache", "defaults"], "K", 0), r"magcache.defaults.K=0 is outside"),
    ("variant not in the profile", _set(["teacache", "defaults"], "variant", "nope"),
     r"teacache.defaults.variant='nope' is not one of default, use_ret_steps"),
]


@pytest.mark.parametrize("label,edit,message", BAD_PROFILES, ids=[b[0] for b in BAD_PROFILES])
def test_a_bad_profile_is_refused_at_load_naming_file_key_and_what_is_allowed(tmp_path, label, edit, message):
    path = _profile_file(tmp_path, edit)
    with pytest.raises(ProfileError, match=r"edited.json'?: " + message) as caught:
        load_profile(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(ProfileError, match=message):  # and through the front door, before touching the model
        stepcache.enable(W.build_t2v(), "magcache", profile=path)


def test_a_bad_profile_is_one_line_and_exit_2_from_the_command_line(tmp_path, capsys):
    from stepcache.cli import main
    path = _profile_file(tmp_path, BAD_PROFILES[0][1])
    assert main(["schedule", "--profile", path]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "magcache.ratios[17]=nan" in err and "Traceback" not in err


@pytest.mark.parametrize("params,message", [
    (dict(force_last="no"), r"easycache force_last='no' is not a boolean"),
    (dict(thresh=float("inf")), r"easycache thresh=inf is outside the allowed range \[0, inf\]"),
    (dict(thresh=float("nan")), r"easycache thresh=nan is outside the allowed range"),
    (dict(decide_on=5), r"easycache decide_on=5 is not a branch name or null"),
    (dict(warmup_steps=2.5), r"easycache warmup_steps=2.5 is outside the allowed range \[0, inf\] \(an integer\)"),
    (dict(predict=True), r"easycache predict=True is not one of reuse, linear"),
])
def test_bad_parameters_are_refused_when_the_method_is_resolved(params, message):
    with pytest.raises(ParameterError, match=message):
        resolve_method("easycache", PROFILE, **params)


def test_every_shipped_profile_passes_the_schema():
    from stepcache.profiles import known_profiles
    from stepcache.wan21.demo import model as demo_model
    for name in known_profiles():
        load_profile(name)
    load_profile(str(demo_model.WEIGHTS.with_name("wan2.1-demo-tiny.json")))


def test_a_finite_check_refuses_infinity_in_policies_too():
    from stepcache.methods.easycache import EasyCachePolicy
    with pytest.raises(ParameterError, match="inf"):
        EasyCachePolicy(math.inf, 1)


# ---------------------------------------------------------------------------------------- 2. batches of videos
def _batched_run(pipe, latents, prompt_embeds, negative, steps=10):
    return pipe(latents=latents, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, height=32, width=32,
                num_frames=5, num_inference_steps=steps, guidance_scale=5.0, output_type="latent").frames


def test_per_video_decisions_give_each_video_of_a_batch_its_own_run():
    """One decision per pass for a whole batch is the published behaviour (and stays the default, said in the
    stats); per_video=True gives every video of a batch the pattern and output it gets alone."""
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 16, 2, 4, 4, generator=g)
    text, negative = torch.randn(2, 8, 32, generator=g), torch.randn(2, 8, 32, generator=g)
    text[1] *= 0.2  # another prompt: alone, the second video takes another pattern
    params = dict(thresh=0.2, warmup_steps=1)
    alone = []
    for i in range(2):
        pipe = W.build_t2v()
        stepcache.enable(pipe, "easycache", profile=PROFILE, **params)
        alone.append((_batched_run(pipe, latents[i:i + 1], text[i:i + 1], negative[i:i + 1]),
                      stepcache.stats(pipe).pattern(branch="cond")))
    assert alone[0][1] != alone[1][1], "the two videos must take different patterns alone for this test to mean it"

    shared = W.build_t2v()
    stepcache.enable(shared, "easycache", profile=PROFILE, **params)
    together = _batched_run(shared, latents, text, negative)
    assert not torch.equal(together[1:], alone[1][0])  # the reference behaviour: video 2 follows the batch's pattern
    summary = stepcache.stats(shared).summary()
    assert "a batch of 2 videos takes one decision per pass" in summary

    split = W.build_t2v()
    stepcache.enable(split, "easycache", profile=PROFILE, per_video=True, **params)
    videos = _batched_run(split, latents, text, negative)
    stats = stepcache.stats(split)
    for i in range(2):
        assert torch.allclose(videos[i:i + 1], alone[i][0], rtol=0, atol=1e-6), i
        assert stats.pattern(branch=f"cond#{i}") == alone[i][1]
    assert "a batch of" not in stats.summary()


def test_per_video_is_refused_where_the_batch_cannot_be_split():
    from stepcache.api import adapter_for
    adapter = adapter_for(W.build_t2v().transformer)
    assert adapter.can_split_batch
    with pytest.raises(ParameterError, match="per_video='yes' is not allowed"):
        stepcache.enable(W.build_t2v(), "easycache", profile=PROFILE, per_video="yes")


# ------------------------------------------------------------ one line and exit 2 before any model work
@pytest.mark.parametrize("argv,message", [
    (["profiles", "nosuch"], "unknown profile 'nosuch'"),
    (["schedule", "--profile", PROFILE, "--steps", "0"], "argument --steps: 0 is too small; allowed: an integer >= 2"),
    (["schedule", "--profile", PROFILE, "--steps", "-5"], "argument --steps: -5 is too small"),
])
def test_bad_command_lines_are_one_line_and_exit_2(argv, message, capsys):
    from stepcache.cli import main
    with pytest.raises(SystemExit) if argv[0] == "schedule" else _no_raise() as caught:
        code = main(argv)
    code = caught.value.code if argv[0] == "schedule" else code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    W.save_t2v_folder(folder)
    return folder


@pytest.mark.parametrize("extra,message", [
    (["--out", "noext"], "--out 'noext' must end in .mp4"),
    (["--out", "{tmp}/afile/video.mp4"], "is a file, not a folder"),
    (["--out", "{tmp}"], "is a folder; give a file name"),
    (["--device", "cuda"], "--device cuda: this machine has no CUDA device"),
    (["--device", "tpu"], "--device 'tpu' is not allowed"),
    (["--steps", "0"], "argument --steps: 0 is too small"),
])
def test_generate_refuses_bad_outputs_and_devices_before_loading(pipeline_folder, tmp_path, extra, message, capsys,
                                                                  monkeypatch):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check is for machines without it")
    from stepcache import generate
    from stepcache.cli import main
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setattr(generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded before the check"))
    argv = ["generate", "--model", str(pipeline_folder), "--prompt", "a ball", "--method", "none",
            *[e.replace("{tmp}", str(tmp_path)) for e in extra]]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    from stepcache import schedule
    from stepcache.cli import main

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(schedule, "run", interrupted)
    assert main(["schedule", "--profile", PROFILE]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err


def test_written_profiles_follow_the_umask(tmp_path):
    import os
    from stepcache.calibration_io import write_profile
    data = json.loads(load_profile(PROFILE).path.read_text())
    old = os.umask(0o022)
    try:
        path = write_profile(tmp_path / "mine.json", data).path
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["mine.json"]  # no temporary file left behind


def test_a_profile_that_fails_the_schema_is_never_written(tmp_path):
    from stepcache.calibration_io import write_profile
    data = json.loads(load_profile(PROFILE).path.read_text())
    data["magcache"]["ratios"][3] = float("nan")
    with pytest.raises(ProfileError, match=r"magcache.ratios\[3\]=nan"):
        write_profile(tmp_path / "bad.json", data)
    assert list(tmp_path.iterdir()) == []


def test_calibrate_refuses_a_device_this_machine_lacks_before_loading(pipeline_folder, tmp_path, capsys, monkeypatch):
    """The same --device check as generate (stepcache.generate.resolve_device), before the pipeline loads."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check is for machines without it")
    from stepcache import generate
    from stepcache.cli import main
    monkeypatch.setattr(generate, "load_pipeline", lambda *a: pytest.fail("the model was loaded before the check"))
    code = main(["calibrate", "--model", str(pipeline_folder), "--prompt", "a ball", "--device", "cuda",
                 "--out", str(tmp_path / "p.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--device cuda: this machine has no CUDA device" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "p.json").exists()
