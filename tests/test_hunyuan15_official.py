"""The HunyuanVideo 1.5 drop-ins (hunyuan15/*_generate.py) run by upstream's own generate.main() on a tiny model
(opt-in: HUNYUANVIDEO15_REPO; tests/hunyuan15_official_tiny.py says what stands in for the GPU and the weights).
Each run is a process of its own (tests/hunyuan15_official_worker.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import hunyuanvideo15_checkout
from stepcache.eval.metrics import PSNR_CAP_DB
from stepcache.profiles import load_profile
from test_hunyuan15_diffusers import comfyui_magcache

ROOT = hunyuanvideo15_checkout()
WORKER = Path(__file__).with_name("hunyuan15_official_worker.py")
METHODS = ("magcache", "teacache", "easycache")
THRESH = {"magcache": "--magcache_thresh", "teacache": "--teacache_thresh", "easycache": "--easycache_thresh"}


def tiny_argv(out: Path, steps: int = 12, *extra: str) -> list[str]:
    return ["--prompt", "A cat walks on the grass", "--resolution", "480p", "--model_path", "/nonexistent",
            "--video_length", "9", "--num_inference_steps", str(steps), "--sr", "false", "--seed", "0",
            "--dtype", "fp32", "--group_offloading", "false", "--save_generation_config", "false",
            "--output_path", str(out), *extra]


def run(tmp_path: Path, method: str, *argv: str):
    out = tmp_path / f"run{len(list(tmp_path.glob('*.json')))}"
    done = subprocess.run([sys.executable, str(WORKER), str(ROOT), method, str(out), *argv], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not (out.with_suffix(".json")).exists():
        return done.returncode, done.stderr, None, None
    result = json.loads(out.with_suffix(".json").read_text())
    return result["status"], done.stderr, result, torch.load(str(out) + ".pt")


@pytest.fixture(scope="module")
def other_methods(tmp_path_factory):
    """A profile with TeaCache and EasyCache sections, as `stepcache calibrate` writes one (the published
    HunyuanVideo 1.0 numbers stand in for a calibration: the tests check the machinery, not the values)."""
    hv10, hv15 = load_profile("hunyuanvideo-t2v-720p"), load_profile("hunyuanvideo1.5-t2v")
    data = dict(hv15.data, name="tiny-hv15", teacache=hv10.data["teacache"], easycache=hv10.data["easycache"])
    path = tmp_path_factory.mktemp("profile") / "tiny-hv15.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_threshold_zero_is_bit_identical_to_upstream(tmp_path, other_methods):
    status, err, base, baseline = run(tmp_path, "magcache", *tiny_argv(tmp_path / "base.mp4"), "--cache_method",
                                      "none")
    assert status == 0, err[-2000:]
    assert base["passes"] == 12 and base["ran"] == "C" * 12
    for method in METHODS:
        status, err, result, outputs = run(tmp_path, method, *tiny_argv(tmp_path / f"{method}.mp4"),
                                           "--cache_profile", other_methods, THRESH[method], "0")
        assert status == 0, err[-2000:]
        assert result["ran"] == "C" * 12
        assert all(torch.equal(a, b) for a, b in zip(outputs, baseline)) and len(outputs) == 12, method


@pytest.mark.parametrize("method, extra", [("magcache", ["--magcache_thresh", "0.5"]),
                                           ("teacache", ["--teacache_thresh", "50"]),
                                           ("easycache", ["--easycache_thresh", "20"])])
def test_a_reused_pass_runs_no_block_and_the_stats_are_written(tmp_path, other_methods, method, extra):
    video = tmp_path / "v.mp4"
    status, err, result, _ = run(tmp_path, method, *tiny_argv(video), "--cache_profile", other_methods, *extra)
    assert status == 0, err[-2000:]
    stats = json.loads(video.with_suffix(".stats.json").read_text())
    assert stats["pattern"] == result["ran"] and "." in stats["pattern"]
    assert stats["branches"] == {"cond": {"computed": stats["computed_passes"], "total": 12}}
    assert video.is_file()


@pytest.mark.parametrize("steps, preset", [(20, "E003K2R025"), (40, "E006K2R02"), (50, "E006K3R02")])
def test_the_published_schedule_on_upstreams_batched_cfg(tmp_path, steps, preset):
    """One call per step holds both CFG halves, so the run takes the decisions of the table's conditional column
    (ComfyUI decides per call; its two columns differ by at most 0.025): the published rule's pattern for it. At 20
    steps and fewer the 20-step table is taken, as ComfyUI-MagCache does."""
    status, err, result, _ = run(tmp_path, "magcache", *tiny_argv(tmp_path / "v.mp4", steps), "--cache_preset",
                                 preset)
    assert status == 0, err[-2000:]
    profile = load_profile("hunyuanvideo1.5-t2v-20steps" if steps <= 20 else "hunyuanvideo1.5-t2v")
    settings = profile.method("magcache")["presets"][preset]
    if steps == profile.method("magcache")["steps"]:
        expected = comfyui_magcache(profile.method("magcache")["ratios"], steps, settings["thresh"], settings["K"],
                                    settings["retention_ratio"])[0::2]
        assert result["ran"] == expected
    else:   # another step count: the table resampled, as `stepcache schedule` shows it
        from stepcache.methods import resolve_method
        from stepcache.schedule import simulate
        config = resolve_method("magcache", profile, preset)
        assert result["ran"] == simulate(config, steps, ["pred_cond"]).pattern()
    assert "." in result["ran"]


def reference_image(tmp_path: Path) -> str:
    import numpy as np
    from PIL import Image
    path = tmp_path / "frame.png"
    Image.fromarray((np.random.RandomState(0).rand(120, 200, 3) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("resolution, image", [("480p", True), ("720p", False), ("720p", True)],
                         ids=["480p-i2v", "720p-t2v", "720p-i2v"])
def test_image_to_video_and_720p_run_each_method(tmp_path, other_methods, resolution, image):
    """The variants upstream's one command covers by its flags (--image_path, --resolution): each loads its own
    transformer version and caches on it; threshold 0 is upstream's uncached run bit for bit."""
    def argv(*extra):
        base = tiny_argv(tmp_path / f"v{len(list(tmp_path.glob('*.json')))}.mp4", 8)
        base[base.index("--resolution") + 1] = resolution
        return [*base, *(["--image_path", reference_image(tmp_path)] if image else []), *extra]
    status, err, _, baseline = run(tmp_path, "magcache", *argv("--cache_method", "none"))
    assert status == 0, err[-2000:]
    for method in METHODS:
        status, err, zero, outputs = run(tmp_path, method, *argv("--cache_profile", other_methods, THRESH[method], "0"))
        assert status == 0, err[-2000:]
        assert zero["ran"] == "C" * 8 and all(torch.equal(a, b) for a, b in zip(outputs, baseline)), method
        cached = {"magcache": "0.5", "teacache": "50", "easycache": "5"}[method]
        status, err, result, _ = run(tmp_path, method, *argv("--cache_profile", other_methods, THRESH[method], cached))
        assert status == 0 and "." in result["ran"], (method, err[-2000:])


def test_a_distilled_checkpoint_with_the_shipped_table_is_told_to_calibrate(tmp_path):
    """The shipped tables were calibrated on the undistilled 720p text-to-video checkpoint: a CFG-distilled run
    (another transformer version) still runs with them, and says so before loading and in its stats."""
    video = tmp_path / "v.mp4"
    status, err, result, _ = run(tmp_path, "magcache", *tiny_argv(video, 20), "--cfg_distilled", "true")
    assert status == 0, err[-2000:]
    assert "stepcache note: the shipped table 'hunyuanvideo1.5-t2v-20steps'" in err and "480p_t2v_distilled" in err
    stats = json.loads(video.with_suffix(".stats.json").read_text())
    assert any("480p_t2v_distilled" in note for note in stats["notes"])
    status, err, _, _ = run(tmp_path, "magcache", *tiny_argv(tmp_path / "plain.mp4", 20))
    assert status == 0 and "stepcache note" not in err


@pytest.mark.parametrize("method, argv, words", [
    ("magcache", ["--enable_cache", "true"], "--enable_cache turns on upstream's own cache"),
    ("magcache", ["--magcache_K", "0"], "K=0"),
    ("magcache", ["--teacache_thresh", "0.1"], "--teacache_thresh sets a teacache parameter"),
    ("teacache", [], "has no teacache table"),
    ("magcache", ["--image_path", "frame.png"], "no shipped profile for the 480p_i2v model"),
    ("magcache", ["--cache_method", "none", "--cache_preset", "E006K2R02"], "not used with --cache_method none"),
])
def test_bad_input_is_one_line_before_anything_loads(tmp_path, method, argv, words):
    status, err, result, _ = run(tmp_path, method, *tiny_argv(tmp_path / "v.mp4"), *argv)
    assert status == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if "Warning" not in line and "warn" not in line]
    assert words in lines[-1] and result["passes"] == 0
    assert not (tmp_path / "v.mp4").exists()


def copied_script(tmp_path: Path, method: str) -> Path:
    """The script as a user has it: copied into the root of a checkout (here links to the checkout's generate.py
    and hyvideo/ beside the copy)."""
    where = tmp_path / "checkout"
    where.mkdir()
    for name in ("generate.py", "hyvideo"):
        (where / name).symlink_to(ROOT / name)
    script = where / f"{method}_generate.py"
    script.write_text((Path(__file__).resolve().parents[1] / "hunyuan15" / script.name).read_text())
    return script


def run_copied(script: Path, *argv: str) -> subprocess.CompletedProcess:
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPCACHE_TEST_HV15_ROOT": str(ROOT),
           "PYTHONPATH": os.pathsep.join([str(tests / "hunyuan15_sitecustomize"), str(tests)])}
    return subprocess.run([sys.executable, script.name, *argv], cwd=script.parent, capture_output=True, text=True,
                          timeout=600, env=env)


def test_a_copied_script_runs_as_a_command(tmp_path):
    script = copied_script(tmp_path, "magcache")
    video = tmp_path / "out" / "cat.mp4"
    done = run_copied(script, *tiny_argv(video, 20))
    assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads(video.with_suffix(".stats.json").read_text())
    assert video.is_file() and stats["profile"] == "hunyuanvideo1.5-t2v-20steps" and "." in stats["pattern"]
    assert "magcache: computed" in done.stdout
    bad = run_copied(script, *tiny_argv(tmp_path / "x.mp4"), "--magcache_K", "0")
    assert bad.returncode == 2 and "K=0" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "x.mp4").exists()


# ------------------------------------------------------------------------------ the bench (bench_generate.py)
BUILT_IN_SCHEDULE = ["--cache_start_step", "3", "--cache_end_step", "10", "--cache_step_interval", "3",
                     "--total_steps", "12", "--no_cache_block_id", "1"]  # steps 0-2, 3, 6, 9, 10-11: 8 of 12


def bench_argv(*extra: str) -> list[str]:
    argv = tiny_argv(Path("unused.mp4"))
    cut = argv.index("--output_path")
    return [*argv[:cut], *argv[cut + 2:], *extra]


@pytest.fixture(scope="module")
def tiny_presets(other_methods, tmp_path_factory):
    """The calibration stand-in with `medium` presets where the tiny random model reuses about half its passes
    (the bench starts its threshold search there, as `stepcache tune` does)."""
    data = json.loads(Path(other_methods).read_text())
    data["name"] = "tiny-hv15-presets"
    data["teacache"]["presets"]["medium"] = {"thresh": 40.0}
    data["easycache"]["presets"]["medium"] = {"thresh": 2.0}
    path = tmp_path_factory.mktemp("presets") / "tiny-hv15-presets.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_bench_runs_upstreams_caches_beside_stepcaches_at_equal_computed_steps(tmp_path, tiny_presets):
    import hunyuan15_official_tiny as T
    if not T.angelslim_caches():
        pytest.skip("upstream's caches need angelslim: pip install --no-deps angelslim==0.2.2")
    script = copied_script(tmp_path, "bench")
    out = tmp_path / "bench"
    done = run_copied(script, *bench_argv("--bench_out", str(out), "--cache_profile", tiny_presets,
                                          *BUILT_IN_SCHEDULE))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = {r["run"]: r for r in results["runs"]}
    assert list(rows) == ["uncached", "upstream-deepcache", "upstream-teacache", "upstream-taylorcache",
                          "fewer-steps", "magcache", "teacache", "easycache", "uncached-again"]
    assert all((out / f"{name}.mp4").is_file() for name in rows) and not list((out / ".partial").iterdir())
    assert rows["uncached"]["pattern"] == "C" * 12 and rows["uncached-again"]["psnr"] == PSNR_CAP_DB
    # upstream's schedule, observed on the blocks: full steps 0-2, 3, 6, 9, 10, 11; DeepCache runs block 1 between
    assert rows["upstream-teacache"]["pattern"] == rows["upstream-taylorcache"]["pattern"] == "CCCC..C..CCC"
    assert rows["upstream-deepcache"]["pattern"] == "CCCCccCccCCC"
    assert results["budget"] == 8 and rows["fewer-steps"]["pattern"] == "C" * 8
    for method in ("magcache", "teacache", "easycache"):
        row = rows[method]
        assert row["full_passes"] <= 8 and row["pattern"].count("C") == row["full_passes"], method
        assert 0 < row["psnr"] < PSNR_CAP_DB
    assert rows["magcache"]["full_passes"] == 8  # found on the table: exactly the budget
    assert rows["teacache"]["tries"][-1]["full_passes"] <= 8 and rows["teacache"]["fits"]
    assert "wall-clock spread of the two uncached runs" in done.stdout


@pytest.mark.parametrize("argv, words", [
    ([], "--bench_out DIR is required"),
    (["--bench_out", "B", "--output_path", "x.mp4"], "--output_path: the bench writes each run's video"),
    (["--bench_out", "B", "--bench_runs", "uncached,fast"], "unknown run fast"),
    (["--bench_out", "B", "--bench_runs", "uncached,teacache", "--bench_passes", "6"], "has no teacache table"),
    (["--bench_out", "B", "--bench_runs", "uncached,magcache"], "keep one of them in --bench_runs"),
    (["--bench_out", "B", "--bench_passes", "12"], "--bench_passes 12: between 2 and 11"),
])
def test_the_bench_refuses_bad_flags_in_one_line_before_loading(tmp_path, argv, words):
    script = copied_script(tmp_path, "bench")
    done = run_copied(script, *bench_argv(*argv))
    assert done.returncode == 2, done.stderr[-2000:]
    assert words in done.stderr.strip().splitlines()[-1]
    assert not (script.parent / "B").exists()
