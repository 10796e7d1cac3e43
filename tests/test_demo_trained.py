"""The shipped demo model is trained, not random, and the demo's claims hold on it.

Every test here skips, saying why, while the package has no trained weights or no calibrated profile.
"""
import json

import pytest
import torch

from stepcache.wan21.demo import model as demo_model

needs_weights = pytest.mark.skipif(
    not demo_model.WEIGHTS.exists(),
    reason=f"no shipped demo weights at {demo_model.WEIGHTS}: train them with "
           f"`python -m stepcache.wan21.demo.train --out DIR` and copy DIR/demo_wan.safetensors there")
needs_profile = pytest.mark.skipif(
    not demo_model.PROFILE.exists(),
    reason=f"no demo profile at {demo_model.PROFILE}: run `python -m stepcache.wan21.demo.calibrate_demo`")


@needs_weights
def test_shipped_weights_are_small_and_fully_trained():
    assert demo_model.WEIGHTS.stat().st_size <= 10 * 1024 * 1024
    model = demo_model.load()
    info = json.loads(model.metadata["info"])
    assert info["trained_steps"] == info["steps"], "the shipped file is an unfinished run"
    assert dict(model.transformer.config)["num_layers"] == demo_model.TRANSFORMER_CONFIG["num_layers"]


@needs_weights
def test_videos_match_their_prompts_on_held_out_pairs():
    from stepcache.wan21.demo.check import prompt_match
    torch.set_num_threads(1)
    summary = prompt_match(n=12, batch=12, progress=False, verbose=False)
    # The training script's check on 240 held-out pairs is the claim (README); this is a few of them.
    assert summary["match"] >= 0.75, summary["failures"]


@needs_weights
@needs_profile
def test_shipped_profile_fits_the_model_and_has_presets():
    from stepcache.profiles import load_profile
    profile = load_profile(str(demo_model.PROFILE))
    model = demo_model.load()
    wanted = profile.data["model"]["config"]
    assert all(model.transformer.config[k] == v for k, v in wanted.items())
    assert profile.data["magcache"]["steps"] == demo_model.STEPS
    for method in ("teacache", "magcache", "easycache"):
        assert set(profile.method(method)["presets"]) == {"slow", "medium", "fast"}


# `stepcache demo`'s medium-preset claim is tested on the README's first command (tests/test_readme.py).


@needs_weights
def test_calibration_on_the_demo_model_is_repeatable_prompt_independent_and_composes_better():
    """#6 on the trained model, small: the study's claims (docs/calibration/demo-study.md) on fewer prompts."""
    from stepcache.wan21.demo.calibration_study import study
    torch.set_num_threads(1)
    result = study(prompts=3, target_steps=(10, 20), progress=False)
    assert result["repeat_identical"]
    agreement = result["other_prompts_agreement"]
    assert agreement["within_2_std"] >= 0.95, agreement
    fit = result["teacache_fit"]
    assert fit["heldout_rmse"] < fit["heldout_linear_rmse"], fit
    assert not fit["negative_inside_range"]
    for steps in ("10", "20"):
        row = result["resampling"][steps]
        assert row["compose"] < row["nearest"], (steps, row)
