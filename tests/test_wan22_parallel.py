"""Upstream Wan2.2's parallel paths with a cache on both A14B experts, on CPU (``WAN22_REPO``).

Upstream configures each expert in ``_configure_model`` (wan/text2video.py): ``--ulysses_size N`` binds
``sp_dit_forward`` as the WanModel's instance ``forward`` and ``sp_attn_forward`` on every block's ``self_attn``
(Ulysses over the torch.distributed world, no xfuser); ``--dit_fsdp`` then wraps the expert with ``shard_model``
(FSDP around the model, each block its own unit). The published MagCache4Wan2.2 script patches
``model.__class__.forward``: under Ulysses the instance forward shadows it (never cached), under FSDP it replaces
FSDP's own forward. ``stepcache.wan22.official.attach`` puts one cache on both experts' WanModel instances,
beneath FSDP and around Ulysses' forward, and every pass ends with one agreement on the compute flag.

* FSDP on a 1-process gloo group (a FileStore, no network), in this process: the cache sits on the inner WanModels,
  threshold 0 is the uncached run bit for bit, a reusing setting skips the blocks of both experts, remove()
  restores every forward; the published class patch breaks there (a TypeError at the first block).
* Two gloo ranks under torchrun (multigpu_wan22_worker.py): Ulysses as ``_configure_model(use_sp=True)`` binds it,
  for MagCache (experts shared and separate), TeaCache (the Wan2.2 profile with Wan2.1-14B's polynomial) and
  EasyCache: both ranks take the decisions of the same sp code path on one process (a world of one, here) and give
  its output; the blocks see half the tokens; a class-level patch is never called; threshold 0 is the uncached
  2-rank run; ranks whose own rules disagree (a threshold each) still decide alike. FSDP (FULL_SHARD over the 2
  ranks), alone and under Ulysses: the same decisions on both ranks and the 1-process output.

All 2-rank cases run in one torchrun (the module's ``ranks`` fixture). With the agreement broken (each rank keeping
its own decision) the case whose ranks disagree leaves one rank in Ulysses' all-to-all while the other has skipped
its blocks: the gloo collectives time out, the torchrun fails, and so does every 2-rank test.
"""
import json

import pytest
import torch

from helpers import BlockWork, wan22_checkout
from multigpu_launch import torchrun
from wan22_official_tiny import (bare_sampler, configure_parallel, run_t2v, sp_attention,
                                 up)  # noqa: F401  (up: the fixture of upstream on the CPU)

wan22_checkout()  # the whole module needs the checkout

import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: E402

from multigpu_wan22_worker import forwards, run_case, unchanged  # noqa: E402
from stepcache.profiles import load_profile  # noqa: E402
from stepcache.runner import NothingCachedWarning  # noqa: E402
from stepcache.wan21.official import unwrap  # noqa: E402
from stepcache.wan22.official import attach  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning"),
              pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`:UserWarning"),
              pytest.mark.filterwarnings("ignore:User provided device_type of 'cuda':UserWarning")]
PROFILE = "wan2.2-t2v-a14b"
STEPS = 8  # 6 high-noise steps, then 2 low-noise ones (shift 12, boundary 0.875)
FSDP_FORWARD = FSDP.__dict__["forward"]
MAGCACHE = {"thresh": 0.5, "K": 4, "retention_ratio": 0.2}
# Each variant reuses passes on the tiny random experts (a "." in its pattern). TeaCache's is Wan2.1-14B's published
# threshold: on these models its polynomial gives negative distances, so every pass between warmup and the forced
# last step is reused.
VARIANTS = {"magcache-shared": ("magcache", {**MAGCACHE, "experts": "shared"}),
            "magcache-separate": ("magcache", {**MAGCACHE, "experts": "separate"}),
            "teacache": ("teacache", {"thresh": 0.2}),
            "easycache": ("easycache", {"thresh": 0.5, "warmup_steps": 2})}
DISAGREE = (0.3, 0.7)  # rank 0's and rank 1's EasyCache thresholds in the case where the ranks' rules disagree
RTOL = 1e-4
HALF, ALL = 16, 32  # a rank's shard of the tokens of a 5-frame 64x64 video, and all of them (2 x 4 x 4 patches)


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this test process")
    store = dist.FileStore(str(tmp_path_factory.mktemp("gloo") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def teacache_profile(tmp_path_factory):
    """The shipped Wan2.2 T2V profile with the ``teacache`` section of the shipped Wan2.1 T2V 14B one (no TeaCache
    is published for Wan2.2)."""
    data = json.loads(load_profile(PROFILE).path.read_text())
    data["name"] = f"{data['name']}-test-teacache"
    data["teacache"] = load_profile("wan2.1-t2v-14b").method("teacache")
    path = tmp_path_factory.mktemp("profile") / f"{data['name']}.json"
    path.write_text(json.dumps(data))
    return str(path)


def cached(variant: str, teacache_profile: str, **case) -> dict:
    method, params = VARIANTS[variant]
    return {"method": method, "params": params, "profile": teacache_profile if method == "teacache" else PROFILE,
            **case}


@pytest.fixture(scope="module")
def cases(teacache_profile):
    """What the 2 ranks run, by id (each also run on one process for its reference)."""
    found = {"none-sp": {"sp": True}, "none-sp-class": {"sp": True, "class_patch": True}}
    for v in VARIANTS:
        found[f"{v}-sp"] = cached(v, teacache_profile, sp=True)
        zero = cached(v, teacache_profile, sp=True)
        found[f"{v}-zero"] = {**zero, "params": {**zero["params"], "thresh": 0.0}}
    found["magcache-shared-sp-class"] = cached("magcache-shared", teacache_profile, sp=True, class_patch=True)
    found["magcache-shared-fsdp"] = cached("magcache-shared", teacache_profile, fsdp=True)
    found["easycache-fsdp-sp"] = cached("easycache", teacache_profile, fsdp=True, sp=True)
    easycache = VARIANTS["easycache"][1]
    found["easycache-sp-disagree"] = cached("easycache", teacache_profile, sp=True,
                                            params_by_rank=[{**easycache, "thresh": t} for t in DISAGREE])
    return {key: {"id": key, "steps": STEPS, **case} for key, case in found.items()}


@pytest.fixture(scope="module")
def ranks(cases, tmp_path_factory):
    results, seconds = torchrun("multigpu_wan22_worker.py", list(cases.values()),
                                tmp_path_factory.mktemp("wan22-parallel"), timeout=150)
    print(f"\n[multigpu] official Wan2.2: 2-rank torchrun took {seconds:.1f} s")
    return results


@pytest.fixture(scope="module")
def reference(up, group, cases):  # noqa: F811
    """Each 2-rank case on this one process (world size 1): the same sp_dit_forward / sp_attn_forward code path
    (Ulysses' all-to-all and all-gather are then identities), FSDP left out (a world of one does not shard)."""
    runs = {key: {**case, "fsdp": False} for key, case in cases.items() if "params_by_rank" not in case}
    disagree = {key: value for key, value in cases["easycache-sp-disagree"].items() if key != "params_by_rank"}
    runs.update({f"easycache-{t}": {**disagree, "params": params}  # each threshold alone
                 for t, params in zip(DISAGREE, cases["easycache-sp-disagree"]["params_by_rank"])})
    with sp_attention(up):
        return {key: run_case(up, case) for key, case in runs.items()}


# ------------------------------------------------------------------------------ FSDP, on a 1-process group
@pytest.mark.parametrize("experts", ["shared", "separate"])
def test_fsdp_experts_are_cached_on_the_inner_wanmodels(up, group, experts):  # noqa: F811
    baseline = run_t2v(bare_sampler(up, "t2v"), steps=STEPS)
    sampler = configure_parallel(up, bare_sampler(up, "t2v"), dit_fsdp=True)  # upstream's shard_model
    outers = [sampler.high_noise_model, sampler.low_noise_model]
    inners = [unwrap(outer) for outer in outers]
    assert all(isinstance(o, FSDP) and isinstance(i.blocks[0], FSDP) for o, i in zip(outers, inners))
    uncached = run_t2v(sampler, steps=STEPS)
    assert torch.equal(uncached, baseline)
    before = forwards(sampler)

    zero = attach(sampler, "magcache", PROFILE, {**MAGCACHE, "experts": experts, "thresh": 0.0})
    assert zero.models == inners and zero.model is inners[0]
    assert all("forward" in inner.__dict__ for inner in inners)  # the cache: an instance forward of each WanModel
    assert all("forward" not in outer.__dict__ for outer in outers) and FSDP.__dict__["forward"] is FSDP_FORWARD
    with pytest.warns(NothingCachedWarning):
        assert torch.equal(run_t2v(sampler, steps=STEPS), uncached)
    assert set(zero.cached.stats.pattern()) == {"C"}
    zero.remove()
    assert unchanged(before, forwards(sampler))

    works = [BlockWork(inner) for inner in inners]
    attachment = attach(sampler, "magcache", PROFILE, {**MAGCACHE, "experts": experts})
    assert FSDP.__dict__["forward"] is FSDP_FORWARD and all("forward" not in outer.__dict__ for outer in outers)
    out = run_t2v(sampler, steps=STEPS)
    seen = attachment.cached.stats.experts()
    assert list(seen) == ["high", "low"] and seen["low"]["first_step"] == attachment.generations[-1].switch_step == 6
    for (name, counts), work in zip(seen.items(), works):
        assert 0 < counts["computed"] < counts["total"], (name, attachment.cached.stats.pattern(mark_switch=True))
        assert work.passes == counts["computed"]  # a reused pass runs no block of its expert
    assert torch.isfinite(out).all() and not torch.equal(out, uncached)

    attachment.remove()
    for work in works:
        work.remove()
    assert unchanged(before, forwards(sampler))  # every instance forward as before; FSDP's class forward untouched
    assert FSDP.__dict__["forward"] is FSDP_FORWARD and "generate" not in sampler.__dict__
    assert all(getattr(inner, "_stepcache", None) is None for inner in inners)
    assert torch.equal(run_t2v(sampler, steps=STEPS), uncached)


def test_published_class_patch_breaks_under_fsdp(up, group, monkeypatch):  # noqa: F811
    """What the published MagCache4Wan2.2 script does (``model.__class__.forward = magcache_forward``) on an
    FSDP-wrapped expert replaces FSDP's forward for every FSDP unit, so the first wrapped block is called with the
    DiT's signature."""
    sampler = configure_parallel(up, bare_sampler(up, "t2v"), dit_fsdp=True)

    def published_style_forward(self, x, t, context, seq_len, y=None):
        tokens = torch.zeros(1, seq_len, self.dim)
        return [self.blocks[0](tokens, e=None, seq_lens=None, grid_sizes=None, freqs=None, context=None,
                               context_lens=None)]

    monkeypatch.setattr(type(sampler.high_noise_model), "forward", published_style_forward)
    with pytest.raises(TypeError, match="published_style_forward.. got an unexpected keyword argument 'e'"):
        run_t2v(sampler, steps=2)


# ---------------------------------------------------------------------------------- Ulysses on 2 gloo ranks
def test_the_cache_runs_inside_ulysses_on_both_experts(ranks, reference):
    for rank in ranks:
        assert rank["none-sp"]["sp_bound"] == {"high": True, "low": True}  # _configure_model(use_sp=True)'s forwards
        assert rank["none-sp-class"]["class_calls"] == 0  # the published class patch: shadowed, never called
        par = rank["magcache-shared-sp-class"]
        assert par["class_calls"] == 0 and "." in par["pattern"]
        for v in VARIANTS:
            par = rank[f"{v}-sp"]
            assert par["wrapped"] == {"high": True, "low": True}  # an instance forward around sp_dit_forward
            assert par["restored"]  # sp_dit_forward, sp_attn_forward and generate as before, after remove()
            assert par["group"] == "SequenceGroup(world)"  # no xfuser: the world group upstream's SP runs on
            # Each expert's blocks see this rank's shard on every pass that reaches them: every computed pass, and
            # the reused passes of the methods that skip the block stack only (MagCache, TeaCache; EasyCache skips
            # the whole model).
            for expert, counts in par["experts"].items():
                assert set(par["tokens"][expert]) == {HALF}
                assert counts["computed"] <= len(par["tokens"][expert]) <= counts["total"]
            assert set(reference[f"{v}-sp"]["tokens"]["high"]) == {ALL}
            assert reference[f"{v}-sp"]["group"] == "None"  # one process: no group, no agreement
    # The stand-ins keep the uncached 2-rank run the 1-process sp run.
    assert rel_err(ranks[0]["none-sp"]["out"], reference["none-sp"]["out"]) < RTOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_take_the_one_process_decisions(ranks, reference, variant):
    ref = reference[f"{variant}-sp"]
    assert "." in ref["pattern"]
    assert ref["experts"]["low"]["first_step"] == 6 and ref["experts"]["high"]["first_step"] == 0
    for rank in ranks:
        par = rank[f"{variant}-sp"]
        assert par["pattern"] == ref["pattern"] and par["experts"] == ref["experts"]
        assert par["reasons"] == ref["reasons"]  # nothing was overruled by the agreement: the inputs agree
        assert rel_err(par["out"], ref["out"]) < RTOL
    assert torch.equal(ranks[0][f"{variant}-sp"]["out"], ranks[1][f"{variant}-sp"]["out"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_threshold_zero_is_the_uncached_two_rank_run(ranks, variant):
    for rank in ranks:
        assert set(rank[f"{variant}-zero"]["pattern"]) == {"C", "|"}
        assert torch.equal(rank[f"{variant}-zero"]["out"], rank["none-sp"]["out"])


def test_ranks_whose_own_rules_disagree_still_decide_alike(ranks, reference):
    """Each rank its own EasyCache threshold: a rank's own rule would skip where the other's computes, and a rank
    skipping its blocks while the other runs Ulysses' all-to-all would wait in a different collective (a hang, or
    here a gloo error). Every pass ends with the agreement: compute if any rank computes ("agreed" where a rank's
    own rule said reuse)."""
    low, high = (reference[f"easycache-{t}"]["pattern"] for t in DISAGREE)  # each threshold alone
    assert low != high  # the rules do disagree on these inputs
    r0, r1 = (rank["easycache-sp-disagree"] for rank in ranks)
    assert r0["pattern"] == r1["pattern"] and "." in r0["pattern"]
    assert "agreed" not in r0["reasons"] and "agreed" in r1["reasons"]  # the lower threshold computes more
    assert torch.equal(r0["out"], r1["out"])


# ------------------------------------------------------------------------------------- FSDP on 2 gloo ranks
@pytest.mark.parametrize("key, sp", [("magcache-shared-fsdp", False), ("easycache-fsdp-sp", True)],
                         ids=["fsdp", "fsdp+ulysses"])
def test_fsdp_on_two_ranks_takes_the_same_decisions(ranks, reference, key, sp):
    ref = reference[key]  # the same run on one process, without FSDP
    assert "." in ref["pattern"]
    for rank in ranks:
        par = rank[key]
        assert par["fsdp"] == {"high": True, "low": True} and par["sp_bound"] == {"high": sp, "low": sp}
        shard, full = par["block0_params"]
        assert shard < full  # FULL_SHARD: a rank holds part of each block's parameters
        assert par["wrapped"] == {"high": True, "low": True} and par["fsdp_untouched_attached"]
        assert par["fsdp_untouched"] and par["restored"]
        assert par["pattern"] == ref["pattern"] and par["experts"] == ref["experts"]
        assert set(par["tokens"]["high"] + par["tokens"]["low"]) == {HALF if sp else ALL}
        assert rel_err(par["out"], ref["out"]) < RTOL
    assert torch.equal(ranks[0][key]["out"], ranks[1][key]["out"])
