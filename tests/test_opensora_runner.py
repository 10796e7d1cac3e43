"""The Open-Sora set runner (stepcache.opensora.generate_set, behind the three drop-in scripts) on the stand-in
pipeline of tests/opensora_tiny.py: names, resume, refusal of another setting's folder, the manifest."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stepcache.eval.manifest import load_manifest
from stepcache.opensora.generate_set import SIDECAR, assign_stems, main, name_stem

from opensora_tiny import TinyPipeline

PROMPTS = ["a red fox in the snow", "a cat/dog on a sofa", "waves at dusk"]
MAGCACHE = ["--method", "magcache", "--preset", "E012K3R02"]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n\n" + PROMPTS[0] + "\n")  # last line repeats
    return path


class Factory:
    """engine_factory for main(): one TinyPipeline per run, remembered for the assertions."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.pipelines = []

    def __call__(self, args):
        self.pipelines.append(TinyPipeline(**self.kwargs))
        return self.pipelines[-1]

    @property
    def calls(self):
        return [c for p in self.pipelines for c in p.calls]


def _videos(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".mp4")


def test_names_keep_the_published_prompt_names_and_never_collide():
    assert name_stem("A tranquil tableau of an ornate Victorian streetlamp") == \
        "A tranquil tableau of an ornate Victorian streetlamp"
    assert name_stem("a cat/dog\tnow") == "a cat_dog_now"
    assert name_stem("..hidden") == "__hidden"
    assert len(name_stem("x" * 500).encode()) == 200
    assert assign_stems(["same", "same", "same"]) == ["same", "same~2", "same~3"]
    long_a, long_b = "y" * 300 + "a", "y" * 300 + "b"  # differ only after the cut
    assert assign_stems([long_a, long_b]) == ["y" * 200, "y" * 200 + "~2"]


def test_resume_after_an_interruption_redoes_nothing(tmp_path, prompts, capsys):
    out = tmp_path / "magcache"
    argv = ["--prompts", str(prompts), "--seeds", "0-1", "--out", str(out), *MAGCACHE]
    first = Factory(interrupt_at=4)
    assert main(argv, engine_factory=first) == 130
    made = _videos(out)
    assert len(made) == 4 and len(first.calls) == 4
    assert sorted(load_manifest(out).videos) == made
    assert not (out / ".partial").exists()

    second = Factory()
    assert main(argv, engine_factory=second) == 0
    assert len(second.calls) == 2  # only the two left
    assert set(second.calls).isdisjoint(first.calls)
    assert len(_videos(out)) == 6 and len(load_manifest(out).videos) == 6

    third = Factory()
    assert main(argv, engine_factory=third) == 0
    assert third.pipelines == []  # nothing left: no model is even built
    assert "0 to make" in capsys.readouterr().out


def test_a_lost_video_file_is_made_again(tmp_path, prompts):
    out = tmp_path / "base"
    argv = ["--prompts", str(prompts), "--out", str(out), "--method", "none"]
    assert main(argv, engine_factory=Factory()) == 0
    (out / "waves at dusk-0.mp4").unlink()
    again = Factory()
    assert main(argv, engine_factory=again) == 0
    assert again.calls == [("waves at dusk", 0)]


def test_manifest_records_what_was_made(tmp_path, prompts):
    out = tmp_path / "magcache"
    assert main(["--prompts", str(prompts), "--out", str(out), *MAGCACHE], engine_factory=Factory()) == 0
    manifest = load_manifest(out)
    assert manifest.method == "magcache"
    assert {k: manifest.params[k] for k in ("thresh", "K", "retention_ratio", "magcache_rule", "profile",
                                            "num_sampling_steps", "resolution", "num_frames", "cfg_scale")} == {
        "thresh": 0.12, "K": 3, "retention_ratio": 0.2, "magcache_rule": "reference", "profile": "opensora-1.2",
        "num_sampling_steps": 30, "resolution": "480p", "num_frames": "51", "cfg_scale": 7.0}
    assert manifest.label == "MagCache 0.12 K3 (E012K3R02)"
    # repeated prompts are dropped, '/' is replaced, names are {prompt}-{seed}.mp4
    assert sorted(manifest.videos) == ["a cat_dog on a sofa-0.mp4", "a red fox in the snow-0.mp4",
                                       "waves at dusk-0.mp4"]
    for timing in manifest.videos.values():
        assert timing.seconds > 0 and 0 < timing.dit_seconds <= timing.seconds
        assert (timing.computed_passes, timing.total_passes) == (12, 30)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["schema"] == 1
    sidecar = json.loads((out / SIDECAR).read_text())
    entry = sidecar["videos"]["a cat_dog on a sofa-0.mp4"]
    assert (entry["prompt"], entry["seed"], entry["pattern"]) == ("a cat/dog on a sofa", 0,
                                                                  "CCCCCC...C...C...C...C...C...C")


def test_linear_prediction_is_recorded_and_labelled(tmp_path, prompts):
    out = tmp_path / "magcache-linear"
    assert main(["--prompts", str(prompts), "--out", str(out), *MAGCACHE, "--predict", "linear"],
                engine_factory=Factory()) == 0
    manifest = load_manifest(out)
    assert manifest.params["predict"] == "linear"
    assert manifest.label == "MagCache 0.12 K3 predict linear (E012K3R02)"


@pytest.mark.parametrize("change, word", [(["--thresh", "0.24"], "thresh"),
                                          (["--magcache-rule", "released"], "magcache_rule"),
                                          (["--num-sampling-steps", "20"], "num_sampling_steps"),
                                          (["--method", "teacache"], "method")])
def test_a_folder_of_other_parameters_is_refused(tmp_path, prompts, capsys, change, word):
    out = tmp_path / "set"
    assert main(["--prompts", str(prompts), "--out", str(out), "--seeds", "0", *MAGCACHE],
                engine_factory=Factory()) == 0
    before = sorted(load_manifest(out).videos)
    argv = ["--prompts", str(prompts), "--out", str(out), "--seeds", "0", "1"]
    argv += change if change[0] == "--method" else [*MAGCACHE, *change]
    other = Factory()
    assert main(argv, engine_factory=other) == 2
    err = capsys.readouterr().err
    assert "other parameters" in err and word in err
    assert other.pipelines == [] and sorted(load_manifest(out).videos) == before


def test_a_folder_of_unknown_videos_is_refused(tmp_path, prompts, capsys):
    out = tmp_path / "set"
    out.mkdir()
    (out / "somebody's.mp4").write_bytes(b"")
    assert main(["--prompts", str(prompts), "--out", str(out), "--method", "none"], engine_factory=Factory()) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_a_bad_gpu_count_is_refused_before_anything_loads(tmp_path, prompts, capsys):
    out = tmp_path / "set"
    factory = Factory()
    assert main(["--prompts", str(prompts), "--out", str(out), "--num-gpus", "0", *MAGCACHE],
                engine_factory=factory) == 2
    assert "--num-gpus 0 must be at least 1" in capsys.readouterr().err
    assert factory.pipelines == [] and not out.exists()


def test_an_engine_with_workers_built_without_stepcache_is_refused(tmp_path, prompts, capsys):
    """A VideoSysEngine whose workers were spawned before stepcache could reach them (built by the user, not by
    build_engine): only rank 0 would cache, so it is refused before any video is made."""
    import types
    engine = types.SimpleNamespace(workers=[object()], driver_worker=TinyPipeline())
    out = tmp_path / "set"
    assert main(["--prompts", str(prompts), "--out", str(out), *MAGCACHE], engine_factory=lambda args: engine) == 2
    assert "built without stepcache" in capsys.readouterr().err
    assert engine.driver_worker.calls == [] and not list(out.glob("*.mp4"))


def test_bad_flags_fail_before_loading(tmp_path, prompts, capsys):
    out = str(tmp_path / "set")
    for argv, message in [(["--method", "magcache", "--K", "0"], "K"),
                          (["--method", "teacache", "--K", "3"], "does not take"),
                          (["--method", "none", "--thresh", "0.1"], "no cache flags"),
                          (["--method", "none", "--predict", "linear"], "no cache flags"),
                          (["--method", "easycache", "--magcache-rule", "released"], "MagCache only"),
                          (["--method", "magcache", "--seeds", "x"], "--seeds")]:
        assert main(["--prompts", str(prompts), "--out", out, *argv], engine_factory=Factory()) == 2
        assert message in capsys.readouterr().err


def test_shards_share_one_folder(tmp_path, prompts):
    out = tmp_path / "set"
    argv = ["--prompts", str(prompts), "--out", str(out), "--method", "none", "--seeds", "0-1"]
    a, b = Factory(), Factory()
    assert main([*argv, "--shard", "0/2"], engine_factory=a) == 0
    assert main([*argv, "--shard", "1/2"], engine_factory=b) == 0
    assert len(a.calls) == len(b.calls) == 3 and set(a.calls).isdisjoint(b.calls)
    assert len(load_manifest(out).videos) == 6


def test_baseline_and_cached_sets_pair_by_name_and_compare(tmp_path, prompts):
    base, cached = tmp_path / "base", tmp_path / "magcache"
    common = ["--prompts", str(prompts)]
    assert main([*common, "--out", str(base), "--method", "none"], engine_factory=Factory()) == 0
    assert main([*common, "--out", str(cached), *MAGCACHE], engine_factory=Factory()) == 0
    assert _videos(base) == _videos(cached)
    assert load_manifest(base).videos["waves at dusk-0.mp4"].computed_passes == 30
    report = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "stepcache.cli", "compare", "--gt_video_dir", str(base),
                             "--generated_video_dir", str(cached), "--out", str(report)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "MagCache 0.12 K3" in result.stdout


@pytest.mark.filterwarnings("ignore::stepcache.runner.NothingCachedWarning")
@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_drop_in_scripts_fix_their_method(method, tmp_path, prompts):
    script = Path(__file__).resolve().parents[1] / "opensora" / f"{method}_opensora.py"
    assert f'run_script("{method}")' in script.read_text()
    out = tmp_path / method
    factory = Factory(steps=8)
    assert main(["--prompts", str(prompts), "--out", str(out), "--num-sampling-steps", "8", "--thresh", "0"],
                method=method, engine_factory=factory) == 0
    assert load_manifest(out).method == method and len(factory.calls) == 3
    with pytest.raises(SystemExit):
        main(["--prompts", str(prompts), "--out", str(out), "--method", "none"], method=method)


def test_drop_in_script_runs_as_a_file():
    script = Path(__file__).resolve().parents[1] / "opensora" / "magcache_opensora.py"
    result = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=True)
    assert "--magcache_thresh" in result.stdout and "--magcache-rule" in result.stdout
    assert "--method" not in result.stdout


def test_half_written_videos_of_dead_processes_are_cleaned(tmp_path, prompts):
    out = tmp_path / "set"
    (out / ".partial").mkdir(parents=True)
    (out / ".partial" / "999999999-waves at dusk-0.mp4").write_bytes(b"half")
    assert main(["--prompts", str(prompts), "--out", str(out), "--method", "none"], engine_factory=Factory()) == 0
    assert not (out / ".partial").exists() and len(_videos(out)) == 3


# ------------------------------------------------------------------------ no arguments: the published comparison
PUBLISHED_FOLDERS = ["opensora_base", "opensora_ours_012_max3step", "opensora_teacache_fast", "opensora_teacache_slow"]


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A MagCache checkout's eval/magcache as the drop-in sees it (its script copied into experiments/, a short
    VBench list in vbench/), the working directory set to it as the seed's `cd eval/magcache`, and no vbench package."""
    import stepcache.eval.prompts

    magcache = tmp_path / "MagCache" / "eval" / "magcache"
    (magcache / "experiments").mkdir(parents=True)
    (magcache / "vbench").mkdir()
    entries = [{"prompt_en": p, "dimension": ["scene"]} for p in PROMPTS[:2] + PROMPTS[:1]]
    (magcache / "vbench" / "VBench_full_info.json").write_text(json.dumps(entries))
    script = magcache / "experiments" / "magcache_opensora.py"
    script.write_text("# the drop-in\n")
    monkeypatch.chdir(magcache)
    monkeypatch.setattr(stepcache.eval.prompts, "vbench_prompt_file", lambda: None)
    return magcache, script


def _compare_line(out: str) -> list[str]:
    import shlex
    return shlex.split(out.strip().splitlines()[-1])


def test_no_arguments_run_the_published_comparison(checkout, capsys):
    magcache, script = checkout
    factory = Factory()
    assert main([], method="magcache", engine_factory=factory, script=str(script)) == 0
    assert len(factory.pipelines) == 1  # one engine serves every setting
    samples = magcache / "samples"
    assert sorted(p.name for p in samples.iterdir()) == PUBLISHED_FOLDERS
    settings = {name: (load_manifest(samples / name).method, load_manifest(samples / name).params.get("thresh"),
                       load_manifest(samples / name).params.get("K")) for name in PUBLISHED_FOLDERS}
    assert settings == {"opensora_base": ("none", None, None), "opensora_teacache_slow": ("teacache", 0.1, None),
                        "opensora_teacache_fast": ("teacache", 0.2, None),
                        "opensora_ours_012_max3step": ("magcache", 0.12, 3)}
    for name in PUBLISHED_FOLDERS:  # the repeated prompt made once, seed 0
        assert sorted(load_manifest(samples / name).videos) == sorted(f"{name_stem(p)}-0.mp4" for p in PROMPTS[:2])
    assert _compare_line(capsys.readouterr().out) == [
        "stepcache", "compare", "--gt_video_dir", "samples/opensora_base", "--generated_video_dir",
        "samples/opensora_teacache_slow", "samples/opensora_teacache_fast", "samples/opensora_ours_012_max3step",
        "--out", "samples/opensora_compare"]

    again = Factory()
    assert main([], method="magcache", engine_factory=again, script=str(script)) == 0
    assert again.pipelines == []  # resumed: nothing left, no engine
    assert _compare_line(capsys.readouterr().out)[:2] == ["stepcache", "compare"]


def test_no_arguments_resume_after_an_interruption(checkout):
    magcache, script = checkout
    first = Factory(interrupt_at=3)  # the baseline's two videos, then one TeaCache 0.1 video
    assert main([], method="teacache", engine_factory=first, script=str(script)) == 130
    assert len(first.calls) == 3 and not (magcache / "samples" / "opensora_teacache_fast").exists()
    second = Factory()
    assert main([], method="teacache", engine_factory=second, script=str(script)) == 0
    assert len(second.calls) == 5  # 8 videos in all


def test_no_arguments_easycache_adds_its_derived_setting(checkout):
    magcache, script = checkout
    assert main([], method="easycache", engine_factory=Factory(), script=str(script)) == 0
    manifest = load_manifest(magcache / "samples" / "opensora_easycache")
    assert manifest.method == "easycache" and manifest.params["thresh"] == 0.05
    assert len(list((magcache / "samples").iterdir())) == 5


def test_no_arguments_find_the_list_from_the_script_not_the_working_directory(checkout, tmp_path, monkeypatch):
    magcache, script = checkout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main([], method="magcache", engine_factory=Factory(), script=str(script)) == 0
    assert (elsewhere / "samples" / "opensora_base").is_dir()  # written where the published one writes: ./samples


def test_no_arguments_without_a_list_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    import stepcache.eval.prompts
    monkeypatch.setattr(stepcache.eval.prompts, "vbench_prompt_file", lambda: None)
    monkeypatch.chdir(tmp_path)
    factory = Factory()
    assert main([], method="magcache", engine_factory=factory, script=str(tmp_path / "magcache_opensora.py")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "VBench_full_info.json" in err and "eval/magcache/experiments" in err
    assert factory.pipelines == [] and list(tmp_path.iterdir()) == []


def test_no_arguments_refuse_a_folder_of_another_setting_before_loading(checkout, capsys):
    magcache, script = checkout
    stray = magcache / "samples" / "opensora_teacache_fast"
    stray.mkdir(parents=True)
    (stray / "theirs.mp4").write_bytes(b"")
    factory = Factory()
    assert main([], method="magcache", engine_factory=factory, script=str(script)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "opensora_teacache_fast" in err and "no manifest.json" in err
    assert factory.pipelines == [] and sorted(p.name for p in (magcache / "samples").iterdir()) == [stray.name]


def test_prompts_vbench_reads_the_checkouts_list_without_the_package(checkout, tmp_path, monkeypatch):
    magcache, script = checkout
    monkeypatch.chdir(tmp_path)  # found from the script's folder
    out = tmp_path / "set"
    factory = Factory()
    assert main(["--prompts", "vbench", "--out", str(out)], method="magcache", engine_factory=factory,
                script=str(script)) == 0
    assert sorted(load_manifest(out).videos) == sorted(f"{name_stem(p)}-0.mp4" for p in PROMPTS[:2])


def test_prompts_vbench_without_any_list_is_one_line(tmp_path, monkeypatch, capsys):
    import stepcache.eval.prompts
    monkeypatch.setattr(stepcache.eval.prompts, "vbench_prompt_file", lambda: None)
    monkeypatch.chdir(tmp_path)
    assert main(["--prompts", "vbench", "--out", "set", "--method", "none"], engine_factory=Factory()) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps vbench" in err


@pytest.mark.parametrize("argv, method, message", [
    (["--seeds", "0"], "magcache", "the following arguments are required: --out"),
    (["--out", "x"], "magcache", "one of the arguments --prompts --prompt is required"),
    (["--prompt", "a"], None, "the following arguments are required: --out, --method"),
])
def test_any_argument_keeps_the_required_flags(argv, method, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv, method=method, engine_factory=Factory())
    assert exit_.value.code == 2 and message in capsys.readouterr().err
