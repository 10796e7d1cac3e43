"""`stepcache calibrate`: measuring a model's tables and writing a profile every entry point accepts."""
import json
import math

import pytest

import stepcache
from stepcache.calibrate import CalibrationError, CalibrationRun, build_profile, measure
from stepcache.profiles import check_profile_fit
from stepcache.calibration_io import write_profile
from stepcache.policies import compose_resample, nearest_resample
from stepcache.profiles import ProfileError, load_profile
from wan_tiny import build_t2v, run_t2v

STEPS = 8


def calibrate(pipe, prompt_seeds=(1, 2), seeds=(0,), steps=STEPS, name="tiny-cal", base=None):
    def generate(prompt_seed, seed):
        run_t2v(pipe, steps=steps, prompt_seed=prompt_seed, seed=seed)
    run = CalibrationRun(list(prompt_seeds), list(seeds), steps, {"resolution": [32, 32]})
    runner, adapter, model = measure(pipe, run, generate, progress=False)
    return build_profile(runner, adapter, model, run, name, base)


def _without_timestamps(data):
    data = json.loads(json.dumps(data))
    data.pop("source")
    data["measured_on"].pop("tool")
    return data


def test_same_prompts_and_seeds_give_the_same_profile():
    pipe = build_t2v()
    assert _without_timestamps(calibrate(pipe)) == _without_timestamps(calibrate(pipe))


def test_profile_holds_each_method_with_spread_and_fit(tmp_path):
    pipe = build_t2v()
    data = calibrate(pipe, prompt_seeds=(1, 2, 3), seeds=(0, 1))
    mag, tea, easy = data["magcache"], data["teacache"], data["easycache"]
    assert mag["branches"] == ["cond", "uncond"] and len(mag["ratios"]) == 2 * STEPS
    assert mag["ratios"][:2] == [1.0, 1.0] and mag["spread"]["runs"] == 6
    for lo, mean, hi in zip(mag["spread"]["min"], mag["ratios"], mag["spread"]["max"]):
        assert lo - 1e-5 <= mean <= hi + 1e-5
    variant = tea["variants"]["default"]
    assert variant["signal"] == "temb" and len(variant["coefficients"]) == 5
    assert variant["fit_range"][0] < variant["fit_range"][1] and variant["pairs"] == 6 * 2 * (STEPS - 1)
    assert {"fit_rmse", "linear_rmse", "heldout_rmse", "heldout_linear_rmse"} <= set(variant)
    assert tea["presets"]["slow"]["thresh"] <= tea["presets"]["medium"]["thresh"] <= tea["presets"]["fast"]["thresh"]
    assert len(easy["rate"]["mean"]) == STEPS - 1 and easy["warmup_steps"] >= 1
    assert easy["presets"]["slow"]["thresh"] <= easy["presets"]["fast"]["thresh"]
    assert data["measured_on"]["model_class"] == "WanTransformer3DModel"
    assert data["measured_on"]["steps"] == STEPS and data["measured_on"]["prompts"] == 3


def test_calibrated_profile_drives_every_method_and_other_step_counts(tmp_path, capsys):
    pipe = build_t2v()
    path = tmp_path / "tiny-cal.json"
    write_profile(path, calibrate(pipe))
    for method in ("teacache", "magcache", "easycache"):
        stepcache.enable(pipe, method, profile=str(path), preset="fast")
        run_t2v(pipe, steps=STEPS)
        computed, total = stepcache.stats(pipe).counts()
        assert total == 2 * STEPS
        stepcache.disable(pipe)
    # A table measured at 8 steps, scheduled at 4 and at 16 without running the model.
    from stepcache.cli import main
    for steps in ("4", "16"):
        assert main(["schedule", "--profile", str(path), "--steps", steps, "--resample", "compose"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert len(lines[2]) == 2 * int(steps)


def test_profile_from_another_model_class_is_refused(tmp_path):
    pipe = build_t2v()
    data = calibrate(pipe)
    data["measured_on"]["model_class"] = "HunyuanVideoTransformer3DModel"
    path = tmp_path / "other.json"
    write_profile(path, data)
    with pytest.raises(ProfileError, match="calibrated on HunyuanVideoTransformer3DModel, not WanTransformer3DModel"):
        stepcache.enable(pipe, "magcache", profile=str(path))
    assert check_profile_fit(load_profile("wan2.1-t2v-1.3b"), pipe.transformer) == []


def test_bad_calibration_input():
    pipe = build_t2v()
    with pytest.raises(CalibrationError, match="the prompt list is empty"):
        measure(pipe, CalibrationRun([], [0], STEPS), lambda p, s: None)
    with pytest.raises(CalibrationError, match="steps=1 is too few"):
        measure(pipe, CalibrationRun(["a"], [0], 1), lambda p, s: None)
    assert "forward" not in pipe.transformer.__dict__


@pytest.mark.parametrize("args,message", [
    (["--model", "x", "--out", "p.json"], "no prompts"),
    (["--model", "x", "--prompt", "a", "--steps", "1", "--out", "p.json"], "--steps: 1 is too small"),
    (["--model", "x", "--prompt", "a", "--out", "p.txt"], "must end in .json"),
    (["--model", "x", "--prompt", "a", "--out", "p.json", "--base-profile", "README.md"], "is not a stepcache profile"),
    (["--model", "/nonexistent", "--prompt", "a", "--out", "p.json"], "is not a diffusers pipeline folder"),
])
def test_calibrate_cli_errors(args, message, tmp_path, monkeypatch, capsys):
    from pathlib import Path
    from stepcache.cli import main
    readme = str(Path(__file__).resolve().parents[1] / "README.md")
    monkeypatch.chdir(tmp_path)
    try:
        status = main(["calibrate", *[readme if a == "README.md" else a for a in args]])
    except SystemExit as exc:   # argparse's own refusal of a malformed value
        status = exc.code
    assert status == 2 and message in capsys.readouterr().err


def test_compose_resampling_multiplies_merged_steps():
    table = [1.0, 1.02, 0.98, 0.97, 0.95, 0.9]
    assert compose_resample(table, 6) == pytest.approx(table)
    coarse = compose_resample(table, 3)
    assert coarse[1] == pytest.approx(1.02 * 0.98 * 0.97 ** 0.5)
    assert coarse[1] * coarse[2] == pytest.approx(1.02 * 0.98 * 0.97 * 0.95 * 0.9)
    fine = compose_resample(table, 11)
    assert fine[1] * fine[2] == pytest.approx(1.02)
    # The reference's nearest resampling keeps single values instead: less drift per coarse step.
    assert nearest_resample(table, 3) == [1.0, 0.98, 0.9]  # indices 0, round(2.5) = 2, 5


def test_resampling_errors_measure_each_mode_against_a_measured_table():
    from stepcache.calibrate import resampling_errors
    fine = {"ratios": [1.0] + [0.99] * 8, "steps": 9, "branches": ["cond"]}
    # Measured at 5 steps, each coarse step spans two fine ones: the true ratio is 0.99 ** 2.
    coarse = {"ratios": [1.0] + [0.99 ** 2] * 4, "steps": 5, "branches": ["cond"]}
    errors = resampling_errors(fine, coarse)
    assert errors["compose"] == pytest.approx(0.0, abs=1e-12)
    assert errors["nearest"] == pytest.approx(0.99 - 0.99 ** 2)


@pytest.mark.parametrize("rates, expected", [
    # k (steps 1-10) jumps by 50% until step 4, then changes by 2% per step: from step 5 the last step's k
    # predicts the next one, so the warm-up is steps 0-4
    ([1.0, 1.5, 2.25, 3.4, 3.47, 3.54, 3.61, 3.68, 3.75, 9.0], 5),
    # one calm step (3) between jumps is not settled
    ([1.0, 1.5, 1.52, 2.4, 2.45, 2.5, 2.55, 2.6, 2.65, 9.0], 5),
    # never three calm steps in a row: the warm-up covers the run
    ([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0], 10),
])
def test_easycache_warmup_starts_where_the_rate_settles(rates, expected):
    from stepcache import methods
    from stepcache.calibrate import Calibration, PassMeasure
    steps = len(rates) + 1
    measures = [PassMeasure(0, "cond", 0, output_mean=1.0)]
    measures += [PassMeasure(0, "cond", s, rate=k, input_change=0.1, output_mean=1.0)
                 for s, k in enumerate(rates, start=1)]
    section = methods.get("easycache").calibration_section(Calibration(measures, ["cond"], steps, None, None))
    assert section["suggested_warmup_steps"] == expected
    assert len(section["rate"]["relative_change"]) == len(rates) - 1


@pytest.mark.parametrize("n, length", [(30, 8), (31, 8), (50, 7), (100, 13), (8, 30), (50, 75)])
def test_compose_resampling_keeps_the_total_drift_for_any_lengths(n, length):
    # step counts whose scale is not exact in floating point (30 -> 8 once read past the table's end)
    table = [1.0] + [0.97 + 0.002 * (k % 7) for k in range(1, n)]
    out = compose_resample(table, length)
    assert len(out) == length and out[0] == 1.0
    assert math.prod(out[1:]) == pytest.approx(math.prod(table[1:]), rel=1e-9)


def test_magcache_speed_levels_reuse_what_they_say_on_the_calibrated_table(tmp_path):
    from stepcache.calibrate import SPEED_LEVELS
    from stepcache.methods import resolve_method
    from stepcache.schedule import simulate
    pipe = build_t2v()
    profile = write_profile(tmp_path / "cal.json", calibrate(pipe, prompt_seeds=(1, 2), steps=20))
    notes = profile.method("magcache")["preset_notes"]
    for level, fraction in SPEED_LEVELS.items():
        computed, total = simulate(resolve_method("magcache", profile, level), 20).counts()
        reused = 1 - computed / total
        # the smallest threshold reaching the level's share of reused passes, and the note says how much
        assert reused >= fraction, (level, reused)
        assert f"reuses {reused:.0%} of the passes at 20 steps" == notes[level]
    slow, fast = (resolve_method("magcache", profile, p).params for p in ("slow", "fast"))
    assert slow["K"] < fast["K"] and slow["thresh"] < fast["thresh"]


def test_calibrate_takes_the_first_frame_of_an_image_to_video_pipeline(tmp_path, monkeypatch, capsys):
    """`stepcache calibrate --image`: every calibration run of an image-to-video folder starts from the frame; without
    it the folder is refused in one line, and a text-to-video folder refuses one."""
    from PIL import Image
    from stepcache.cli import main
    from wan_tiny import save_i2v_folder, save_t2v_folder
    folder = save_i2v_folder(tmp_path / "i2v")
    frame = tmp_path / "frame.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(frame)
    common = ["calibrate", "--prompt", "a red ball moves left", "--steps", "6", "--height", "32", "--width", "32",
              "--frames", "5", "--device", "cpu", "--dtype", "fp32"]
    assert main([*common, "--model", str(folder), "--out", str(tmp_path / "p.json")]) == 2
    assert "pass --image FIRST_FRAME" in capsys.readouterr().err
    assert main([*common, "--model", str(save_t2v_folder(tmp_path / "t2v")), "--image", str(frame), "--out",
                 str(tmp_path / "p.json")]) == 2
    assert "--image is for image-to-video pipelines" in capsys.readouterr().err
    assert main([*common, "--model", str(folder), "--image", str(frame), "--out", str(tmp_path / "p.json")]) == 0
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile["measured_on"]["image"] == str(frame)
    assert all(method in profile for method in ("teacache", "magcache", "easycache"))
