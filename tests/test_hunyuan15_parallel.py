"""The HunyuanVideo 1.5 drop-ins under ``torchrun`` on 2 gloo ranks (opt-in: HUNYUANVIDEO15_REPO): upstream's own
sequence parallelism (generate.py makes its degree the world size; each rank holds half the image tokens, Ulysses'
all-to-all around attention, the output all-gathered) with the tiny model of tests/hunyuan15_official_tiny.py.
All cases run in one torchrun (hunyuan15_parallel_worker.py), and again on one process for the references.

Without the agreement (each rank deciding on its own shard) TeaCache's ranks measure different signals and the
EasyCache case with a threshold per rank has one rank skip its blocks while the other waits in the all-to-all: the
torchrun fails and every test here with it."""
import json

import pytest
import torch

from helpers import hunyuanvideo15_checkout
from multigpu_launch import torchrun
from stepcache.profiles import load_profile

ROOT = hunyuanvideo15_checkout()  # the whole module needs the checkout
STEPS = 12
METHODS = ("magcache", "teacache", "easycache")
THRESH = {"magcache": "--magcache_thresh", "teacache": "--teacache_thresh", "easycache": "--easycache_thresh"}
# Each reuses passes on the tiny random model (a "." in its pattern).
CACHING = {"magcache": "0.5", "teacache": "50", "easycache": "20"}
DISAGREE = ("1", "3")  # rank 0's and rank 1's EasyCache thresholds where the ranks' own rules disagree
RTOL = 1e-4


def tiny_argv(steps: int = STEPS) -> list[str]:
    return ["--prompt", "A cat walks on the grass", "--resolution", "480p", "--model_path", "/nonexistent",
            "--video_length", "9", "--num_inference_steps", str(steps), "--sr", "false", "--seed", "0",
            "--dtype", "fp32", "--group_offloading", "false", "--save_generation_config", "false"]


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """What the ranks run, by id. A profile with TeaCache and EasyCache sections stands in for a calibration (the
    published HunyuanVideo 1.0 numbers: the tests check the machinery, not the values)."""
    hv10, hv15 = load_profile("hunyuanvideo-t2v-720p"), load_profile("hunyuanvideo1.5-t2v")
    data = dict(hv15.data, name="tiny-hv15", teacache=hv10.data["teacache"], easycache=hv10.data["easycache"])
    where = tmp_path_factory.mktemp("hv15-parallel-videos")
    profile = where / "tiny-hv15.json"
    profile.write_text(json.dumps(data))
    found = {"none": {"method": "magcache", "argv": ["--cache_method", "none"]}}
    for method in METHODS:
        found[method] = {"method": method, "argv": ["--cache_profile", str(profile), THRESH[method],
                                                    CACHING[method]]}
        found[f"{method}-zero"] = {"method": method, "argv": ["--cache_profile", str(profile), THRESH[method], "0"]}
    found["easycache-disagree"] = {"method": "easycache", "argv": ["--cache_profile", str(profile)],
                                   "argv_by_rank": [["--easycache_thresh", t] for t in DISAGREE]}
    for key, case in found.items():
        case.update(id=key, argv=[*tiny_argv(), "--output_path", str(where / f"{key}.mp4"), *case["argv"]])
    return found


@pytest.fixture(scope="module")
def ranks(cases, tmp_path_factory):
    results, seconds = torchrun("hunyuan15_parallel_worker.py", list(cases.values()),
                                tmp_path_factory.mktemp("hv15-parallel"), timeout=600)
    print(f"\n[multigpu] official HunyuanVideo 1.5: 2-rank torchrun took {seconds:.1f} s")
    return results


@pytest.fixture(scope="module")
def reference(cases, tmp_path_factory):
    """Each case on one process (no sequence parallelism), the disagreeing one as each of its thresholds alone."""
    runs = [case for key, case in cases.items() if key != "easycache-disagree"]
    disagree = cases["easycache-disagree"]
    runs += [{**disagree, "id": f"easycache-{t}", "argv": [*disagree["argv"], "--easycache_thresh", t],
              "argv_by_rank": [[]]} for t in DISAGREE]
    (result,), _ = torchrun("hunyuan15_parallel_worker.py", runs, tmp_path_factory.mktemp("hv15-one"), nproc=1,
                            timeout=600)
    return result


def test_two_ranks_run_upstreams_sequence_parallel_path(ranks, reference):
    for rank in ranks:
        assert all(case["status"] == 0 for case in rank.values())
        assert rank["none"]["ran"] == "C" * STEPS and len(rank["none"]["outputs"]) == STEPS
    # The stand-ins keep the uncached 2-rank run the 1-process run (the output is gathered on every rank).
    assert all(rel_err(a, b) < RTOL for a, b in zip(ranks[0]["none"]["outputs"], reference["none"]["outputs"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0]["none"]["outputs"], ranks[1]["none"]["outputs"]))


@pytest.mark.parametrize("method", METHODS)
def test_both_ranks_take_the_one_process_decisions(ranks, reference, method):
    ref = reference[method]
    assert "." in ref["ran"] and len(ref["outputs"]) == STEPS
    for rank in ranks:
        assert rank[method]["ran"] == ref["ran"]
        assert all(rel_err(a, b) < RTOL for a, b in zip(rank[method]["outputs"], ref["outputs"]))
    assert all(torch.equal(a, b) for a, b in zip(ranks[0][method]["outputs"], ranks[1][method]["outputs"]))


@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_is_the_uncached_two_rank_run(ranks, method):
    for rank in ranks:
        assert rank[f"{method}-zero"]["ran"] == "C" * STEPS
        assert all(torch.equal(a, b) for a, b in zip(rank[f"{method}-zero"]["outputs"], rank["none"]["outputs"]))


def test_ranks_whose_own_rules_disagree_still_decide_alike(ranks, reference):
    """Each rank its own EasyCache threshold: alone, they take different patterns; together every pass ends with
    the agreement (compute if any rank computes), so both ranks run one pattern, and it computes wherever the rank
    with the lower threshold would alone."""
    low, high = (reference[f"easycache-{t}"]["ran"] for t in DISAGREE)
    assert low != high
    r0, r1 = (rank["easycache-disagree"] for rank in ranks)
    assert r0["ran"] == r1["ran"] and "." in r0["ran"] and r0["ran"] != high
    assert all(torch.equal(a, b) for a, b in zip(r0["outputs"], r1["outputs"]))
