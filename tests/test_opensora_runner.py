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


def test_multi_gpu_is_refused_before_anything_loads(tmp_path, prompts, capsys):
    out = tmp_path / "set"
    factory = Factory()
    assert main(["--prompts", str(prompts), "--out", str(out), "--num-gpus", "2", *MAGCACHE],
                engine_factory=factory) == 2
    assert "multi-GPU issue" in capsys.readouterr().err
    assert factory.pipelines == [] and not out.exists()


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
