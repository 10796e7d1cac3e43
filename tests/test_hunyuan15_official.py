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
