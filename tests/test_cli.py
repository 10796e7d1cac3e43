"""The `stepcache` command: schedule, profiles, generate (end to end on a tiny local pipeline folder)."""
import json
import subprocess
import sys

import pytest

from stepcache.cli import main


def stepcache(*args):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", *args], capture_output=True, text=True)


def test_schedule_prints_pattern_and_count(capsys):
    assert main(["schedule", "--profile", "hunyuanvideo-t2v-720p", "--method", "magcache", "--steps", "50",
                 "--thresh", "0.24", "--K", "6", "--retention", "0.2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "CCCCCCCCCC....C...C....C.....C....C......C....C.CC" in out
    assert "computed 19/50 passes (ideal speedup 2.63x)" in out


def test_schedule_of_a_calibrated_file_at_another_step_count(tmp_path, capsys):
    from stepcache.profiles import load_profile
    data = json.loads(load_profile("wan2.1-t2v-1.3b").path.read_text())
    data["name"] = "my-wan"
    path = tmp_path / "my-wan.json"
    path.write_text(json.dumps(data))
    assert main(["schedule", "--profile", str(path), "--steps", "25"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines[2]) == 50 and lines[3].startswith("computed ")


def test_schedule_no_cfg_simulates_one_branch(capsys):
    assert main(["schedule", "--profile", "wan2.1-t2v-1.3b", "--no-cfg"]) == 0
    assert "/50 passes" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--method", "teacache"], "TeaCache decides from the change of a model activation"),
    (["--method", "easycache"], "depends on the input"),
    (["--K", "0"], "K=0 is outside the allowed range [1, inf]"),
    (["--thresh", "-1"], "thresh=-1.0 is outside the allowed range [0, inf]"),
    (["--retention", "1.5"], "retention_ratio=1.5 is outside the allowed range [0, 1)"),
    (["--steps", "1"], "argument --steps: 1 is too small; allowed: an integer >= 2"),
])
def test_schedule_errors_exit_nonzero_with_the_reason(args, message):
    result = stepcache("schedule", "--profile", "wan2.1-t2v-1.3b", *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_schedule_unknown_profile_lists_known_ones():
    result = stepcache("schedule", "--profile", "wan2.2-t2v-5b")
    assert result.returncode == 2
    assert "Known profiles: " in result.stderr and "hunyuanvideo-t2v-720p" in result.stderr
    assert "stepcache calibrate" in result.stderr


def test_profiles_lists_every_shipped_profile(capsys):
    from stepcache.profiles import known_profiles
    assert main(["profiles"]) == 0
    out = capsys.readouterr().out
    for name in known_profiles():
        assert f"{name}:" in out


def test_help_lists_subcommands():
    result = stepcache("--help")
    assert result.returncode == 0
    for name in ("schedule", "generate", "compare", "profiles"):
        assert name in result.stdout


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from wan_tiny import save_t2v_folder
    return save_t2v_folder(tmp_path_factory.mktemp("model") / "tiny-wan")


GEN = ["--prompt", "a red ball moves left", "--height", "32", "--width", "32", "--frames", "5", "--steps", "12",
       "--dtype", "fp32", "--device", "cpu", "--fps", "4"]


def test_generate_end_to_end_then_compare(tiny_folder, tmp_path):
    base = stepcache("generate", "--model", str(tiny_folder), "--method", "none", *GEN,
                     "--out", str(tmp_path / "base" / "ball.mp4"))
    assert base.returncode == 0, base.stderr
    cached = stepcache("generate", "--model", str(tiny_folder), "--method", "magcache", "--profile", "wan2.1-t2v-1.3b",
                       "--thresh", "0.24", "--K", "4", *GEN, "--out", str(tmp_path / "mag" / "ball.mp4"))
    assert cached.returncode == 0, cached.stderr
    assert "magcache: computed" in cached.stdout
    stats = json.loads((tmp_path / "mag" / "ball.stats.json").read_text())
    assert stats["total_passes"] == 24 and 0 < stats["computed_passes"] < 24
    assert len(stats["pattern"]) == 24 and stats["profile"] == "wan2.1-t2v-1.3b"
    manifest = json.loads((tmp_path / "mag" / "manifest.json").read_text())
    assert manifest["method"] == "magcache" and manifest["videos"]["ball.mp4"]["computed_passes"] == \
        stats["computed_passes"]
    report = tmp_path / "report"
    compared = stepcache("compare", "--gt_video_dir", str(tmp_path / "base"), "--generated_video_dir",
                         str(tmp_path / "mag"), "--no-lpips", "--out", str(report))
    assert compared.returncode == 0, compared.stderr
    assert (report / "metrics.json").exists()


@pytest.mark.parametrize("args,message", [
    (["--method", "teacache", "--K", "3"], "--K do(es) not apply to teacache"),
    (["--method", "magcache", "--profile", "wan2.1-t2v-1.3b", "--K", "0"], "K=0 is outside the allowed range"),
    (["--method", "magcache"], "no shipped profile matches the transformer"),
    (["--method", "magcache", "--profile", "nope"], "unknown profile 'nope'"),
    (["--method", "none", "--height", "40"], "must be multiples of 16"),
])
def test_generate_rejects_bad_input_before_loading(tiny_folder, tmp_path, capsys, args, message):
    # in this process (the command as installed runs in test_generate_end_to_end_then_compare)
    assert main(["generate", "--model", str(tiny_folder), *GEN, *args, "--out", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.mp4").exists()


def test_generate_rejects_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), *GEN]) == 2
    assert "is not a diffusers pipeline folder" in capsys.readouterr().err
