"""The demo model's own tools (prompt-match check, calibration, calibration study, training) refuse bad numbers
and unwritable outputs in one line with exit 2, before any model work."""
from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("tool,args,message", [
    ("check", ["--n", "0"], "argument --n: 0 is too small; allowed: an integer >= 1"),
    ("check", ["--threads", "0"], "argument --threads: 0 is too small"),
    ("check", ["--json", "out.txt"], "--json 'out.txt' must end in .json"),
    ("calibrate_demo", ["--n", "0"], "argument --n: 0 is too small"),
    ("calibrate_demo", ["--steps", "1"], "argument --steps: 1 is too small; allowed: an integer >= 2"),
    ("calibrate_demo", ["--out", "profile.txt"], "--out 'profile.txt' must end in .json"),
    ("calibration_study", ["--threads", "0"], "argument --threads: 0 is too small"),
    ("calibration_study", ["--out", "afile"], "--out 'afile' is a file; give a folder"),
    ("train", ["--out", "run", "--batch", "0"], "argument --batch: 0 is too small"),
])
def test_demo_tools_refuse_bad_input_in_one_line(tool, args, message, tmp_path):
    (tmp_path / "afile").write_text("a file")
    result = subprocess.run([sys.executable, "-m", f"stepcache.wan21.demo.{tool}", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    err = result.stderr.strip()
    assert result.returncode == 2 and message in err and len(err.splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_training_into_a_finished_run_without_resume_is_one_line(tmp_path):
    from stepcache.wan21.demo.train import CHECKPOINT
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "stepcache.wan21.demo.train", "--out", "run"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    err = result.stderr.strip()
    assert result.returncode == 2 and "exists: pass --resume" in err and len(err.splitlines()) == 1, err
