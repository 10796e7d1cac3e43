"""Multi-GPU caching on CPU: diffusers' context parallelism (Ulysses and ring) under ``torchrun
--nproc_per_node=2`` with gloo, on the tiny Wan2.1 and HunyuanVideo pipelines.

Each torchrun is started by the test (``multigpu_launch.torchrun``: loopback, one thread per rank, killed after
its time limit; gloo collectives time out first, so ranks that disagree fail instead of hanging). One torchrun
per family runs every case; the one-process references are computed here, in the test process. Checked:

* each method's output on 2 ranks equals the 1-process output within float tolerance, with the 1-process pass
  pattern on every rank (and TeaCache's / EasyCache's measured signals equal to the 1-process ones);
* threshold 0 equals the uncached 2-rank run, bit for bit;
* enabling the cache before or after ``enable_parallelism`` gives the same result (the cache's block wrappers
  sit beneath diffusers' split hook either way), and ``stepcache.disable`` removes them in both orders;
* shards on which per-shard decisions differ: the agreed decision is the full-sequence one, on both ranks;
  and what the naive fix does (each rank deciding on its own shard) on a real pipeline: the ranks wait in
  different collectives, and the run fails on the gloo timeout instead of hanging;
* CFG branches split across the ranks (rank 0 runs "cond", rank 1 "uncond", as a CFG-parallel engine does):
  each rank's per-branch state gives the 1-process pattern of its branch, and EasyCache's "uncond" follows the
  "cond" decision from the other rank (``cfg_parallel=``), which on its own it would not;
* HunyuanVideo (which diffusers gives no plan): the plan from ``enable_context_parallel`` is exact with padded
  text under Ulysses; ring with padded text is refused; the bare plan without the text-mask hooks is wrong, and
  stepcache refuses to cache on it.
"""
from __future__ import annotations

import pytest
import torch

import multigpu_worker as W
from multigpu_launch import torchrun

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

METHODS = ("teacache", "magcache", "easycache")
# Settings that reuse passes on the tiny random models (see tests/test_*_diffusers.py for why they are large).
PARAMS = {"wan": {"teacache": {"thresh": 300.0}, "magcache": {"thresh": 0.24, "K": 4},
                  "easycache": {"thresh": 0.3, "warmup_steps": 2}},
          "hunyuan": {"teacache": {"thresh": 0.5}, "magcache": {},
                      "easycache": {"thresh": 0.2, "warmup_steps": 2}}}
# HunyuanVideo's text is padded (as real prompts are) under Ulysses; ring cannot mask padding, so its runs use
# an all-valid text mask.
ENGINES = {"wan": {"ulysses": {}, "ring": {}},
           "hunyuan": {"ulysses": {"padded": True}, "ring": {"padded": False}}}
# CFG split across the ranks: a negative prompt far from the prompt, so that the branches' own decisions differ.
CFG_SPLIT_NEGATIVE = 5.0
CFG_SPLIT_PARAMS = {**PARAMS["wan"], "easycache": {"thresh": 0.3, "warmup_steps": 2}}
RTOL = 1e-4  # relative L2 error allowed between 2 ranks and 1 process (float rounding of split reductions)


def family_cases(family: str) -> list[dict]:
    cases = []
    for engine, extra in ENGINES[family].items():
        base = {"family": family, "engine": engine, **extra}
        cases.append({"id": f"{engine}-none", **base})
        for method in METHODS:
            for order in ("cache_first", "cp_first"):
                cases.append({"id": f"{engine}-{method}-{order}", **base, "method": method, "order": order,
                              "params": PARAMS[family][method]})
            cases.append({"id": f"{engine}-{method}-zero", **base, "method": method, "order": "cp_first",
                          "params": {**PARAMS[family][method], "thresh": 0.0}})
    if family == "wan":
        cases.append({"id": "disagreement", "kind": "disagreement"})
        for method in METHODS:
            cases.append({"id": f"cfg-split-{method}", "kind": "cfg_split", "method": method,
                          "params": CFG_SPLIT_PARAMS[method], "negative_scale": CFG_SPLIT_NEGATIVE,
                          "cfg_parallel": method == "easycache"})
        cases.append({"id": "cfg-split-easycache-alone", "kind": "cfg_split", "method": "easycache",
                      "params": CFG_SPLIT_PARAMS["easycache"], "negative_scale": CFG_SPLIT_NEGATIVE})
        for method in METHODS:  # image-to-video: 36 input channels, image tokens in the cross-attention
            cases.append({"id": f"i2v-ulysses-{method}", "family": "wan_i2v", "engine": "ulysses",
                          "method": method, "order": "cp_first", "params": PARAMS["wan"][method]})
    else:
        cases += [
            {"id": "ulysses-teacache-truecfg", "family": family, "engine": "ulysses", "padded": True,
             "true_cfg": True, "method": "teacache", "params": PARAMS[family]["teacache"]},
            {"id": "ring-padded", "family": family, "engine": "ring", "padded": True, "expect_error": True},
            {"id": "plain-plan-none", "family": family, "engine": "ulysses", "padded": True,
             "setup": "plain_plan"},
            {"id": "plain-plan-cached", "family": family, "engine": "ulysses", "padded": True,
             "setup": "plain_plan", "method": "magcache", "params": {}, "expect_error": True},
        ]
    return cases


def reference(family: str, case: dict) -> dict:
    """The same case in this one process, without parallelism."""
    single = {k: v for k, v in case.items() if k not in ("engine", "order", "setup", "expect_error")}
    return W.run_case(single)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    ranks, seconds = torchrun("multigpu_worker.py", family_cases("wan"), tmp_path_factory.mktemp("wan"))
    print(f"\n[multigpu] wan: 2-rank torchrun took {seconds:.1f} s")
    return ranks


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    ranks, seconds = torchrun("multigpu_worker.py", family_cases("hunyuan"), tmp_path_factory.mktemp("hunyuan"))
    print(f"\n[multigpu] hunyuan: 2-rank torchrun took {seconds:.1f} s")
    return ranks


@pytest.fixture(scope="module")
def results(wan, hunyuan):
    return {"wan": wan, "hunyuan": hunyuan}


def _case(family, case_id):
    return next(c for c in family_cases(family) if c["id"] == case_id)


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
@pytest.mark.parametrize("engine", ["ulysses", "ring"])
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_equal_one_process(results, family, engine, method):
    ranks = results[family]
    case = _case(family, f"{engine}-{method}-cache_first")
    ref = reference(family, case)
    assert "." in ref["pattern"], "the setting must reuse passes for the test to mean anything"
    for order in ("cache_first", "cp_first"):
        got = [r[f"{engine}-{method}-{order}"] for r in ranks]
        for rank, g in enumerate(got):
            assert g["pattern"] == ref["pattern"], (order, rank)  # the same decisions on every rank
            assert g["branches"] == ref["branches"]
            assert rel_err(g["out"], ref["out"]) < RTOL, (order, rank, rel_err(g["out"], ref["out"]))
            if method != "magcache":
                for a, b in zip(g["signals"], ref["signals"]):
                    assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4))
            assert g["restored"], "stepcache.disable left a wrapper behind"
        assert torch.equal(got[0]["out"], got[1]["out"])
    # Either order of enabling: the same computation.
    for rank in ranks:
        assert torch.equal(rank[f"{engine}-{method}-cache_first"]["out"], rank[f"{engine}-{method}-cp_first"]["out"])


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
@pytest.mark.parametrize("engine", ["ulysses", "ring"])
def test_threshold_zero_is_the_uncached_two_rank_run(results, family, engine):
    for rank in results[family]:
        uncached = rank[f"{engine}-none"]["out"]
        for method in METHODS:
            zero = rank[f"{engine}-{method}-zero"]
            assert set(zero["pattern"]) == {"C"}
            assert torch.equal(zero["out"], uncached), method
    # And the uncached 2-rank run is the 1-process model (context parallelism itself is exact here).
    ref = reference(family, _case(family, f"{engine}-none"))
    assert rel_err(results[family][0][f"{engine}-none"]["out"], ref["out"]) < RTOL


def test_disagreeing_shards_take_the_agreed_decision(wan):
    r0, r1 = (rank["disagreement"] for rank in wan)
    lo, hi = sorted(r0["per_shard"])
    # The threshold sits between the two shards' own changes, and between a mean of shard means and the
    # full-sequence mean: deciding per shard, or on averaged shard means, would be wrong.
    assert lo < r0["thresh"] < hi and r0["mean_of_means"] < r0["thresh"] < r0["whole"]
    # Alone, each rank decides on its shard: rank 0 reuses step 1, rank 1 computes it (a deadlock on GPUs).
    assert r0["alone"][1][0] is False and r1["alone"][1][0] is True
    # Agreed: both ranks take the single-process decision, on the full-sequence value.
    assert [c for c, _ in r0["agreed"]] == [c for c, _ in r1["agreed"]] == [c for c, _ in r0["single"]]
    assert r0["agreed"][1][1] == pytest.approx(r0["whole"], rel=1e-6) == r1["agreed"][1][1]


def test_hunyuan_true_cfg_branches(hunyuan):
    case = _case("hunyuan", "ulysses-teacache-truecfg")
    ref = reference("hunyuan", case)
    assert set(ref["branches"]) == {"cond", "uncond"}
    for rank in hunyuan:
        got = rank["ulysses-teacache-truecfg"]
        assert got["pattern"] == ref["pattern"] and got["branches"] == ref["branches"]
        assert rel_err(got["out"], ref["out"]) < RTOL


def test_hunyuan_ring_refuses_padded_text(hunyuan):
    for rank in hunyuan:
        assert "cannot mask padded text tokens" in rank["ring-padded"]["error"]


def test_hunyuan_plan_needs_the_mask_hooks(hunyuan):
    """diffusers' enable_parallelism with the bare plan runs, but the joint text mask no longer matches the
    keys' order after the all-to-all: the output is wrong. stepcache refuses to cache on that setup."""
    ref = reference("hunyuan", _case("hunyuan", "ulysses-none"))
    for rank in hunyuan:
        assert rel_err(rank["plain-plan-none"]["out"], ref["out"]) > 1e-3
        assert "enable_context_parallel" in rank["plain-plan-cached"]["error"]


@pytest.mark.parametrize("method", METHODS)
def test_cfg_branches_split_across_ranks(wan, method):
    ref = W.run_case({"family": "wan", "method": method, "params": CFG_SPLIT_PARAMS[method],
                      "negative_scale": CFG_SPLIT_NEGATIVE})
    for rank, branch in zip(wan, ("cond", "uncond")):
        got = rank[f"cfg-split-{method}"]
        assert set(got["branches"]) == {branch}  # each rank saw one branch only
        expected = "".join(c for c, b in zip(ref["pattern"], ref["branches"]) if b == branch)
        assert got["pattern"] == expected and "." in expected, (branch, got["pattern"], expected)
        assert rel_err(got["out"], ref["out"]) < RTOL
    if method == "easycache":
        # Without the CFG group, the uncond rank cannot see cond's decisions and decides on its own: the ranks'
        # patterns differ, and so does the result.
        alone = [rank["cfg-split-easycache-alone"] for rank in wan]
        assert alone[0]["pattern"] != alone[1]["pattern"]
        assert rel_err(alone[0]["out"], ref["out"]) > RTOL


@pytest.mark.parametrize("method", METHODS)
def test_wan_image_to_video(wan, method):
    case = _case("wan", f"i2v-ulysses-{method}")
    ref = reference("wan_i2v", case)
    assert "." in ref["pattern"]
    for rank in wan:
        got = rank[f"i2v-ulysses-{method}"]
        assert got["pattern"] == ref["pattern"] and rel_err(got["out"], ref["out"]) < RTOL


def test_naive_per_shard_decisions_deadlock(tmp_path):
    """HunyuanVideo TeaCache with the reduction switched off (``parallel=None``): each rank decides on its own
    image-token shard, the ranks disagree, one skips its blocks while the other waits in attention's all-to-all.
    On GPUs that is a hang; here the gloo timeout ends it and the test harness reports a failure."""
    case = {"id": "naive", "family": "hunyuan", "engine": "ulysses", "method": "teacache",
            "params": PARAMS["hunyuan"]["teacache"], "naive": True}
    log, seconds = torchrun("multigpu_worker.py", [case], tmp_path, timeout=90, gloo_timeout=10,
                            expect_failure=True)
    print(f"\n[multigpu] naive per-shard run failed after {seconds:.1f} s")
    assert "Timed out" in log or "timed out" in log.lower()
