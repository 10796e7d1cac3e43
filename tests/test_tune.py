"""`stepcache tune`: per target speedup, the best setting of each method (and the overall pick, which may be fewer
steps) on tuning prompts, checked on held-out prompts, written as presets named by speed (on the demo's saved
pipeline folder, on CPU, with a small search so that it stays quick)."""
import json
import subprocess
import sys

import pytest
import torch

import stepcache
from stepcache.profiles import ProfileFitWarning
from stepcache.wan21.demo import pipeline_folder
from stepcache.wan21.demo.model import load

SMALL = ["--tune-prompts", "2", "--heldout-prompts", "2", "--calibration-pairs", "2", "--device", "cpu"]


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", *args], capture_output=True, text=True,
                          timeout=900, cwd=str(cwd))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return pipeline_folder.save(tmp_path_factory.mktemp("demo") / "pipe", load())


@pytest.fixture(scope="module")
def tuned(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune") / "mine.json"
    result = cli("tune", "--pipeline", str(folder), "--speedups", "2,3", "--methods", "magcache", *SMALL,
                 "--out", str(out), cwd=out.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, json.loads(out.read_text()), result.stdout


def test_each_pick_is_the_best_run_that_reaches_its_speed_and_is_checked_held_out(tuned):
    _, data, stdout = tuned
    tuned_block = data["tuned"]
    assert tuned_block["operating_point"] == {"steps": 30, "guidance": 2.5, "height": 32, "width": 32, "frames": 8,
                                              "dtype": "fp32", "device": "cpu"}
    tuning = {tuple(p) for p in tuned_block["tuning_pairs"]}
    assert tuning and not tuning & {tuple(p) for p in tuned_block["heldout_pairs"]}
    for level, target in (("2x", 2.0), ("3x", 3.0)):
        result = tuned_block["speedups"][level]
        reaching = [r for r in tuned_block["runs"] if r["which"] == "tune" and r["ideal_speedup"] >= target - 1e-9]
        assert result["pick"]["psnr"] == max(r["psnr"] for r in reaching)
        held = result["heldout"]
        assert held["which"] == "heldout" and held["method"] == result["pick"]["method"]
        assert held["params"] == result["pick"]["params"] and held["ideal_speedup"] >= target - 0.5
        assert f"{level}: best" in stdout
    # fewer steps is always among the candidates: the floor a cache has to beat
    assert {r["method"] for r in tuned_block["runs"]} >= {"floor-steps", "stepcache-magcache"}


def test_presets_named_by_speed_are_listed_and_run_at_their_speed(tuned, folder, tmp_path):
    path, data, _ = tuned
    listed = cli("schedule", "--profile", str(path), "--list-presets", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = [line.split() for line in listed.stdout.splitlines() if line.startswith("  magcache")]
    assert {"2x", "3x"} <= {row[1] for row in rows}
    pipe = pipeline_folder.load(folder)
    for level, target in (("2x", 2.0), ("3x", 3.0)):
        stepcache.enable(pipe, "magcache", profile=str(path), preset=level)
        pipe("a red square moving right on a dark background", generator=torch.Generator().manual_seed(3),
             output_type="latent")
        computed, total = stepcache.stats(pipe).counts()
        stepcache.disable(pipe)
        assert total / computed >= target  # MagCache's schedule is the same on every prompt
    result = cli("generate", "--model", str(folder), "--profile", str(path), "--preset", "2x", "--prompt",
                 "a blue disc moving up on a light background", "--device", "cpu", "--out",
                 str(tmp_path / "v" / "blue.mp4"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "v" / "blue.stats.json").read_text())["computed_passes"] <= 30


def test_a_tuned_profile_warns_at_another_step_count(tuned, folder):
    path, _, _ = tuned
    pipe = pipeline_folder.load(folder)
    stepcache.enable(pipe, "magcache", profile=str(path), preset="2x")
    with pytest.warns(ProfileFitWarning, match="was tuned at 30 steps"):
        pipe("a red square moving right on a dark background", num_inference_steps=20,
             generator=torch.Generator().manual_seed(3), output_type="latent")
    assert any("tuned at 30 steps" in note for note in stepcache.stats(pipe).to_dict()["notes"])
    stepcache.disable(pipe)


def test_a_tuned_profile_warns_at_another_guidance_and_not_at_its_own(tuned, folder):
    import warnings
    path, _, _ = tuned
    pipe = pipeline_folder.load(folder)
    stepcache.enable(pipe, "magcache", profile=str(path), preset="2x")
    with pytest.warns(ProfileFitWarning, match="this generation has guidance 5, so"):
        pipe("a red square moving right on a dark background", guidance_scale=5.0,
             generator=torch.Generator().manual_seed(3), output_type="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProfileFitWarning)     # at its own operating point: silent
        pipe("a red square moving right on a dark background", guidance_scale=2.5,
             generator=torch.Generator().manual_seed(3), output_type="latent")
    stepcache.disable(pipe)


@pytest.mark.parametrize("extra,message", [
    (["--speedups", "1"], "each speedup must be a number > 1"),
    (["--speedups", "2,fast"], "give comma-separated numbers"),
    (["--speedups", "2", "--methods", "fastcache"], "--methods 'fastcache'"),
    (["--speedups", "2", "--tune-prompts", "200"], "--prompts has 144 prompts; stepcache tune needs 206"),
])
def test_bad_input_is_one_line_before_any_model_loads(folder, tmp_path, extra, message):
    result = cli("tune", "--pipeline", str(folder), "--out", str(tmp_path / "p.json"), *extra, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.json").exists()


def test_the_output_must_be_a_profile_file(folder, tmp_path):
    result = cli("tune", "--pipeline", str(folder), "--speedups", "2", "--out", str(tmp_path / "p.txt"),
                 cwd=tmp_path)
    assert result.returncode == 2 and "ends in .json" in result.stderr


def test_schedule_speedup_gives_the_least_error_setting_that_reaches_it(tmp_path):
    """From a table alone: every listed setting reaches the speedup, the first has the least estimated error, and
    its printed setting gives that speedup through `stepcache schedule`."""
    import re
    result = cli("schedule", "--profile", "wan2.1-t2v-1.3b", "--speedup", "2.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"\{'thresh': ([\d.e-]+), 'K': (\d+), 'retention_ratio': ([\d.]+)\}\s+([\d.]+)x\s+estimated "
                      r"error ([\d.]+)", result.stdout)
    assert len(rows) >= 3 and all(float(r[3]) >= 2.5 for r in rows)
    errors = [float(r[4]) for r in rows]
    assert errors == sorted(errors)
    thresh, k, retention = rows[0][:3]
    check = cli("schedule", "--profile", "wan2.1-t2v-1.3b", "--thresh", thresh, "--K", k, "--retention", retention,
                cwd=tmp_path)
    computed, total = map(int, re.search(r"computed (\d+)/(\d+) passes", check.stdout).groups())
    assert total / computed >= 2.5
    bad = cli("schedule", "--profile", "wan2.1-t2v-1.3b", "--speedup", "0.5", cwd=tmp_path)
    assert bad.returncode == 2 and "--speedup 0.5" in bad.stderr


def test_schedule_speedup_shows_a_tuned_preset_first(tuned, tmp_path):
    path, _, _ = tuned
    result = cli("schedule", "--profile", str(path), "--speedup", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith("tuned on your model (stepcache tune): preset 2x")


def test_an_image_to_video_pipeline_is_tuned_on_its_prompts_first_frames(tmp_path):
    from test_bench_pipeline import I2V, image_prompts
    from wan_tiny import save_i2v_folder
    folder = save_i2v_folder(tmp_path / "i2v")
    prompts, _ = image_prompts(tmp_path / "inputs")
    out = tmp_path / "i2v.json"
    result = cli("tune", "--pipeline", str(folder), "--prompts", str(prompts), "--speedups", "2", "--methods",
                 "magcache", "--tune-prompts", "1", "--heldout-prompts", "1", "--calibration-pairs", "2", *I2V,
                 "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["tuned"]["operating_point"]["steps"] == 8 and "2x" in data["magcache"]["presets"]


def test_a_two_expert_pipeline_is_tuned_on_the_work_of_both_experts(tmp_path):
    from diffusers import DiffusionPipeline  # noqa: F401  (the folder loads through diffusers)
    from stepcache.generate import load_pipeline, pipeline_of
    from wan22_tiny import save_a14b_folder
    folder = save_a14b_folder(tmp_path / "a14b")
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a {c} ball moves {d} on grass" for c in ("red", "blue") for d in ("left", "right")))
    out = tmp_path / "a14b.json"
    result = cli("tune", "--pipeline", str(folder), "--prompts", str(prompts), "--speedups", "2", "--methods",
                 "magcache", "--tune-prompts", "1", "--heldout-prompts", "1", "--calibration-pairs", "2", "--device",
                 "cpu", "--height", "32", "--width", "32", "--frames", "5", "--steps", "10", "--dtype", "fp32",
                 "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    preset = data["magcache"]["presets"]["2x"]
    run = next(r for r in data["tuned"]["runs"] if r["method"] == "stepcache-magcache" and r["which"] == "tune"
               and all(r["params"].get(k) == v for k, v in preset.items() if k in r["params"]))
    # the ideal speedup the tuner recorded is stepcache's own count over both experts' passes
    pipeline_class, _, spec = pipeline_of(folder)
    pipe = load_pipeline(folder, pipeline_class, spec, "fp32", "cpu")
    stepcache.enable(pipe, "magcache", profile=str(out), preset="2x")
    pipe(prompt="a red ball moves left on grass", height=32, width=32, num_frames=5, num_inference_steps=10,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    computed, total = stepcache.stats(pipe).counts()
    stepcache.disable(pipe)
    assert total == 20 and run["ideal_speedup"] == pytest.approx(total / computed, rel=1e-3)
