"""The GPU check script, run here on the CPU on the demo's saved folder (dynamo's eager backend: inductor's
compile time is the user's GPU run's business)."""
import subprocess
import sys

import pytest

from stepcache.wan21.demo import pipeline_folder
from stepcache.wan21.demo.model import load

pytest.importorskip("diffusers")


@pytest.mark.parametrize("method", ["magcache", "teacache"])
def test_the_gpu_check_passes_its_four_checks_on_the_demo_folder(tmp_path, method):
    folder = pipeline_folder.save(tmp_path / "demo", load())
    result = subprocess.run([sys.executable, "-m", "stepcache.eval.gpu_check", "--pipeline", str(folder),
                             "--device", "cpu", "--backend", "eager", "--method", method, "--steps", "12"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "1. threshold 0 against uncached: PASS, bit-identical" in out
    assert "2. memory: the cache held" in out and ": PASS;" in out
    assert "3. cache in host memory: PASS, the same decisions and latents" in out
    assert "4. compiled (eager, regional, fullgraph) and cached: PASS" in out and "all checks passed" in out


def test_a_bad_pipeline_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "stepcache.eval.gpu_check", "--pipeline", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "is not a diffusers pipeline folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
