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
    # the demo's videos are read back against their prompts, the baseline's too; the real Wan figures sit beside
    baseline = next(row for row in report["rows"] if row.get("reference"))
    assert baseline["prompt_match"] == 1.0 and all(row["prompt_match"] is not None for row in magcache)
    table = (out / "table.md").read_text()
    assert "prompt match |" in table and "## Published figures beside this run" in table
    assert report["published"]["family"] == "wan2.1"


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


def image_prompts(root, count=5):
    """--prompts FILE.json for an image-to-video pipeline: each prompt with its own first frame (paths relative to
    the file)."""
    from PIL import Image
    import numpy as np
    (root / "frames").mkdir(parents=True)
    entries = []
    for i in range(count):
        frame = np.zeros((32, 32, 3), np.uint8)
        frame[8:20, 4 + 2 * i:16 + 2 * i] = (255, 40 * i, 0)
        Image.fromarray(frame).save(root / "frames" / f"{i}.png")
        entries.append({"prompt": f"a red ball moves {'left' if i % 2 else 'right'} on grass {'a ' * i}".strip(),
                        "image": f"frames/{i}.png"})
    (root / "prompts.json").write_text(json.dumps(entries))
    return root / "prompts.json", entries


I2V = ["--device", "cpu", "--height", "32", "--width", "32", "--frames", "5", "--steps", "8", "--dtype", "fp32"]


def test_an_image_to_video_pipeline_is_benched_with_each_prompts_own_first_frame(tmp_path):
    from wan_tiny import save_i2v_folder
    folder = save_i2v_folder(tmp_path / "i2v")
    prompts, entries = image_prompts(tmp_path / "inputs")
    out = tmp_path / "out"
    result = bench("--pipeline", str(folder), "--prompts", str(prompts), "--quick", "--num-prompts", "1", *I2V,
                   "--methods", "baseline,floor-steps,stepcache-magcache", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    first = entries[0]["prompt"]
    assert settings["pairs"][0][0] == first
    assert settings["images"][first] == str((tmp_path / "inputs" / "frames" / "0.png").resolve())
    # the reference is the pipeline's own video from that first frame: another frame gives another video
    from stepcache.eval.bench_subject import PipelineSubject
    from stepcache.generate import pipeline_of
    pipeline_class, _, spec = pipeline_of(folder)
    reference = torch.load(out / "reference.pt", weights_only=True)["latents"][0]
    seed = settings["pairs"][0][1]
    swapped = {first: settings["images"][entries[1]["prompt"]]}
    own = PipelineSubject(folder, pipeline_class, spec, "fp32", "cpu", 32, 32, 5, images=settings["images"])
    other = PipelineSubject(folder, pipeline_class, spec, "fp32", "cpu", 32, 32, 5, images=swapped)
    assert torch.equal(own.latents(first, seed, 8, 5.0)[0], reference)
    assert not torch.equal(other.latents(first, seed, 8, 5.0)[0], reference)
    report = json.loads((out / "report.json").read_text())
    assert any(r["method"] == "stepcache-magcache" and r["status"] == "ok" for r in report["rows"])


@pytest.mark.parametrize("case,message", [
    ("txt", "needs a first frame per video"),
    ("no-image", "prompt(s) have no image"),
    ("absent", "does not exist"),
])
def test_an_image_to_video_pipeline_without_a_frame_per_prompt_is_refused_in_one_line(tmp_path, case, message):
    from wan_tiny import save_i2v_folder
    folder = save_i2v_folder(tmp_path / "i2v")
    prompts, entries = image_prompts(tmp_path / "inputs")
    if case == "txt":
        prompts = tmp_path / "p.txt"
        prompts.write_text("\n".join(e["prompt"] for e in entries))
    elif case == "no-image":
        del entries[2]["image"]
        prompts.write_text(json.dumps(entries))
    else:
        (tmp_path / "inputs" / "frames" / "3.png").unlink()
    result = bench("--pipeline", str(folder), "--prompts", str(prompts), "--quick", "--num-prompts", "1", *I2V,
                   "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def word_prompts(root):
    """Six prompts in the tiny text encoders' words (enough for --quick with one benchmarked prompt)."""
    prompts = root / "p.txt"
    prompts.write_text("\n".join(f"a {c} ball moves {d} on grass" for c in ("red", "blue", "red")
                                 for d in ("left", "right")))
    return prompts


def test_a_two_expert_pipeline_is_benched_on_both_experts_with_both_rules(tmp_path):
    from wan22_tiny import save_a14b_folder
    folder = save_a14b_folder(tmp_path / "a14b")
    prompts = word_prompts(tmp_path)
    out = tmp_path / "out"
    methods = "baseline,floor-steps,stepcache-magcache,stepcache-magcache-separate,diffusers-magcache"
    result = bench("--pipeline", str(folder), "--prompts", str(prompts), "--quick", "--num-prompts", "1", *I2V[:8],
                   "--steps", "10", "--dtype", "fp32", "--methods", methods, "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["family"] == "wan2.2"
    report = json.loads((out / "report.json").read_text())
    rows = {r["id"]: r for r in report["rows"]}
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    baseline = next(r for r in records if r.get("run") == "baseline[]" and r.get("kind") == "quality")
    assert baseline["per_video"][0]["calls"] == 20          # both experts' calls: 10 steps x 2 CFG branches
    for key in ("stepcache-magcache[thresh=0.12,K=2]", "stepcache-magcache-separate[thresh=0.12,K=2]"):
        row = rows[key]
        assert row["status"] == "ok"
        # the block work counted in both experts is stepcache's own count of computed passes
        assert row["computed_passes"] == pytest.approx(row["stepcache_passes"][0])
        assert row["stepcache_passes"][1] == 20
    assert rows["stepcache-magcache-separate[thresh=0.12,K=2]"]["config"]["experts"] == "separate"
    # diffusers MagCache: a cache on each expert, each with diffusers' own table over the steps it runs
    tables = json.loads((out / "calibration" / "diffusers-magcache.json").read_text())["experts"]
    magcache = next(r for r in report["rows"] if r["method"] == "diffusers-magcache")
    own = [magcache["config"]["num_inference_steps"], magcache["config"]["second_expert"]["num_inference_steps"]]
    assert [len(t) for t in tables] == own and sum(own) == 10 and own[0] != own[1]
    assert "pipe.transformer and pipe.transformer_2" in magcache["config"]["call"]


def test_the_expert_rule_variants_are_planned_only_for_two_expert_pipelines():
    from stepcache.eval.bench import select_methods
    one = {m.key for m in select_methods("stepcache", quick=True)}
    two = {m.key for m in select_methods("stepcache", quick=True, two_experts=True)}
    assert not any(k.endswith("-separate") for k in one)
    assert two - one == {"stepcache-teacache-separate", "stepcache-magcache-separate",
                         "stepcache-easycache-separate"}


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


def hub_cache(folder, root, repo="stepcache/demo", revision="0123abcd"):
    """A Hugging Face Hub cache holding ``folder`` as ``repo`` (the layout huggingface_hub reads offline)."""
    import shutil
    base = root / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, base / "snapshots" / revision)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(revision)
    return root


def test_a_hub_id_is_read_from_the_hub_cache_and_recorded_by_id_and_revision(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(folder, tmp_path / "hub")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    result = bench("--pipeline", "stepcache/demo", "--quick", "--device", "cpu", "--methods", "baseline,floor-steps",
                   "--num-prompts", "1", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["pipeline"], settings["revision"]) == ("stepcache/demo", "0123abcd")
    assert settings["pipeline_class"] == "StepcacheDemoPipeline"
    missing = bench("--pipeline", "stepcache/absent", "--quick", "--out", str(tmp_path / "o2"), cwd=tmp_path)
    assert missing.returncode == 2 and not (tmp_path / "o2").exists()
    assert missing.stderr.count("\n") == 1 and "'stepcache/absent' is not a local folder" in missing.stderr


def test_a_hunyuanvideo_pipeline_is_benched_with_its_two_stream_blocks(tmp_path):
    from hunyuan_tiny import save_folder
    folder = save_folder(tmp_path / "hy")
    prompts = word_prompts(tmp_path)
    out = tmp_path / "out"
    result = bench("--pipeline", str(folder), "--prompts", str(prompts), "--quick", "--num-prompts", "1",
                   "--device", "cpu", "--height", "32", "--width", "32", "--frames", "9", "--steps", "10",
                   "--dtype", "fp32", "--methods", "baseline,floor-steps,stepcache-magcache", "--out", str(out),
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["family"] == "hunyuanvideo" and report["published"]["family"] == "hunyuanvideo"
    # the non-block share was measured with every block passing both streams through (a bypass returning one
    # tensor breaks HunyuanVideo's double-stream blocks)
    assert report["totals"]["non_block_share"] is not None and 0 < report["totals"]["non_block_share"] < 1
    magcache = [r for r in report["rows"] if r["method"] == "stepcache-magcache" and r["status"] == "ok"]
    assert magcache and all(r["computed_passes"] == pytest.approx(r["stepcache_passes"][0]) for r in magcache)
