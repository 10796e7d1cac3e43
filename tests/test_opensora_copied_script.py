"""The seed's Open-Sora command with stepcache's drop-in (issue #21): ``cd eval/magcache && python
experiments/magcache_opensora.py``, no arguments, in a MagCache checkout, run as a command the way a user runs it.

Opt-in (``OPENSORA_REPO`` = a Zehong-Ma/MagCache checkout). The checkout's ``eval/magcache/`` is rebuilt in a
temporary folder from symlinks to its files, with the script copied into ``experiments/``; the one file that differs
is ``vbench/VBench_full_info.json``, the checkout's list cut to its first two prompts (and the first repeated, as the
real list repeats prompts), so the run stays short while the script still has to find the list where the checkout
keeps it. The process gets the fork's own ``VideoSysEngine`` with CPU stand-ins (opensora_sitecustomize/ and
opensora_fork_engine.py: a tiny STDiT3, fake T5, a coarse stub VAE, gloo); the script, stepcache and the
published defaults (480p, 9:16, 51 frames, 30 steps, cfg 7.0, the published model ids) are untouched.
"""
import csv
import glob
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from helpers import opensora_checkout

REPO = opensora_checkout(pipeline=True)

import imageio.v3 as iio  # noqa: E402

from stepcache.eval.manifest import load_manifest  # noqa: E402

TESTS = Path(__file__).resolve().parent
SCRIPT = TESTS.parent / "opensora" / "magcache_opensora.py"
PUBLISHED_E012K3 = "CCCCCC...C...C...C...C...C...C"
MODELS = {"transformer": "hpcai-tech/OpenSora-STDiT-v3", "vae": "hpcai-tech/OpenSora-VAE-v1.2",
          "text_encoder": "DeepFloyd/t5-v1_1-xxl"}
# The published script's folders (MC-OS eval_base, eval_teacache_slow/_fast, eval_ours) and their settings.
FOLDERS = {"opensora_base": ("none", {}),
           "opensora_teacache_slow": ("teacache", {"thresh": 0.1}),
           "opensora_teacache_fast": ("teacache", {"thresh": 0.2}),
           "opensora_ours_012_max3step": ("magcache", {"thresh": 0.12, "K": 3, "retention_ratio": 0.2,
                                                       "magcache_rule": "reference"})}


def checkout_tree(root: Path, prompts: int = 2) -> tuple[Path, list[str]]:
    """(the tree's eval/magcache, the prompts its list holds, in order, once each)."""
    source = REPO / "eval" / "magcache"
    magcache = root / "eval" / "magcache"
    magcache.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name not in ("experiments", "vbench"):
            (magcache / entry.name).symlink_to(entry)
    for folder in ("experiments", "vbench"):
        (magcache / folder).mkdir()
        for entry in (source / folder).iterdir():
            if entry.name != "VBench_full_info.json":
                (magcache / folder / entry.name).symlink_to(entry)
    full = json.loads((source / "vbench" / "VBench_full_info.json").read_text())
    entries = full[:prompts] + full[:1]
    (magcache / "vbench" / "VBench_full_info.json").write_text(json.dumps(entries))
    (magcache / "experiments" / SCRIPT.name).write_bytes(SCRIPT.read_bytes())  # `cp`, as the docs say
    return magcache, [e["prompt_en"] for e in full[:prompts]]


def run_script(cwd: Path, trace: Path, *argv: str, script: str = SCRIPT.name):
    """``python experiments/SCRIPT ARGV...`` in ``cwd`` (the tree's eval/magcache), with the fork's engine on CPU."""
    env = {**os.environ, "STEPCACHE_TEST_OPENSORA_STANDINS": "1", "OPENSORA_REPO": str(REPO),
           "STEPCACHE_TEST_OPENSORA_TRACE": str(trace), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS / "opensora_sitecustomize"), str(TESTS)])}
    return subprocess.run([sys.executable, f"experiments/{script}", *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def traces(trace: Path) -> list[dict]:
    return [json.loads(Path(p).read_text()) for p in sorted(glob.glob(f"{trace}.*"))]


def test_the_copied_script_without_arguments_runs_the_published_comparison(tmp_path):
    magcache, prompts = checkout_tree(tmp_path)
    names = sorted(f"{p}-0.mp4" for p in prompts)
    trace = tmp_path / "trace"
    result = run_script(magcache, trace)
    assert result.returncode == 0, result.stdout + result.stderr

    # The fork's engine built the pipeline once, with the published configuration, on one GPU.
    built = [p for t in traces(trace) for p in t["pipelines"]]
    assert len(built) == 1
    config = {k: built[0][k] for k in ("caller", *MODELS, "num_gpus", "num_sampling_steps", "cfg_scale",
                                       "enable_flash_attn", "world")}
    assert config == {"caller": "VideoSysEngine._create_pipeline", **MODELS, "num_gpus": 1,
                      "num_sampling_steps": 30, "cfg_scale": 7.0, "enable_flash_attn": False, "world": 1}
    # The one transformer ran the four settings in the published order, each over both prompts (30 steps each):
    # the baseline computing every pass, the cached ones skipping.
    passes = built[0]["passes"]
    assert len(passes) == 4 * 2 * 30 and passes[:60] == "C" * 60
    assert passes[-60:] == PUBLISHED_E012K3 * 2

    # The published folders under ./samples of the working directory, each one setting, every prompt once.
    samples = magcache / "samples"
    assert sorted(p.name for p in samples.iterdir()) == sorted(FOLDERS)
    for folder, (method, settings) in FOLDERS.items():
        manifest = load_manifest(samples / folder)
        assert manifest.method == method and sorted(manifest.videos) == names
        assert {k: manifest.params[k] for k in settings} == settings
        assert {k: manifest.params[k] for k in ("resolution", "aspect_ratio", "num_frames", "num_sampling_steps",
                                                "cfg_scale", *MODELS)} == {
            "resolution": "480p", "aspect_ratio": "9:16", "num_frames": "51", "num_sampling_steps": 30,
            "cfg_scale": 7.0, **MODELS}
        for name in names:
            assert iio.imread(samples / folder / name).shape[0] == 51
    sidecar = json.loads((samples / "opensora_ours_012_max3step" / "opensora_set.json").read_text())
    assert [sidecar["videos"][n]["pattern"] for n in names] == [PUBLISHED_E012K3] * len(names)

    # The printed compare command runs as printed, from the same folder.
    words = shlex.split(result.stdout.strip().splitlines()[-1])
    assert words[:2] == ["stepcache", "compare"]
    compared = subprocess.run([sys.executable, "-m", "stepcache.cli", *words[1:]], cwd=magcache,
                              capture_output=True, text=True, timeout=300)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    report = Path(magcache, words[words.index("--out") + 1])
    with open(report / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3

    # Run again: everything is there, so nothing is made and no engine is built; the command is printed again.
    again = run_script(magcache, tmp_path / "trace2")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count(", 0 to make") == 4 and traces(tmp_path / "trace2") == []
    assert again.stdout.strip().splitlines()[-1] == result.stdout.strip().splitlines()[-1]


def test_the_copied_script_with_arguments_runs_one_setting(tmp_path):
    """Arguments given: the script is the single-setting tool it always was (here on the checkout's own list)."""
    magcache, prompts = checkout_tree(tmp_path, prompts=1)
    result = run_script(magcache, tmp_path / "trace", "--prompts", "vbench/VBench_full_info.json",
                        "--num-sampling-steps", "10", "--out", "mine")
    assert result.returncode == 0, result.stdout + result.stderr
    manifest = load_manifest(magcache / "mine")
    assert manifest.method == "magcache" and sorted(manifest.videos) == [f"{prompts[0]}-0.mp4"]
    assert not (magcache / "samples").exists()
    missing = run_script(magcache, tmp_path / "trace", "--seeds", "0")
    assert missing.returncode == 2 and "the following arguments are required: --out" in missing.stderr
