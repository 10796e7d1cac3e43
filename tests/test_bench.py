"""`stepcache bench`: a tiny --quick run on the untrained demo-architecture model (2 prompts, 6 steps, a few
methods), its result files, resume, and refusal of a folder made with other settings.

The run happens in a subprocess (cache-dit patches classes, and the bench sets torch's thread count), once per
module. Peers that are not installed are reported by the bench itself as unavailable with the reason, and the
test prints that reason; nothing is faked.
"""
import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("diffusers")

METHODS = "floor-steps,stepcache-magcache,diffusers-fbc,cachedit-dbcache,diffusers-fastercache"
ARGS = ["--quick", "--untrained", "--num-prompts", "2", "--steps", "6", "--methods", METHODS]


def bench(*args):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", "bench", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = bench(*ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _lines(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def test_result_files_and_every_run_has_passes_speedup_and_psnr(folder):
    out, stdout = folder
    for name in ("settings.json", "results.jsonl", "report.json", "table.md", "reference.pt"):
        assert (out / name).exists(), name
    records = _lines(out)
    assert {r["kind"] for r in records} == {"quality", "timing", "baseline_timing", "non_block"}
    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert settings["weights"] == "untrained" and len(settings["pairs"]) == 2 and settings["steps"] == 6
    # every output says UNTRAINED
    assert report["label"].startswith("UNTRAINED")
    assert "UNTRAINED" in (out / "table.md").read_text() and "UNTRAINED" in stdout
    if importlib.util.find_spec("matplotlib"):
        assert (out / "plot.png").stat().st_size > 0
    rows = {r["id"]: r for r in report["rows"]}
    assert rows["baseline[]"]["reference"] and rows["baseline[]"]["passes"] == 12
    ok = [r for r in report["rows"] if r["status"] == "ok" and not r.get("reference")]
    assert {r["method"] for r in ok} >= {"floor-steps", "stepcache-magcache", "diffusers-fbc"}
    for r in ok:
        for key in ("passes", "computed_passes", "ideal_speedup", "wall_speedup", "overhead", "psnr", "psnr_video",
                    "ssim", "config"):
            assert r[key] is not None, (r["id"], key)
        assert r["passes"] > 0 and 0 < r["compute_fraction"] <= 1.0 + 1e-9
        assert len(r["per_video"]) == 2
        timings = [t for t in records if t["kind"] == "timing" and t["run"] == r["id"]]
        assert len(timings) == settings["repeats"] == 1
    for r in ok:
        if r["method"] == "floor-steps":   # fewer steps: exactly two passes per step
            assert r["computed_passes"] == pytest.approx(2 * r["params"]["steps"])
        if r["method"] == "stepcache-magcache":  # block work agrees with stepcache's own pass count
            assert r["computed_passes"] == pytest.approx(r["stepcache_passes"][0])
            assert r["stepcache_passes"][1] == 12
    # peers that could not run: the reason, as the bench found it
    for c in report["could_not_run"]:
        assert c["reason"], c
        print(f"could not run: {c['run']}: {c['status']}: {c['reason']}")
    if importlib.util.find_spec("cache_dit") is None:
        assert rows["cachedit-dbcache[rdt=0.08]"]["status"] == "unavailable"
        assert "pip install" in rows["cachedit-dbcache[rdt=0.08]"]["reason"]
    else:
        assert rows["cachedit-dbcache[rdt=0.32]"]["status"] == "ok"
    faster = rows["diffusers-fastercache[]"]
    if faster["status"] == "error":   # diffusers 0.42.1: its CFG-cache cannot split Wan's batch-1 passes
        assert any(c["run"] == faster["id"] for c in report["could_not_run"])
    # the verdict names a method (or says none reaches the speedup) at each target
    assert set(report["verdict"]["wall"]["at"]) == {"2.0", "2.5", "3.0"}
    assert len(report["verdict"]["text"]) >= 3


def test_resume_skips_finished_runs(folder):
    out, _ = folder
    before = (out / "results.jsonl").read_text()
    result = bench(*ARGS, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "every run is finished" in result.stdout
    assert (out / "results.jsonl").read_text() == before   # nothing run again, nothing timed again


def test_resume_finishes_an_interrupted_folder(folder, tmp_path):
    out, _ = folder
    part = tmp_path / "part"
    part.mkdir()
    for name in ("settings.json", "reference.pt"):
        (part / name).write_bytes((out / name).read_bytes())
    (part / "calibration").mkdir()
    for f in (out / "calibration").iterdir():
        (part / "calibration" / f.name).write_bytes(f.read_bytes())
    lines = (out / "results.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["kind"] == "quality"
            and not json.loads(line)["run"].startswith("diffusers-fbc")]
    (part / "results.jsonl").write_text("\n".join(kept) + "\n")
    result = bench(*ARGS, "--out", str(part))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 to go" in result.stdout   # only the three FirstBlockCache runs are scored again
    records = _lines(part)
    rescored = [r["run"] for r in records if r["kind"] == "quality"][len(kept):]
    assert sorted(rescored) == sorted(r for r in json.loads((out / "settings.json").read_text())["runs"]
                                      if r.startswith("diffusers-fbc"))


def test_runs_added_to_the_plan_later_are_run_on_their_own(folder, tmp_path):
    out, _ = folder
    more = tmp_path / "more"
    shutil.copytree(out, more)
    before = (more / "results.jsonl").read_text()
    result = bench(*ARGS[:-1], METHODS + ",floor-fixed", "--out", str(more))
    assert result.returncode == 0, result.stderr[-3000:]
    added = {"floor-fixed[k=2]", "floor-fixed[k=4]"}   # the quick sweep of the fixed-skip floor
    assert "adding 2 run(s)" in result.stdout
    after = (more / "results.jsonl").read_text()
    assert after.startswith(before)   # what was measured stays as it was
    new = [json.loads(line) for line in after[len(before):].splitlines() if line.strip()]
    assert {r["run"] for r in new if r["kind"] == "quality"} == added
    assert {r["run"] for r in new if r["kind"] == "timing"} == added
    assert added <= set(json.loads((more / "settings.json").read_text())["runs"])
    report = json.loads((more / "report.json").read_text())
    assert report["complete"] and {r["id"] for r in report["rows"]} >= added


def test_folder_made_with_other_settings_is_refused(folder):
    out, _ = folder
    from stepcache.eval.bench import main
    before = (out / "results.jsonl").read_text()
    assert main([*ARGS[:3], "3", *ARGS[4:], "--out", str(out)]) == 2   # 3 prompts instead of 2
    assert main([*ARGS, "--steps", "8", "--out", str(out)]) == 2
    assert (out / "results.jsonl").read_text() == before


def test_the_printed_command_parses_back_to_the_same_arguments():
    import argparse
    import shlex
    from stepcache.eval.bench import _command, add_arguments
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--out", "x", "--profile", "p.json", "--first-prompt", "6", "--num-prompts", "12", "--quick"]
    args = parser.parse_args(argv)
    printed = shlex.split(_command(args))
    assert printed[:2] == ["stepcache", "bench"] and parser.parse_args(printed[2:]) == args


def test_same_weights_elsewhere_open_the_folder_other_weights_do_not(tmp_path):
    from stepcache.eval.bench import BenchError, Store
    settings = {"model": "demo", "weights": "/one/demo_wan.safetensors", "sha256": "ab", "runs": ["baseline[]"],
                "stepcache_profile": {"file": "/one/profile.json", "sha256": "ef"}}
    Store(tmp_path).open(settings)
    Store(tmp_path).open({**settings, "weights": "/another/checkout/demo_wan.safetensors",
                          "stepcache_profile": {"file": "/another/profile.json", "sha256": "ef"}})
    with pytest.raises(BenchError, match="differing: sha256"):
        Store(tmp_path).open({**settings, "sha256": "cd"})
    with pytest.raises(BenchError, match="differing: stepcache_profile"):
        Store(tmp_path).open({**settings, "stepcache_profile": {"file": "/one/profile.json", "sha256": "00"}})


def test_list_marks_exploratory_and_full_only_apart(capsys):
    from stepcache.eval.bench import main
    assert main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line[0].isspace()}
    assert lines["floor-fixed-linear"].endswith("[full mode only]")       # in the verdict, only slow to run
    assert lines["stepcache-magcache-protected"].endswith("[exploratory, full mode only]")
    assert "[" not in lines["stepcache-magcache-linear"]


def test_first_prompt_gives_other_prompts_and_seeds():
    from stepcache.eval.bench import BenchError, bench_pairs
    main, other = bench_pairs(6, 2), bench_pairs(12, 1, first=6)
    assert len(other) == 12 and not {p for p, _ in main} & {p for p, _ in other}
    assert not {s for _, s in main} & {s for _, s in other}
    assert [p for p, _ in bench_pairs(18, 1)][6:] == [p for p, _ in other]   # the same fixed order, further on
    with pytest.raises(BenchError, match="--first-prompt -1"):
        bench_pairs(6, 2, first=-1)


def test_frontier_and_value_at():
    from stepcache.eval.bench_report import frontier, value_at
    points = [(1.5, 40.0), (2.0, 35.0), (1.8, 30.0), (3.0, 31.0)]
    assert frontier(points) == [(1.5, 40.0), (2.0, 35.0), (3.0, 31.0)]
    assert value_at(points, 2.5) == 31.0      # a measured run at least 2.5x fast, never an interpolation
    assert value_at(points, 1.9) == 35.0
    assert value_at(points, 1.0) == 40.0
    assert value_at(points, 3.5) is None


def test_verdict_reports_ties_and_losses():
    from stepcache.eval.bench_report import verdict

    def row(method, family, speed, psnr):
        return {"id": f"{method}[{speed}]", "method": method, "label": method, "family": family, "status": "ok",
                "exploratory": False, "wall_speedup": speed, "ideal_speedup": speed, "psnr": psnr}
    rows = [row("sc", "stepcache", 2.1, 30.0), row("sc", "stepcache", 3.1, 25.0), row("floor", "floor", 2.2, 31.0),
            row("peer", "diffusers", 2.6, 25.0), row("peer", "diffusers", 3.0, 25.0)]
    at = verdict(rows, "wall")["at"]
    assert at["2.0"]["winner"] == "floor" and not at["2.0"]["goal_met"]
    assert [b["method"] for b in at["2.0"]["beaten_by"]] == ["floor"]
    assert at["2.5"]["stepcache_best_psnr"] == 25.0 and at["2.5"]["tied_with"][0]["method"] == "peer"
    assert at["3.0"]["winner"] == "sc" and at["3.0"]["values"]["floor"] is None


def _scored(method, run_id, speed, psnr, psnr_video=None, **extra):
    return {"id": run_id, "method": method, "status": "ok", "ideal_speedup": speed, "psnr": psnr,
            "psnr_video": psnr if psnr_video is None else psnr_video, **extra}


def test_published_figures_sit_beside_the_same_method_at_that_speedup_in_their_own_psnr():
    from stepcache.eval import published
    rows = [{"id": "baseline[]", "method": "baseline", "status": "ok", "reference": True},
            _scored("stepcache-magcache", "mc-a", 2.1, 40.0),   # slower than the published 2.2x: not "at speedup"
            _scored("stepcache-magcache", "mc-b", 2.4, 35.0, params={"thresh": 0.12, "K": 2},
                    config={"retention_ratio": 0.2}),
            _scored("stepcache-magcache", "mc-c", 3.1, 30.0, params={"thresh": 0.12, "K": 4},
                    config={"retention_ratio": 0.4}),           # K 4 at another retention: not E012K4R02
            _scored("stepcache-easycache", "ec", 2.6, 33.0, psnr_video=31.0),
            _scored("floor-steps", "steps", 2.0, 38.0)]
    section = published.beside(rows, {"model": "demo"})
    assert section["family"] == "wan2.1"
    by_setting = {(e["model"], e["setting"]): e for e in section["rows"]}
    assert all(e["family"] == "wan2.1" for e in section["rows"])
    e012k2 = by_setting[("Wan2.1 T2V 1.3B 480p", "MagCache E012K2R02")]
    assert e012k2["same_setting"]["run"] == "mc-b" and e012k2["at_speedup"]["run"] == "mc-b"
    e012k4 = by_setting[("Wan2.1 T2V 1.3B 480p", "MagCache E012K4R02")]
    assert e012k4["same_setting"] is None and e012k4["at_speedup"]["run"] == "mc-c"
    easy = by_setting[("Wan2.1 T2V 1.3B", "EasyCache")]          # EasyCache's figures are whole-video PSNR
    assert easy["at_speedup"]["psnr"] == 31.0 and easy["measured_column"] == "psnr_video"
    assert by_setting[("Wan2.1 T2V 14B", "half the steps")]["at_speedup"]["run"] == "steps"
    text = "\n".join(published.format_markdown(section))
    assert "| Wan2.1 T2V 1.3B 480p | MagCache E012K2R02 | 2.20x | 20.51 (frame) |" in text
    assert "35.00 (2.40x) | 35.00 (2.40x) |" in text and "scalingcache-readme:" in text
    # another family's figures are not shown; a family without figures gives no section
    assert published.beside(rows, {"model": "pipeline", "pipeline_class": "HunyuanVideoPipeline"})["family"] \
        == "hunyuanvideo"
    assert published.format_markdown(published.beside(rows, {"model": "other"})) == []


def test_every_published_figure_names_a_known_source_method_and_psnr_definition():
    from stepcache.eval import published
    data = published.published()
    for row in data["rows"]:
        assert row["source"] in data["sources"] and row["method"] in published.BENCH_METHOD
        assert row["psnr_kind"] in published.PSNR_COLUMN and row["speedup"] > 1 and row["psnr"] > 0


def test_prompt_match_is_read_back_only_for_the_trained_demo():
    import torch
    from stepcache.eval.bench import prompt_reader
    from stepcache.wan21.demo.scenes import Scene, render
    assert prompt_reader({"model": "pipeline", "pipeline_class": "WanPipeline"}) is None
    assert prompt_reader({"model": "demo-architecture"}) is None
    reads = prompt_reader({"model": "demo"})
    scene = Scene("blue", "square", "down", "dark")
    video = render([scene], torch.Generator().manual_seed(0))[0]
    assert reads(scene.prompt, video) and not reads(Scene("red", "square", "down", "dark").prompt, video)
    assert prompt_reader({"model": "pipeline", "pipeline_class": "StepcacheDemoPipeline"}) is not None


class _Method:
    def __init__(self, key):
        self.key = key

    def steps(self, ctx, params):
        return params.get("steps", ctx.steps)


class _Run:
    def __init__(self, key, **params):
        self.method, self.params, self.id = _Method(key), params, f"{key}{params}"


def test_spread_order_takes_the_middle_then_the_ends_then_between():
    from stepcache.eval.bench_plan import spread_order
    assert spread_order(1) == [0] and spread_order(2) == [1, 0]
    assert spread_order(5) == [2, 0, 4, 1, 3]
    assert sorted(spread_order(8)) == list(range(8))


def test_a_budget_keeps_every_method_spread_over_its_sweep_and_says_what_it_left_out():
    from stepcache.eval.bench_plan import fit, left_out_text, run_cost
    todo = ([_Run("floor-steps", steps=s) for s in (24, 20, 15, 10, 6)]
            + [_Run("stepcache-magcache", thresh=t) for t in (0.03, 0.06, 0.12, 0.24, 0.5)])
    everything = fit(todo, 30, videos=2, repeats=1, every=4, fixed_cost=0, seconds_per_video=1.0,
                     budget_seconds=None)
    assert everything.runs == todo and not everything.left_out
    assert run_cost(todo[0], 30, 2, 1) == pytest.approx(2 * 2 * 24 / 30)   # scored once and timed once
    half = fit(todo, 30, videos=2, repeats=1, every=4, fixed_cost=0, seconds_per_video=1.0,
               budget_seconds=everything.seconds / 2)
    assert half.seconds <= everything.seconds / 2 and half.left_out
    assert {r.id for r in half.runs} | {r.id for r in half.left_out} == {r.id for r in todo}
    assert {r.method.key for r in half.runs} == {"floor-steps", "stepcache-magcache"}   # both keep some
    magcache = [r.params["thresh"] for r in half.runs if r.method.key == "stepcache-magcache"]
    assert 0.12 in magcache                                       # the middle of a sweep comes first
    assert "stepcache-magcache:" in left_out_text(half.left_out)
    assert [r for r in todo if r in half.runs] == half.runs       # kept runs stay in plan order
