"""`stepcache bench --pipeline DIR`: the bench on a pipeline folder (here the demo's saved folder, on CPU), and
the clock-and-memory interface its timings go through (CUDA events and peak memory, checked with a stand-in)."""
import json
import subprocess
import sys

import pytest
import torch

from stepcache.timing import CudaMeter, HostMeter, meter_for
from stepcache.wan21.demo import pipeline_folder
from stepcache.wan21.demo.model import DemoPipeline, load

METHODS = "baseline,floor-steps,stepcache-magcache"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return pipeline_folder.save(tmp_path_factory.mktemp("demo") / "pipe", load())


def bench(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", "bench", *args], capture_output=True, text=True,
                          timeout=900, cwd=str(cwd))


@pytest.fixture(scope="module")
def finished(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = bench("--pipeline", str(folder), "--quick", "--device", "cpu", "--methods", METHODS, "--num-prompts",
                   "2", "--out", str(out), cwd=out.parent)
    return out, result


def test_a_quick_bench_on_the_saved_demo_finishes_and_scores_the_pipelines_own_videos(finished):
    out, result = finished
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["model"] == "pipeline" and settings["pipeline_class"] == "StepcacheDemoPipeline"
    assert (settings["height"], settings["width"], settings["frames"], settings["steps"]) == (32, 32, 8, 30)
    assert settings["guidance"] == 2.5 and settings["device"] == "cpu" and settings["dtype"] == "fp32"
    # the demo folder's prompts are the demo's own, in the bench's order: the same pairs as --model demo
    from stepcache.eval.bench import bench_pairs
    assert [tuple(p) for p in settings["pairs"]] == bench_pairs(2, 1)
    # the reference is what the demo model gives for those pairs, bit for bit
    reference = torch.load(out / "reference.pt", weights_only=True)["latents"]
    demo = DemoPipeline(load())
    for latent, (prompt, seed) in zip(reference, settings["pairs"]):
        assert torch.equal(latent, demo.latents([prompt], [seed], steps=30)[0])
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    scored = {r["run"] for r in records if r.get("kind") == "quality" and r.get("status") == "ok"}
    assert "baseline[]" in scored and any(r.startswith("stepcache-magcache") for r in scored)
    timings = [r for r in records if r.get("kind") in ("timing", "baseline_timing")]
    assert timings and all(r["peak_memory"] is None for r in timings)  # the CPU has no device memory to read
    assert all(r["identical"] for r in records if r.get("kind") == "baseline_timing")
    report = json.loads((out / "report.json").read_text())
    magcache = [row for row in report["rows"] if row["method"] == "stepcache-magcache" and row["status"] == "ok"]
    assert magcache and all(0 < row["compute_fraction"] < 1 and row["psnr"] > 20 for row in magcache)


def test_the_same_command_again_only_rebuilds_the_report(folder, finished):
    out, _ = finished
    again = bench("--pipeline", str(folder), "--quick", "--device", "cpu", "--methods", METHODS, "--num-prompts",
                  "2", "--out", str(out), cwd=out.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "every run is finished" in again.stdout


@pytest.mark.parametrize("extra,message", [
    (["--untrained"], "--untrained is for the shipped demo models"),
    (["--model", "demo-experts"], "--model is for the shipped demo models"),
    (["--device", "cuda"], "has no CUDA device"),
    (["--num-prompts", "5", "--prompts", "PROMPTS"], "--prompts has 3 prompts; the bench needs 5 from the start"),
])
def test_bad_input_is_one_line_before_any_model_loads(folder, tmp_path, extra, message):
    (tmp_path / "p.txt").write_text("a red square moving right\na blue disc moving up\na green disc moving down\n")
    extra = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in extra]
    result = bench("--pipeline", str(folder), "--quick", "--out", str(tmp_path / "out"), *extra, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_pipeline_without_prompts_of_its_own_needs_prompts(tmp_path):
    from wan_tiny import save_t2v_folder
    folder = save_t2v_folder(tmp_path / "tiny")
    result = bench("--pipeline", str(folder), "--quick", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "--prompts is required with --pipeline" in result.stderr, result.stderr


def test_two_expert_and_image_pipelines_are_refused_with_what_to_use(tmp_path):
    from wan22_tiny import save_a14b_folder
    folder = save_a14b_folder(tmp_path / "a14b")
    result = bench("--pipeline", str(folder), "--quick", "--prompts", "x.txt", "--out", str(tmp_path / "o"),
                   cwd=tmp_path)
    assert result.returncode == 2 and "two-expert pipeline" in result.stderr and "demo-experts" in result.stderr


# ------------------------------------------------------------------------------------------------ the meters
class FakeEvent:
    def __init__(self, log, clock, enable_timing=False):
        assert enable_timing
        self.log, self.clock, self.at = log, clock, None

    def record(self):
        self.at = self.clock[0]
        self.log.append("record")

    def synchronize(self):
        self.log.append("event-sync")

    def elapsed_time(self, other):
        return (other.at - self.at) * 1000.0  # milliseconds, as CUDA events give them


class FakeCuda:
    """The members of torch.cuda a CudaMeter uses, on a clock the test moves."""

    def __init__(self):
        self.log, self.clock, self.peak = [], [0.0], 0

    def Event(self, enable_timing=False):
        return FakeEvent(self.log, self.clock, enable_timing)

    def synchronize(self, device):
        self.log.append(f"sync {device}")

    def reset_peak_memory_stats(self, device):
        self.log.append(f"reset {device}")
        self.peak = 0

    def max_memory_allocated(self, device):
        return self.peak


def test_the_cuda_meter_times_with_events_and_reads_the_peak_since_its_start():
    cuda = FakeCuda()
    meter = meter_for("cuda:1", cuda=cuda)
    assert isinstance(meter, CudaMeter)
    cuda.peak = 999  # an earlier run's peak is not this one's
    meter.start()
    cuda.clock[0] = 2.5
    cuda.peak = 123 << 20
    assert meter.stop() == (2.5, 123 << 20)
    assert cuda.log == ["sync cuda:1", "reset cuda:1", "record", "record", "event-sync"]


def test_the_cpu_meter_is_the_host_clock_without_memory():
    meter = meter_for("cpu", "cpu")
    assert isinstance(meter, HostMeter) and meter.clock_name == "cpu"
    meter.start()
    seconds, peak = meter.stop()
    assert seconds >= 0 and peak is None


def test_the_bench_records_what_its_meter_reads(folder, tmp_path, monkeypatch):
    """Every timing record carries the meter's seconds and peak memory: the bench reads time and memory only
    through the meter (here a stand-in that reports a fixed peak)."""
    from stepcache import cli
    from stepcache.eval import bench as bench_module

    class Reading(HostMeter):
        def stop(self):
            return super().stop()[0], 7 << 30

    monkeypatch.setattr(bench_module, "meter_for", lambda device, clock: Reading(clock))
    out = tmp_path / "out"
    code = cli.main(["bench", "--pipeline", str(folder), "--quick", "--device", "cpu", "--methods",
                     "baseline,floor-steps", "--num-prompts", "1", "--out", str(out)])
    assert code == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    timings = [r for r in records if r.get("kind") in ("timing", "baseline_timing")]
    assert timings and all(r["peak_memory"] == 7 << 30 for r in timings)


def test_operating_points_run_one_bench_each_and_are_reported_side_by_side(folder, tmp_path):
    """--steps and --guidance as lists: one bench per (steps, guidance), each resumable in its own folder, and
    one page with every point's verdict."""
    out = tmp_path / "points"
    result = bench("--pipeline", str(folder), "--quick", "--device", "cpu", "--methods", "baseline,floor-steps",
                   "--num-prompts", "1", "--steps", "8", "--guidance", "2.5,5", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for guidance in ("2.5", "5"):
        settings = json.loads((out / f"steps8-guidance{guidance}" / "settings.json").read_text())
        assert settings["steps"] == 8 and settings["guidance"] == float(guidance)
    page = (out / "operating-points.md").read_text()
    assert "## steps8-guidance2.5" in page and "## steps8-guidance5" in page
    bad = bench("--pipeline", str(folder), "--steps", "8,8", "--out", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "distinct values" in bad.stderr
