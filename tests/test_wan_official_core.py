"""The official-repo scripts' pieces that need no upstream checkout: flag splitting, the pre-load checks, branch
naming, and writing a calibrated MagCache profile that the rest of stepcache loads."""
import argparse
import json
import types

import pytest
import torch

from stepcache.calibration_io import (RatioRecord, interleave_with_padding, measured_ratios,
                                      magcache_profile_data, write_profile)
from stepcache.methods import resolve_method
from stepcache.profiles import load_profile
from stepcache.wan21.official import ContextBranches, stack_latents, unstack_latents
from stepcache.wan21.official_generate import PlanError, build_parser, make_plan, split_argv

# Upstream's config tables, reduced to what the checks read (wan/configs/__init__.py).
UPSTREAM = types.SimpleNamespace(
    WAN_CONFIGS={"t2v-1.3B": types.SimpleNamespace(num_layers=30, num_heads=12),
                 "t2v-14B": types.SimpleNamespace(num_layers=40, num_heads=40),
                 "t2i-14B": types.SimpleNamespace(num_layers=40, num_heads=40),
                 "i2v-14B": types.SimpleNamespace(num_layers=40, num_heads=40),
                 "flf2v-14B": types.SimpleNamespace(num_layers=40, num_heads=40),
                 "vace-1.3B": types.SimpleNamespace(num_layers=30, num_heads=12)},
    SIZE_CONFIGS={"1280*720": (1280, 720), "720*1280": (720, 1280), "832*480": (832, 480), "480*832": (480, 832)})


def upstream_args(**kw):
    """What upstream's _parse_args returns after _validate_args (defaults filled in)."""
    task = kw.get("task", "t2v-1.3B")
    base = dict(task=task, size="832*480", ckpt_dir="./ckpt", image=None, first_frame=None, last_frame=None,
                sample_steps=40 if "i2v" in task else 50, frame_num=81, sample_solver="unipc", sample_shift=5.0)
    return argparse.Namespace(**{**base, **kw})


def plan(method, flags=(), **args):
    ours, rest = split_argv(method, list(flags))
    assert rest == []
    return make_plan(method, ours, upstream_args(**args), UPSTREAM)


def test_split_keeps_upstream_flags_and_values_in_order():
    argv = ["--task", "t2v-1.3B", "--prompt", "a --thresh cat", "--use_magcache", "--magcache_K", "4",
            "--t5_cpu", "--offload_model", "True", "--magcache_thresh=0.12", "--magcache", "x"]
    ours, rest = split_argv("magcache", argv)
    assert (ours.use_magcache, ours.magcache_K, ours.magcache_thresh, ours.retention_ratio) == (True, 4, 0.12, 0.2)
    # No abbreviations: "--magcache" is left for upstream's parser to reject.
    assert rest == ["--task", "t2v-1.3B", "--prompt", "a --thresh cat", "--t5_cpu", "--offload_model", "True",
                    "--magcache", "x"]


def test_published_defaults():
    mag = build_parser("magcache").parse_args([])
    assert (mag.magcache_thresh, mag.magcache_K, mag.retention_ratio, mag.use_magcache,
            mag.magcache_calibration) == (0.12, 2, 0.2, False, False)
    tea = build_parser("teacache").parse_args([])
    assert (tea.teacache_thresh, tea.use_ret_steps) == (0.2, False)
    easy = build_parser("easycache").parse_args([])
    assert (easy.thresh, easy.ret_steps, easy.alpha, easy.beta) == (0.05, 10, 0.0, 1.0)


@pytest.mark.parametrize("task, size, method, name", [
    ("t2v-1.3B", "832*480", "magcache", "wan2.1-t2v-1.3b"),
    ("t2v-14B", "1280*720", "teacache", "wan2.1-t2v-14b"),
    ("t2i-14B", "1280*720", "easycache", "wan2.1-t2v-14b"),
    ("i2v-14B", "480*832", "teacache", "wan2.1-i2v-14b-480p"),
    ("i2v-14B", "720*1280", "easycache", "wan2.1-i2v-14b-720p"),
])
def test_profile_comes_from_task_and_size_not_the_checkpoint_folder(tmp_path, task, size, method, name):
    image = tmp_path / "i.png"
    image.write_bytes(b"png")
    flags = ["--use_magcache"] if method == "magcache" else []
    p = plan(method, flags, task=task, size=size, ckpt_dir="/models/my-own-folder", image=str(image))
    assert p.profile.name == name and p.method == method


def test_a_magcache_table_for_40_steps_at_50_is_resampled_with_a_note(tmp_path):
    image = tmp_path / "i.png"
    image.write_bytes(b"png")
    p = plan("magcache", ["--use_magcache"], task="i2v-14B", image=str(image), sample_steps=50)
    assert any("has 40 steps; this run has 50: resampled" in n for n in p.notes)
    config = resolve_method("magcache", p.profile, **p.params)
    assert len(config.make_policy("uncond", 50).ratios) == 50


@pytest.mark.parametrize("method, flags, args, message", [
    ("teacache", ["--cache_profile", "wan2.1-i2v-14b-720p"], {}, "was measured on a Wan2.1 I2V model"),
    ("magcache", ["--use_magcache", "--cache_profile", "wan2.1-t2v-14b"], {}, "num_layers=40 (--task t2v-1.3B has 30)"),
    ("easycache", [], {"task": "i2v-14B"}, "needs --image PATH"),
    ("easycache", [], {"task": "flf2v-14B"}, "needs --first_frame PATH"),
    ("magcache", ["--use_magcache"], {"task": "vace-1.3B"}, "VaceWanModel"),
    ("magcache", ["--magcache_calibration", "--use_magcache"], {}, "exclude each other"),
    ("easycache", ["--beta", "0.5"], {}, "--beta is parsed but never used"),
    ("easycache", ["--ret_steps", "12"], {"sample_steps": 12}, "covers all 12 sampling steps"),
    ("magcache", ["--use_magcache", "--retention_ratio", "1.0"], {}, "retention_ratio=1.0"),
    ("teacache", [], {"sample_steps": 1}, "at least 2 steps"),
    ("magcache", ["--use_magcache", "--cache_stats", "stats.txt"], {}, "must be a .json file"),
    ("magcache", ["--magcache_calibration", "--cache_profile", "wan2.1-t2v-1.3b"], {}, "does not read --cache_profile"),
    ("magcache", ["--use_magcache", "--calibration_file", "c.json"], {}, "add --magcache_calibration"),
    ("teacache", ["--cache_profile", "wan2.1-vace-1.3b"], {"task": "vace-1.3B"}, "VaceWanModel"),
])
def test_wrong_combinations_are_refused(method, flags, args, message):
    with pytest.raises(PlanError, match=None) as info:
        plan(method, flags, **args)
    assert message in str(info.value)


@pytest.mark.parametrize("method,flags", [("magcache", ["--use_magcache"]), ("teacache", []), ("easycache", [])])
def test_cache_predict_reaches_every_method(method, flags):
    assert plan(method, [*flags, "--cache_predict", "linear"]).params["predict"] == "linear"
    assert "predict" not in plan(method, flags).params  # the published behaviour: stepcache's default, reuse
    with pytest.raises(PlanError, match="invalid cache flag value"):
        plan(method, [*flags, "--cache_predict", "cubic"])



@pytest.mark.parametrize("flags", [[], ["--magcache_calibration"]])
def test_cache_predict_on_an_uncached_magcache_run_is_refused(flags):
    with pytest.raises(PlanError, match="--cache_predict has no effect without --use_magcache"):
        plan("magcache", [*flags, "--cache_predict", "linear"], task="t2v-14B", size="1280*720")


def test_magcache_script_without_its_flags_runs_uncached_like_the_published_one():
    p = plan("magcache")
    assert p.method is None and p.profile is None and not p.calibrate
    assert any("uncached" in n for n in p.notes)
    p = plan("magcache", ["--magcache_calibration"], task="t2v-14B", size="1280*720")
    assert p.calibrate and p.method is None and p.base_profile.name == "wan2.1-t2v-14b"


def test_context_identity_names_branches():
    names = ContextBranches()
    a, b, c, d = [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)]
    assert [names.name(x) for x in (a, b, b, a)] == ["cond", "uncond", "uncond", "cond"]
    assert names.name([torch.zeros(1)]) == "cond"  # an equal but new list is a new context: a new generation
    assert [names.name(x) for x in (c, d)] == ["uncond", "cond"]  # ... whose uncond came, then a third list
    names.reset()
    assert names.name(d) == "cond"


def test_latent_lists_round_trip():
    same = [torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)]
    assert stack_latents(same).shape == (2, 4, 2, 3, 3)
    assert all(torch.equal(a, b) for a, b in zip(unstack_latents(stack_latents(same), same), same))
    ragged = [torch.randn(4, 2, 3, 3), torch.randn(4, 1, 3, 3)]
    assert all(torch.equal(a, b) for a, b in zip(unstack_latents(stack_latents(ragged), ragged), ragged))


def test_the_calibrator_measures_per_branch_residual_ratios():
    """The one calibrator (the runner-based one the scripts' --magcache_calibration uses) against residuals
    captured independently with plain hooks on the first and last block, per CFG branch."""
    import wan_tiny as W
    from stepcache.calibrate import install_calibration
    pipe = W.build_t2v()
    blocks = pipe.transformer.blocks
    captured: list[torch.Tensor] = []
    h0 = {}
    hooks = [blocks[0].register_forward_pre_hook(lambda m, a, k: h0.__setitem__("x", a[0]), with_kwargs=True),
             blocks[-1].register_forward_hook(lambda m, a, out: captured.append((out - h0["x"]).detach()))]
    cached = install_calibration(pipe, 5)
    W.run_t2v(pipe, steps=5)
    cached.remove()
    for h in hooks:
        h.remove()
    branches, steps, records = measured_ratios(cached.runner)
    assert branches == ["cond", "uncond"] and steps == 5
    for index, branch in enumerate(branches):
        res = captured[index::2]  # the pipeline calls cond, then uncond, at every step
        expected = [(res[i].float().norm(dim=-1) / res[i - 1].float().norm(dim=-1)).mean().item() for i in range(1, 5)]
        assert [r.ratio for r in records[branch]] == pytest.approx(expected, rel=1e-5)
        assert [r.step for r in records[branch]] == [1, 2, 3, 4]
    assert "forward" not in pipe.transformer.__dict__  # removed exactly


def test_calibrated_profile_round_trip(tmp_path):
    records = {b: [RatioRecord(s, 1.0 - 0.01 * s - 0.001 * i, 0.1, 0.01) for s in range(1, 5)]
               for i, b in enumerate(("cond", "uncond"))}
    assert interleave_with_padding({"cond": [0.9, 0.8], "uncond": [0.7, 0.6]}, ["cond", "uncond"]) == \
        [1.0, 1.0, 0.9, 0.7, 0.8, 0.6]
    base = load_profile("wan2.1-t2v-1.3b")
    data = magcache_profile_data(
        name="wan2.1-t2v-1.3b-test-calibrated", description="test", recorder_or_ratios=records,
        model={"family": "wan2.1", "task": "t2v", "resolution": [480, 832],
               "config": {"num_layers": 30, "num_attention_heads": 12, "in_channels": 16}},
        branches=["cond", "uncond"], steps=5, source="calibrated by stepcache (test)", measured_on={"x": 1},
        defaults={"thresh": 0.12, "K": 2, "retention_ratio": 0.2}, base=base)
    profile = write_profile(tmp_path / "sub" / "p.json", data)
    assert profile.name == "wan2.1-t2v-1.3b-test-calibrated"
    assert profile.method("magcache")["ratios"][:4] == [1.0, 1.0, 0.99, 0.989]
    assert profile.data["teacache"]["copied_from_profile"] == "wan2.1-t2v-1.3b"
    assert load_profile(str(tmp_path / "sub" / "p.json")).data == json.loads((tmp_path / "sub" / "p.json")
                                                                               .read_text())
    config = resolve_method("magcache", profile, thresh=0.12, K=2)
    assert config.make_policy("uncond", 5).ratios == [1.0, 0.989, 0.979, 0.969, 0.959]
    with pytest.raises(ValueError, match="has 4 measured ratios; a 6-step run has 5"):
        magcache_profile_data(name="x", description="", recorder_or_ratios=records, model={},
                              branches=["cond", "uncond"], steps=6, source="", measured_on={}, defaults={})


def test_a_profile_without_the_methods_table_is_refused(tmp_path):
    records = {b: [RatioRecord(s, 0.99, 0.0, 0.0) for s in range(1, 4)] for b in ("cond", "uncond")}
    data = magcache_profile_data(
        name="mine", description="", recorder_or_ratios=records, branches=["cond", "uncond"], steps=4, source="",
        model={"family": "wan2.1", "task": "t2v", "config": {"num_layers": 30, "num_attention_heads": 12}},
        measured_on={}, defaults={"thresh": 0.12, "K": 2, "retention_ratio": 0.2})
    write_profile(tmp_path / "mine.json", data)
    with pytest.raises(PlanError, match="'mine' has no teacache table"):
        plan("teacache", ["--cache_profile", str(tmp_path / "mine.json")])
    assert plan("magcache", ["--use_magcache", "--cache_profile", str(tmp_path / "mine.json")],
                sample_steps=4).profile.name == "mine"


@pytest.mark.parametrize("script", ["magcache_generate.py", "teacache_generate.py", "easycache_generate.py"])
def test_scripts_outside_a_wan_checkout_say_where_they_belong(tmp_path, script):
    import subprocess
    import sys
    from pathlib import Path

    import stepcache.wan21
    path = Path(stepcache.wan21.__file__).with_name(script)
    result = subprocess.run([sys.executable, str(path), "--task", "t2v-1.3B"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "copy this script into the root of a Wan-Video/Wan2.1 checkout" in result.stderr


def test_cache_preset_takes_a_named_setting_instead_of_the_method_flags(tmp_path):
    """--cache_preset runs a profile's named setting (a published one here; `stepcache tune` writes 2x, 3x); the
    method's own flags with it are refused, naming them, since the two would say different things."""
    p = plan("magcache", ["--use_magcache", "--cache_preset", "E012K4R02"])
    assert (p.params["thresh"], p.params["K"], p.params["retention_ratio"]) == (0.12, 4, 0.2)
    default = plan("magcache", ["--use_magcache"])
    assert default.params["K"] == 2  # without it, the published flags' defaults
    p = plan("teacache", ["--cache_preset", "use_ret_steps-0.1", "--cache_predict", "linear"])
    assert (p.params["thresh"], p.params["variant"], p.params["predict"]) == (0.1, "use_ret_steps", "linear")
    with pytest.raises(PlanError, match="leave out --magcache_K, --magcache_thresh"):
        plan("magcache", ["--use_magcache", "--cache_preset", "E012K4R02", "--magcache_thresh=0.2", "--magcache_K",
                          "3"])
    with pytest.raises(PlanError, match="--cache_preset: unknown magcache preset 'fast-ish'"):
        plan("magcache", ["--use_magcache", "--cache_preset", "fast-ish"])
