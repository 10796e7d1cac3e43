"""The Wan2.2 drop-in scripts copied into a Wan2.2 checkout as a user copies them, and run there as a user runs them:
``python magcache_generate.py <upstream's flags + the published cache flags>`` in a subprocess, in the checkout's
root, where the script imports upstream's ``generate.py`` from its own folder.

The checkout is a copy of ``WAN22_REPO`` (upstream's files as they are) in a temporary folder, with the three files of
wan22/ copied into its root. Without weights or a GPU, the subprocess gets wan22_official_tiny's stand-ins through
wan22_sitecustomize/sitecustomize.py (tiny models behind ``wan.WanT2V`` / ``WanI2V`` / ``WanTI2V``, SDPA attention,
64*64 in the size tables, ``save_video`` by ``torch.save``), installed when the script imports ``generate`` and only
for a ``generate.py`` found where Python finds it for the script: a script outside a checkout fails as it would for a
user (test_a_script_outside_a_checkout_says_where_it_belongs).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import wan22_checkout

REPO = wan22_checkout()  # skips the module without WAN22_REPO

from test_wan22_official import (EASYCACHE_COMMANDS, MAGCACHE_COMMANDS, checkpoint_layout,  # noqa: E402
                                 command_argv, replaced)
from test_wan22_profiles import PUBLISHED  # noqa: E402
from wan22_official_tiny import TINY_SIZE, load  # noqa: E402

TESTS = Path(__file__).resolve().parent
DROPINS = TESTS.parent / "wan22"
SCRIPTS = ("magcache_generate.py", "teacache_generate.py", "easycache_generate.py")
SITECUSTOMIZE = TESTS / "wan22_sitecustomize"
T2V_CKPT, TI2V_CKPT = "Wan2.2-T2V-A14B", "Wan2.2-TI2V-5B"  # folders in the checkout (EasyCache4Wan2.2's names)
_, STEPS, THRESH, K, RETENTION, _, _, COMPUTED, TOTAL, PATTERN = PUBLISHED[2]  # the README's T2V-A14B command
assert MAGCACHE_COMMANDS[2].split()[3] == "t2v-A14B" and (STEPS, COMPUTED, TOTAL) == (40, 52, 80)
SWITCH = 26  # wan2.2-t2v-a14b's first low-noise step at 40 steps (the profile's boundary data)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the Wan2.2 checkout with the drop-ins in its root, the checkpoint folders (empty placeholders of
    the files upstream opens) in it, and nothing else of stepcache's."""
    root = tmp_path_factory.mktemp("user") / "Wan2.2"
    shutil.copytree(REPO, root, ignore=shutil.ignore_patterns("__pycache__", ".git"))
    for name in SCRIPTS:
        shutil.copy(DROPINS / name, root / name)
    configs = load(str(REPO)).configs.WAN_CONFIGS
    checkpoint_layout(root / T2V_CKPT, configs["t2v-A14B"])
    checkpoint_layout(root / TI2V_CKPT, configs["ti2v-5B"])
    return root


def run(folder, script, argv, trace=None):
    """``python <script> <argv>`` in ``folder``, with the stand-ins; ``trace``: where the stand-ins record what ran."""
    # One torch thread, as conftest.py sets for the test process: two threads on these 2-core machines make the
    # tiny T2V run 4x slower.
    env = dict(os.environ, STEPCACHE_TEST_WAN22_STANDINS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(SITECUSTOMIZE), str(TESTS), os.environ.get("PYTHONPATH")])))
    env.pop("STEPCACHE_TEST_WAN22_TRACE", None)
    if trace is not None:
        env["STEPCACHE_TEST_WAN22_TRACE"] = str(trace)
    return subprocess.run([sys.executable, script, *argv], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def done(result, code=0):
    assert result.returncode == code, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def read_json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def t2v_argv(save_file):
    argv = replaced(command_argv(MAGCACHE_COMMANDS[2]), "--size", TINY_SIZE)
    return replaced(argv, "--ckpt_dir", f"./{T2V_CKPT}") + ["--frame_num", "5", "--save_file", save_file]


def check_run(checkout, trace, video, kind):
    """The video the torch.save stand-in wrote, and the trace: the copied checkout's generate.py, one sampler
    built; returns the per-model block work."""
    assert torch.load(checkout / video).dim() == 5  # generate.py's video[None]
    trace = read_json(trace)
    assert trace["generate_file"] == str(checkout / "generate.py")
    assert trace["samplers"] == [kind]
    return "".join(trace["ran"])


def test_readme_t2v_command_runs_the_published_schedule(checkout, tmp_path):
    result = done(run(checkout, "magcache_generate.py", t2v_argv("out/t2v.mp4"), tmp_path / "trace.json"))
    assert "[stepcache] magcache on profile wan2.2-t2v-a14b: thresh=0.06, K=2, retention_ratio=0.4" in result.stdout
    stats = read_json(checkout / "out" / "t2v.stats.json")
    assert (stats["script"], stats["method"], stats["profile"]) == ("magcache_generate.py", "magcache",
                                                                     "wan2.2-t2v-a14b")
    assert stats["params"] == {"thresh": THRESH, "K": K, "retention_ratio": RETENTION}
    assert (stats["computed_passes"], stats["total_passes"]) == (COMPUTED, TOTAL)
    assert stats["pattern"] == PATTERN and stats["sample_steps"] == STEPS
    high, low = PATTERN[:2 * SWITCH], PATTERN[2 * SWITCH:]
    assert list(stats["experts"].items()) == [
        ("high", {"computed": high.count("C"), "total": len(high), "first_step": 0}),
        ("low", {"computed": low.count("C"), "total": len(low), "first_step": SWITCH})]
    # Counted inside the tiny experts' blocks in the subprocess: exactly the computed passes ran.
    assert check_run(checkout, tmp_path / "trace.json", "out/t2v.mp4", "WanT2V") == PATTERN


def test_readme_t2v_command_with_separate_expert_states(checkout, tmp_path):
    argv = t2v_argv("out/separate.mp4") + ["--cache_experts", "separate"]
    done(run(checkout, "magcache_generate.py", argv, tmp_path / "trace.json"))
    stats = read_json(checkout / "out" / "separate.stats.json")
    assert stats["params"] == {"thresh": THRESH, "K": K, "retention_ratio": RETENTION, "experts": "separate"}
    assert stats["total_passes"] == TOTAL and stats["pattern"] != PATTERN  # one state per expert: another schedule
    assert check_run(checkout, tmp_path / "trace.json", "out/separate.mp4", "WanT2V") == stats["pattern"]


def test_easycache_ti2v_command_runs(checkout, tmp_path):
    argv = replaced(command_argv(EASYCACHE_COMMANDS[1]), "--size", TINY_SIZE)
    assert argv[argv.index("--ckpt_dir") + 1] == f"./{TI2V_CKPT}" and "--image" not in argv
    argv += ["--sample_steps", "8", "--frame_num", "5", "--save_file", "out/ti2v.mp4"]
    result = done(run(checkout, "easycache_generate.py", argv, tmp_path / "trace.json"))
    assert "[stepcache] easycache on profile wan2.2-ti2v-5b: thresh=0.05, warmup_steps=7" in result.stdout
    stats = read_json(checkout / "out" / "ti2v.stats.json")
    assert (stats["method"], stats["profile"], stats["task"]) == ("easycache", "wan2.2-ti2v-5b", "ti2v-5B")
    assert stats["total_passes"] == len(stats["pattern"]) == 16 and stats["experts"] == {}
    assert check_run(checkout, tmp_path / "trace.json", "out/ti2v.mp4", "WanTI2V") == stats["pattern"]
    # Upstream's generate.py ignores every warning when it is imported; stepcache's own still reach the user:
    # the tiny checkpoint is not the model the profile was measured on, and the run says so.
    assert "ProfileFitWarning: stepcache: the checkpoint in --ckpt_dir is not the model profile " \
           "wan2.2-ti2v-5b was measured on" in result.stderr


def test_teacache_without_a_profile_stops_with_one_line(checkout, tmp_path):
    before = sorted(os.listdir(checkout))
    argv = ["--task", "t2v-A14B", "--size", TINY_SIZE, "--ckpt_dir", f"./{T2V_CKPT}", "--frame_num", "5",
            "--save_file", "refused/t2v.mp4"]
    result = done(run(checkout, "teacache_generate.py", argv, tmp_path / "trace.json"), code=2)
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("teacache_generate.py: error: no TeaCache coefficients are published "
                                               "for Wan2.2") and "`stepcache calibrate`" in err[0], result.stderr
    assert sorted(os.listdir(checkout)) == before  # no refused/, no video named by upstream
    trace = read_json(tmp_path / "trace.json")
    assert trace["generate_file"] == str(checkout / "generate.py") and trace["samplers"] == []


def test_help_shows_upstreams_flags_and_ours(checkout):
    out = done(run(checkout, "magcache_generate.py", ["--help"])).stdout
    for flag in ("--task", "--offload_model", "--convert_model_dtype", "--t5_cpu",  # upstream's parser
                 "--use_magcache", "--magcache_thresh", "--retention_ratio", "--cache_experts", "--cache_profile"):
        assert flag in out, flag


def test_a_script_outside_a_checkout_says_where_it_belongs(tmp_path):
    """The stand-ins do not make a checkout: the same script in a folder without generate.py stops as a user's
    would (so the runs above used the generate.py beside the copied script)."""
    shutil.copy(DROPINS / "magcache_generate.py", tmp_path / "magcache_generate.py")
    result = done(run(tmp_path, "magcache_generate.py", ["--help"]), code=2)
    assert result.stderr.strip().splitlines() == [
        "magcache_generate.py: error: upstream Wan2.2's generate.py is not importable: copy this script into the root "
        "of a Wan-Video/Wan2.2 checkout and run it from there"]
