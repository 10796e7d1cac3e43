"""The official-repo scripts under xDiT sequence parallelism, simulated on CPU with 2 gloo ranks.

xfuser cannot run (or import) without a GPU, so ``multigpu_official_worker.py`` stands in for the few xfuser
names upstream calls, with gloo; upstream's own parallel wrappers run unchanged: HunyuanVideo's
``parallelize_transformer`` (bound by ``HunyuanVideoSampler.__init__`` for ``--ulysses-degree 2``) and Wan2.1's
``usp_dit_forward`` / ``usp_attn_forward`` (bound as ``WanT2V.__init__`` does for ``use_usp``). Checked, when the
upstream checkouts are available (``HUNYUANVIDEO_REPO``, ``WAN21_REPO``):

* the cache forward is the one that runs after upstream's parallel wrapper is installed (its blocks see the
  shard, every pass goes through the runner), while a class-level patch, which is what the published scripts
  install, is never called;
* each method on 2 ranks takes the 1-process decisions on both ranks and gives the 1-process output; TeaCache
  on HunyuanVideo measures a shard of the image tokens, and its reduced signal equals the 1-process signal;
* threshold 0 equals the uncached 2-rank run.
"""
from __future__ import annotations

import pytest
import torch

from helpers import hunyuanvideo_checkout, wan21_checkout
from multigpu_launch import torchrun

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]

METHODS = ("teacache", "magcache", "easycache")
HY_ARGV = {"teacache": ["--teacache-thresh", "1"], "magcache": [], "easycache": ["--easycache-thresh", "1"]}
HY_ZERO = {"teacache": ["--teacache-thresh", "0"], "magcache": ["--magcache-thresh", "0"],
           "easycache": ["--easycache-thresh", "0"]}
WAN_PARAMS = {"teacache": {"thresh": 500.0}, "magcache": {"thresh": 0.24, "K": 4, "retention_ratio": 0.2},
              "easycache": {"thresh": 0.3, "warmup_steps": 2}}
RTOL = 1e-4


def _two_ranks(cases: list[dict], tmp_path_factory, family: str) -> list[dict]:
    ranks, seconds = torchrun("multigpu_official_worker.py", cases, tmp_path_factory.mktemp(f"{family}-official"),
                              timeout=150)
    print(f"\n[multigpu] official {family}: 2-rank torchrun took {seconds:.1f} s")
    return ranks


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    hunyuanvideo_checkout()
    cases = [{"id": "none-par", "family": "hunyuan", "parallel": True},
             {"id": "none-par-class", "family": "hunyuan", "parallel": True, "class_patch": True}]
    for m in METHODS:
        cases += [{"id": f"{m}-ref", "family": "hunyuan", "method": m, "argv": HY_ARGV[m]},
                  {"id": f"{m}-par", "family": "hunyuan", "method": m, "argv": HY_ARGV[m], "parallel": True},
                  {"id": f"{m}-zero", "family": "hunyuan", "method": m, "argv": HY_ZERO[m], "parallel": True}]
    cases.append({"id": "teacache-par-class", "family": "hunyuan", "method": "teacache", "argv": HY_ARGV["teacache"],
                  "parallel": True, "class_patch": True})
    return _two_ranks(cases, tmp_path_factory, "HunyuanVideo")


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    wan21_checkout()
    cases = [{"id": "none-par", "family": "wan", "usp": True},
             {"id": "none-par-class", "family": "wan", "usp": True, "class_patch": True}]
    for m in METHODS:
        p = WAN_PARAMS[m]
        cases += [{"id": f"{m}-ref", "family": "wan", "method": m, "params": p, "usp": "self"},
                  {"id": f"{m}-plain", "family": "wan", "method": m, "params": p},
                  {"id": f"{m}-par", "family": "wan", "method": m, "params": p, "usp": True},
                  {"id": f"{m}-zero", "family": "wan", "method": m, "params": {**p, "thresh": 0.0}, "usp": True}]
    cases.append({"id": "magcache-par-class", "family": "wan", "method": "magcache", "params": WAN_PARAMS["magcache"],
                  "usp": True, "class_patch": True})
    return _two_ranks(cases, tmp_path_factory, "Wan2.1")


# ----------------------------------------------------------------------------------------------- HunyuanVideo
def test_hunyuan_cache_runs_inside_the_xdit_wrapper(hunyuan):
    for rank in hunyuan:
        uncached = rank["none-par-class"]
        # The published scripts' class patch, installed after upstream's parallelize_transformer: never called.
        assert uncached["xdit"] and uncached["class_calls"] == 0
        cached = rank["teacache-par-class"]
        assert cached["class_calls"] == 0 and "." in cached["pattern"]
        # Ours runs on every pass, and its blocks see the image-token shard (half of the 48 tokens).
        par = rank["teacache-par"]
        assert len(par["pattern"]) == 12 and set(par["block0_tokens"]) == {24}
        assert set(rank["teacache-ref"]["block0_tokens"]) == {48}
        assert par["group"] == "SequenceGroup(xDiT sequence parallel)"


@pytest.mark.parametrize("method", METHODS)
def test_hunyuan_two_ranks_equal_one_process(hunyuan, method):
    ref = hunyuan[0][f"{method}-ref"]
    assert "." in ref["pattern"] and "C" in ref["pattern"][1:]
    for rank in hunyuan:
        par = rank[f"{method}-par"]
        assert par["pattern"] == ref["pattern"]
        assert rel_err(par["outputs"], ref["outputs"]) < RTOL
        for a, b in zip(par["signals"], ref["signals"]):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4))
    assert torch.equal(hunyuan[0][f"{method}-par"]["outputs"], hunyuan[1][f"{method}-par"]["outputs"])


@pytest.mark.parametrize("method", METHODS)
def test_hunyuan_threshold_zero_is_the_uncached_two_rank_run(hunyuan, method):
    for rank in hunyuan:
        assert set(rank[f"{method}-zero"]["pattern"]) == {"C"}
        assert torch.equal(rank[f"{method}-zero"]["outputs"], rank["none-par"]["outputs"])


# ----------------------------------------------------------------------------------------------------- Wan2.1
def test_wan_cache_runs_inside_the_usp_forward(wan):
    for rank in wan:
        assert rank["none-par-class"]["class_calls"] == 0  # the published scripts' class patch: shadowed
        cached = rank["magcache-par-class"]
        assert cached["class_calls"] == 0 and "." in cached["pattern"]
        par = rank["magcache-par"]
        assert len(par["pattern"]) == 16 and set(par["block0_tokens"]) == {16}  # the shard of 32 tokens
        assert par["restored"]  # upstream's usp_dit_forward is back after removal
        # Wan's measurements are whole on every rank (nothing reduced); each pass still ends with the agreement.
        assert all(rank[f"{m}-par"]["group"] == "SequenceGroup(xDiT sequence parallel)" for m in METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_wan_two_ranks_equal_one_process(wan, method):
    ref = wan[0][f"{method}-ref"]  # the same USP code path on one process
    assert "." in ref["pattern"]
    for rank in wan:
        par = rank[f"{method}-par"]
        assert par["pattern"] == ref["pattern"] and par["branches"] == ref["branches"]
        assert rel_err(par["out"], ref["out"]) < RTOL
        for a, b in zip(par["signals"], ref["signals"]):
            assert (a is None) == (b is None) and (a is None or a == pytest.approx(b, rel=1e-4))
    assert torch.equal(wan[0][f"{method}-par"]["out"], wan[1][f"{method}-par"]["out"])
    # Upstream's USP attention runs in bfloat16 (on GPU under autocast); against the plain model that is the only
    # difference.
    assert rel_err(wan[0][f"{method}-par"]["out"], wan[0][f"{method}-plain"]["out"]) < 2e-2


@pytest.mark.parametrize("method", METHODS)
def test_wan_threshold_zero_is_the_uncached_two_rank_run(wan, method):
    for rank in wan:
        assert set(rank[f"{method}-zero"]["pattern"]) == {"C"}
        assert torch.equal(rank[f"{method}-zero"]["out"], rank["none-par"]["out"])
