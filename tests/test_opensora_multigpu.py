"""Open-Sora 1.2 on two processes through the VideoSys fork's own engine: the drop-in script
with ``--num-gpus 2`` builds ``VideoSysEngine``, which spawns rank 1 itself and runs sequence parallelism between the
two (gloo on CPU); the cache must reach the spawned worker and both ranks must take one decision per pass.

Opt-in (``OPENSORA_REPO`` = a Zehong-Ma/MagCache checkout). The script runs as a command in the checkout tree of
test_opensora_copied_script.py, with the CPU stand-ins of opensora_fork_engine.py (a tiny STDiT3 whose 3 latent
frames the two ranks split with the fork's padding, gloo, a CPU gather without the fork's CUDA assert, a CPU seed
broadcast). Each process records, per transformer call, whether its blocks did work (helpers.BlockWork: an
observation, not stepcache's bookkeeping), the output's sum and the signal the method measured.
"""
import json
import math

import pytest

from helpers import opensora_checkout

REPO = opensora_checkout(pipeline=True)

import imageio.v3 as iio  # noqa: E402

from stepcache.eval.manifest import load_manifest  # noqa: E402
from test_opensora_copied_script import SCRIPT, checkout_tree, run_script, traces  # noqa: E402

SETTINGS = {"magcache": ["--preset", "E012K3R02"], "teacache": ["--thresh", "0.1"],
            "easycache": ["--thresh", "0.5", "--warmup-steps", "3"]}  # the derived 0.05 reuses nothing here


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """The checkout tree with its one-prompt list and the three drop-ins copied into experiments/."""
    root = tmp_path_factory.mktemp("multigpu")
    magcache, prompts = checkout_tree(root, prompts=1)
    for method in SETTINGS:
        script = SCRIPT.with_name(f"{method}_opensora.py")
        (magcache / "experiments" / script.name).write_bytes(script.read_bytes())
    return root, magcache


def _run(tree, method: str, gpus: int):
    root, magcache = tree
    trace = root / f"trace-{method}-{gpus}"
    out = f"out-{method}-{gpus}"
    result = run_script(magcache, trace, "--prompts", "vbench/VBench_full_info.json", "--out", out,
                        "--num-gpus", str(gpus), *SETTINGS[method], script=f"{method}_opensora.py")
    assert result.returncode == 0, result.stdout + result.stderr
    pipelines = sorted((p for t in traces(trace) for p in t["pipelines"]), key=lambda p: p["rank"])
    return pipelines, magcache / out


def _close(a, b, rel=1e-5):
    return len(a) == len(b) and all((x is None and y is None) or math.isclose(x, y, rel_tol=rel, abs_tol=1e-7)
                                    for x, y in zip(a, b))


@pytest.mark.parametrize("method", list(SETTINGS))
def test_two_ranks_take_one_pattern_and_make_the_single_process_video(tree, method):
    single, single_out = _run(tree, method, 1)
    pair, pair_out = _run(tree, method, 2)

    assert [(p["rank"], p["world"], p["num_gpus"], p["caller"]) for p in pair] == [
        (0, 2, 2, "VideoSysEngine._create_pipeline"), (1, 2, 2, "VideoSysEngine._create_pipeline")]
    assert [(p["rank"], p["world"]) for p in single] == [(0, 1)]
    one, rank0, rank1 = single[0], pair[0], pair[1]

    # Both ranks skip the same passes (rank 1 is the worker VideoSys spawned), as one process does, and skip some.
    assert rank0["passes"] == rank1["passes"] == one["passes"]
    assert "." in one["passes"] and len(one["passes"]) == 30
    # The measured signal is the full sequence's on both ranks, equal to one process's (TeaCache's is read on the
    # ranks' frame slices, one of them padded).
    assert rank0["signals"] == rank1["signals"]
    assert all(_close(a, b) for a, b in zip(rank0["signals"], one["signals"]))
    assert len(rank0["signals"]) == 1
    # The output: every transformer call's, and the video.
    assert _close(rank0["sums"], one["sums"]) and rank0["sums"] == rank1["sums"]
    assert load_manifest(pair_out).method == method
    for name in load_manifest(single_out).videos:
        assert (iio.imread(pair_out / name) == iio.imread(single_out / name)).all()
    sidecar = json.loads((pair_out / "opensora_set.json").read_text())
    assert [v["pattern"] for v in sidecar["videos"].values()] == [one["passes"]]
