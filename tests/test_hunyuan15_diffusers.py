"""HunyuanVideo 1.5 in diffusers (HunyuanVideo15Pipeline, HunyuanVideo15ImageToVideoPipeline) on tiny random
transformers: the invariants for every method, the guider's branch names, the published MagCache schedule
(ComfyUI-MagCache's tables and rule, transcribed below from its nodes.py), and the profiles.

No shipped TeaCache or EasyCache numbers exist for this model, so those two run on a profile that `stepcache
calibrate`'s own functions measure on the tiny model, as a user would calibrate theirs."""
import warnings

import pytest
import torch

import stepcache
from stepcache.calibrate import CalibrationRun, build_profile, measure
from stepcache.calibration_io import write_profile
from stepcache.profiles import ProfileError, load_profile
from helpers import BlockWork, cached_run
import hunyuan15_tiny as T

pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::stepcache.runner.NothingCachedWarning",
                                        "ignore::stepcache.profiles.ResolutionWarning")
METHODS = ("magcache", "teacache", "easycache")
# TeaCache's signal is block 0's modulation, which it evaluates on every pass by design: not block work
SIGNAL_LINEAR = "transformer_blocks.0.norm1.linear"
REUSING = {"magcache": {"thresh": 0.5, "K": 2}, "teacache": {"thresh": 5.0}, "easycache": {"thresh": 2.0}}


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A profile of the tiny T2V model measured by stepcache's calibration (two seeds, 12 steps)."""
    torch.set_num_threads(1)
    pipe = T.build_t2v()
    run = CalibrationRun(["x"], [0, 1], 12)
    runner, adapter, model = measure(pipe, run, lambda prompt, seed: T.run_t2v(pipe, seed=seed), progress=False)
    data = build_profile(runner, adapter, model, run, "tiny-hv15", load_profile("hunyuanvideo1.5-t2v"))
    return str(write_profile(tmp_path_factory.mktemp("profile") / "tiny-hv15.json", data).path)


def cached(pipe, method, profile, run=T.run_t2v, **params):
    return cached_run(pipe, method, run, profile=profile, **params)


@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_is_bit_identical_and_reuse_runs_no_block(calibrated, method):
    pipe = T.build_t2v()
    baseline = T.run_t2v(pipe)
    zero, stats = cached(pipe, method, calibrated, thresh=0.0)
    assert torch.equal(zero, baseline) and stats.counts() == (24, 24)
    work = BlockWork(pipe.transformer, T.STACKS, exclude=(SIGNAL_LINEAR,))
    output, stats = cached(pipe, method, calibrated, **REUSING[method])
    work.remove()
    computed, total = stats.counts()
    assert 0 < computed < total
    assert work.ran() == stats.pattern()          # a reused pass runs no block
    assert not torch.equal(output, baseline)


@pytest.mark.parametrize("method", METHODS)
def test_state_is_per_guider_branch_and_each_generation_starts_afresh(calibrated, method):
    pipe = T.build_t2v()
    first, stats = cached(pipe, method, calibrated, **REUSING[method])
    assert stats.branches() == ["pred_cond", "pred_uncond"]
    stepcache.enable(pipe, method, profile=calibrated, **REUSING[method])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = [T.run_t2v(pipe), T.run_t2v(pipe)]
    stepcache.disable(pipe)
    assert torch.equal(again[0], first) and torch.equal(again[1], first)
    other = T.build_t2v()   # another instance keeps its own state
    stepcache.enable(other, method, profile=calibrated, **REUSING[method])
    stepcache.enable(pipe, method, profile=calibrated, **REUSING[method])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        T.run_t2v(other, steps=8, seed=5)
        assert torch.equal(T.run_t2v(pipe), first)
    stepcache.disable(pipe)
    stepcache.disable(other)


def test_a_distilled_checkpoint_runs_one_branch():
    """Guidance 1.0 (the distilled checkpoints): one call per step, the guider's "pred_cond"."""
    pipe = T.build_t2v(guidance=1.0)
    _, stats = cached(pipe, "magcache", "hunyuanvideo1.5-t2v-20steps", thresh=0.5)
    assert stats.branches() == ["pred_cond"] and stats.counts()[1] == 12


def comfyui_magcache(ratios, steps, thresh, K, retention):
    """ComfyUI-MagCache's HunyuanVideo 1.5 rule (nodes.py@47bdd2a, 512-534 and 1202-1215), as written there: two
    calls per step (cnt % 2), the ratio at 2 * step + cnt % 2 of a table for ``steps`` steps, MagCache from step
    int(steps * retention) on. Returns the passes in call order, C computed, . reused."""
    err, ratio, count, pattern = [0.0, 0.0], [1.0, 1.0], [0, 0], []
    cnt = 0
    for step in range(steps):
        for _ in range(2):
            p = cnt % 2
            skip = False
            if step >= int(steps * retention):
                ratio[p] *= ratios[2 * step + p]
                count[p] += 1
                err[p] += abs(1 - ratio[p])
                if err[p] < thresh and count[p] <= K:
                    skip = True
                else:
                    err[p], count[p], ratio[p] = 0, 0, 1.0
            pattern.append("." if skip else "C")
            cnt += 1
    return "".join(pattern)


@pytest.mark.parametrize("profile, steps, preset", [("hunyuanvideo1.5-t2v-20steps", 20, "E003K1R025"),
                                                    ("hunyuanvideo1.5-t2v-20steps", 20, "E003K2R025"),
                                                    ("hunyuanvideo1.5-t2v", 40, "E006K2R02"),
                                                    ("hunyuanvideo1.5-t2v", 40, "E006K3R02")])
def test_the_published_schedule_is_reproduced_on_a_pipeline(profile, steps, preset):
    loaded = load_profile(profile)
    settings = loaded.method("magcache")["presets"][preset]
    expected = comfyui_magcache(loaded.method("magcache")["ratios"], steps, settings["thresh"], settings["K"],
                                settings["retention_ratio"])
    pipe = T.build_t2v()
    work = BlockWork(pipe.transformer, T.STACKS)
    _, stats = cached(pipe, "magcache", profile, run=lambda p: T.run_t2v(p, steps=steps), preset=preset)
    work.remove()
    assert stats.pattern() == work.ran() == expected
    assert "." in expected


@pytest.mark.parametrize("retention", [0.225, 0.33, 0.1])
def test_the_warm_up_is_comfyuis_in_steps_where_ratio_times_steps_is_fractional(retention):
    """ComfyUI-MagCache computes the first int(steps * retention) steps, both calls of each; the pass-counted
    warm-up of the other tables (int(retention * passes)) would also compute the cond call of the next step where
    steps * retention is fractional (20 x 0.225 = 4.5: 9 passes, not 8)."""
    from stepcache.methods import resolve_method
    from stepcache.schedule import simulate
    loaded = load_profile("hunyuanvideo1.5-t2v-20steps")
    expected = comfyui_magcache(loaded.method("magcache")["ratios"], 20, 0.03, 2, retention)
    config = resolve_method("magcache", loaded, None, thresh=0.03, K=2, retention_ratio=retention)
    assert simulate(config, 20, ["pred_cond", "pred_uncond"]).pattern() == expected


def test_the_shipped_profile_is_matched_on_a_text_to_video_model_and_not_on_image_to_video():
    from stepcache.hunyuan15.diffusers_adapter import HunyuanVideo15DiffusersAdapter
    adapter = HunyuanVideo15DiffusersAdapter()
    published = dict(num_layers=54, num_attention_heads=16, attention_head_dim=128)
    with torch.device("meta"):    # the real model's layers, without its memory
        real, image = T.transformer("t2v", **published), T.transformer("i2v", **published)
    assert [p.name for p in adapter.detect_profiles(real)] == ["hunyuanvideo1.5-t2v"]
    assert adapter.detect_profiles(image) == []
    with pytest.raises(ProfileError, match="no shipped profile matches"):
        stepcache.enable(image, "magcache", num_steps=12)
    with pytest.raises(ProfileError, match="teacache"):
        stepcache.enable(real, "teacache", num_steps=12)


def test_image_to_video_with_a_calibrated_profile(tmp_path):
    torch.set_num_threads(1)
    pipe, frame = T.build_i2v(), T.image()
    run = CalibrationRun(["x"], [0], 12)
    runner, adapter, model = measure(pipe, run, lambda prompt, seed: T.run_i2v(pipe, frame, seed=seed),
                                     progress=False)
    profile = str(write_profile(tmp_path / "i2v.json", build_profile(runner, adapter, model, run, "i2v")).path)
    baseline = T.run_i2v(pipe, frame)
    for method in METHODS:
        zero, _ = cached(pipe, method, profile, run=lambda p: T.run_i2v(p, frame), thresh=0.0)
        assert torch.equal(zero, baseline), method
    output, stats = cached(pipe, "magcache", profile, run=lambda p: T.run_i2v(p, frame), thresh=0.5, K=2)
    assert 0 < stats.counts()[0] < stats.counts()[1]
    other, _ = cached(pipe, "magcache", profile, run=lambda p: T.run_i2v(p, T.image(seed=9)), thresh=0.5, K=2)
    assert not torch.equal(output, other)    # the first frame conditions the cached run


def test_guidance_is_read_off_the_guider_for_a_tuned_profile(calibrated, tmp_path):
    """A profile tuned at guidance 6 warns when the pipeline's guider runs another scale."""
    import json
    from stepcache.profiles import ProfileFitWarning
    data = json.loads(open(calibrated).read())
    data["tuned"] = {"operating_point": {"steps": 12, "guidance": 6.0}}
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps(data))
    pipe = T.build_t2v(guidance=4.0)
    stepcache.enable(pipe, "magcache", profile=str(path))
    with pytest.warns(ProfileFitWarning, match="guidance"):
        T.run_t2v(pipe)
    stepcache.disable(pipe)


def config_folder(path, pipeline_class: str, task: str):
    """A pipeline folder's configs (what `stepcache generate` checks before loading anything)."""
    import json
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class,
                                                       "transformer": ["diffusers",
                                                                       "HunyuanVideo15Transformer3DModel"]}))
    with torch.device("meta"):
        T.transformer(task, num_layers=54, num_attention_heads=16, attention_head_dim=128).save_config(
            path / "transformer")
    return path


def test_generate_checks_a_hunyuanvideo15_folder_before_loading(tmp_path):
    import argparse
    from stepcache import generate
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    t2v = config_folder(tmp_path / "t2v", "HunyuanVideo15Pipeline", "t2v")
    planned = generate.plan(parser.parse_args(["--model", str(t2v), "--prompt", "x", "--method", "magcache",
                                               "--out", str(tmp_path / "a.mp4")]))
    assert planned["config"].profile.name == "hunyuanvideo1.5-t2v" and planned["family"] == "hunyuanvideo1.5"
    args = parser.parse_args(["--model", str(t2v), "--prompt", "x", "--out", str(tmp_path / "a.mp4")])
    generate.plan(args)
    assert (args.height, args.width, args.frames, args.steps) == (480, 848, 121, 50)   # the pipeline's own
    i2v = config_folder(tmp_path / "i2v", "HunyuanVideo15ImageToVideoPipeline", "i2v")
    with pytest.raises(generate.GenerateError, match="--image"):
        generate.plan(parser.parse_args(["--model", str(i2v), "--prompt", "x", "--method", "none"]))
    frame = tmp_path / "frame.png"
    T.image().save(frame)
    with pytest.raises(generate.GenerateError, match="--height: this pipeline sizes the video from --image"):
        generate.plan(parser.parse_args(["--model", str(i2v), "--prompt", "x", "--image", str(frame), "--height",
                                         "480"]))
    with pytest.raises(ProfileError, match="no shipped profile matches"):
        generate.plan(parser.parse_args(["--model", str(i2v), "--prompt", "x", "--image", str(frame)]))


def test_a_guider_pipelines_guidance_is_set_on_its_guider():
    from stepcache.families import pipelines
    spec = pipelines()["HunyuanVideo15Pipeline"][1]
    pipe = T.build_t2v(guidance=1.0)
    assert spec.call_kwargs(None, 1.0, pipe) == {} and pipe.guider.guidance_scale == 1.0   # the checkpoint's own
    assert spec.call_kwargs(4.5, 1.0, pipe) == {} and pipe.guider.guidance_scale == 4.5
    assert spec.size_kwargs(480, 848) == {"height": 480, "width": 848}
    assert pipelines()["HunyuanVideo15ImageToVideoPipeline"][1].size_kwargs(480, 848) == {}


def test_a_few_step_run_on_a_table_measured_at_many_steps_is_warned(capsys):
    """A step-distilled model runs 8-12 steps: the 40-step table stretched over 8 is warned at every such run and
    said by `stepcache schedule`; the 20-step table at 20 steps is not."""
    from stepcache.profiles import ProfileFitWarning
    from stepcache.cli import main as cli
    pipe = T.build_t2v(guidance=1.0)
    stepcache.enable(pipe, "magcache", profile="hunyuanvideo1.5-t2v")
    for _ in range(2):
        with pytest.warns(ProfileFitWarning, match="merges 5.0 measured ones"):
            T.run_t2v(pipe, steps=8)
    assert any("calibrate at 8 steps" in n for n in stepcache.stats(pipe).to_dict()["notes"])
    stepcache.enable(pipe, "magcache", profile="hunyuanvideo1.5-t2v-20steps")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileFitWarning)
        T.run_t2v(pipe, steps=20)
    stepcache.disable(pipe)
    assert cli(["schedule", "--profile", "hunyuanvideo1.5-t2v", "--steps", "8"]) == 0
    assert "note: this run has 8 steps" in capsys.readouterr().out


def test_the_profiles_command_lists_hunyuanvideo15(capsys):
    from stepcache.cli import main as cli
    assert cli(["profiles"]) == 0
    out = capsys.readouterr().out
    assert "hunyuanvideo1.5-t2v:" in out and "hunyuanvideo1.5-t2v-20steps:" in out
    assert "ComfyUI-MagCache@47bdd2aca97e568087c4e92d2d2f0426bdce7a37" in out
    assert "teacache, easycache: no table in this profile" in out.split("hunyuanvideo1.5-t2v:")[1].split("opensora")[0]


def test_context_parallelism_is_refused_before_any_block_runs():
    """diffusers has no context-parallel plan for HunyuanVideo 1.5, so no measurement could be told a shard: a
    transformer made parallel is refused at its first pass, before a block runs, and disabling gives it back."""
    import types
    pipe = T.build_t2v()
    stepcache.enable(pipe, "magcache", profile="hunyuanvideo1.5-t2v")
    pipe.transformer._parallel_config = types.SimpleNamespace(context_parallel_config=object())
    work = BlockWork(pipe.transformer, T.STACKS)
    with pytest.raises(ValueError, match="no context-parallel plan in diffusers"):
        T.run_t2v(pipe, steps=2)
    assert work.calls == 0
    stepcache.disable(pipe)
    del pipe.transformer._parallel_config
    T.run_t2v(pipe, steps=2)
    assert work.calls > 0
