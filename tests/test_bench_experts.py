"""`stepcache bench --model demo-experts`: the two-expert bench runs end to end (on random weights: plumbing
only), its equal-pass table interpolates along each sweep and never extrapolates, and bad input is one line."""
import json
import subprocess
import sys

import pytest

from stepcache.eval.bench_experts import at_equal_passes, one_expert_rows


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", "bench", "--model", "demo-experts", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_equal_passes_interpolates_within_a_sweep_only():
    records = [{"method": "magcache", "rule": "shared", "passes": 0.4, "psnr": 30.0},
               {"method": "magcache", "rule": "shared", "passes": 0.8, "psnr": 40.0},
               {"method": "fewer-steps", "rule": "-", "passes": 0.5, "psnr": 35.0}]
    table = at_equal_passes(records, (0.3, 0.5, 0.6, 0.8))
    assert table["magcache shared"] == {"30%": None, "50%": 32.5, "60%": 35.0, "80%": 40.0}
    assert table["fewer-steps"] == {"30%": None, "50%": 35.0, "60%": None, "80%": None}


def test_one_expert_runs_are_compared_with_both_at_the_same_passes():
    records = [{"method": "teacache", "rule": "separate", "params": {"thresh": t}, "passes": p, "psnr": q}
               for t, p, q in ((0.1, 0.4, 35.0), (0.05, 0.6, 38.0))]
    records.append({"method": "teacache", "rule": "separate, low only", "params": {"thresh": 0.1}, "passes": 0.5,
                    "psnr": 36.0})
    assert at_equal_passes(records, (0.5,)) == {"teacache separate": {"50%": 36.5}}  # not a sweep of its own
    assert one_expert_rows(records) == [{"method": "teacache", "cached": "low only", "params": {"thresh": 0.1},
                                         "passes": 0.5, "psnr": 36.0, "both_at_same_passes": 36.5}]


def test_quick_untrained_run_writes_both_rules_fewer_steps_and_diffusers(tmp_path):
    result = bench("--quick", "--untrained", "--num-prompts", "1", "--steps", "12", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "b" / "experts.json").read_text())
    rows = {(r["method"], r["rule"]) for r in data["runs"]}
    for method in ("magcache", "teacache", "easycache"):
        assert {(method, "shared"), (method, "separate")} <= rows
    assert ("fewer-steps", "-") in rows and ("diffusers-fbc", "per-model") in rows
    assert {("diffusers-magcache", "own steps"), ("diffusers-magcache", "all steps")} <= rows
    ratios = json.loads((tmp_path / "b" / "calibration" / "diffusers-magcache-experts.json").read_text())
    assert (len(ratios["high"]), len(ratios["low"])) == (4, 8)  # each expert's own steps: 4 and 12 - 4
    assert data["switch_step"] == 4 and data["model"]["label"].startswith("UNTRAINED")
    for r in data["runs"]:
        assert 0 < r["passes"] <= 1.0001 and r["psnr"] > 0
    profile = json.loads((tmp_path / "b" / "calibration" / "stepcache-profile.json").read_text())
    assert profile["model"]["experts"]["switch_step"] == 4 and profile["magcache"]["retention_zones"]
    assert "| magcache | shared |" in (tmp_path / "b" / "experts.md").read_text()


@pytest.mark.parametrize("args,message", [
    (["--steps", "3"], "--steps 3 is too few"),
    (["--budgets", "1.5"], "--budgets value 1.5 is outside (0, 1)"),
])
def test_bad_input_is_one_line_before_any_model(tmp_path, args, message):
    result = bench("--untrained", "--out", str(tmp_path / "b"), *args, timeout=120)
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "b").exists()
