"""diffusers' block-level group offloading beside the cache: a reused pass moves no block's weights in.

The hooks of group offloading onload a block's weights when the block is called. The cache's skipped blocks return
above those hooks, so a reused pass onloads only what the model's own code between the blocks needs (the group of
the top-level layers), and nothing at all where the whole forward is skipped (EasyCache). Counted on diffusers'
own ``ModuleGroup.onload_`` on a tiny Wan2.1 transformer, onloading to the CPU; the output is the one the same
cache gives without offloading."""

import pytest
import torch

from helpers import cached_run
from wan_tiny import build_t2v, run_t2v

pytest.importorskip("diffusers")
from diffusers.hooks import group_offloading  # noqa: E402

SETTINGS = {"magcache": {"thresh": 0.5}, "teacache": {"thresh": 800.0}, "easycache": {"thresh": 0.5}}


@pytest.fixture
def onloads(monkeypatch):
    """Per onload: the class of the group's first module (None for the group of the top-level layers alone)."""
    seen = []
    original = group_offloading.ModuleGroup.onload_

    def onload_(group):
        seen.append(type(group.modules[0]).__name__ if group.modules else None)
        return original(group)
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", onload_)
    return seen


def offload(pipe):
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    return pipe


def cached(pipe, method, offload_after_enable=False, **params):
    def run(pipe):
        if offload_after_enable:
            offload(pipe)
        return run_t2v(pipe)
    return cached_run(pipe, method, run, profile="wan2.1-t2v-1.3b", **params)


@pytest.mark.parametrize("method", ["magcache", "teacache", "easycache"])
def test_a_reused_pass_onloads_no_block(onloads, method):
    torch.set_num_threads(1)
    pipe = offload(build_t2v())
    blocks = len(pipe.transformer.blocks)
    assert blocks == 3
    baseline = run_t2v(pipe)
    per_pass = len(onloads) / 24          # 12 steps x 2 CFG branches
    assert per_pass == blocks + 1         # every block and the top-level group, once each
    onloads.clear()
    output, stats = cached(pipe, method, **SETTINGS[method])
    computed, total = stats.counts()
    assert 0 < computed < total
    block_onloads = sum(name == "WanTransformerBlock" for name in onloads)
    assert block_onloads == computed * blocks
    # the top-level group: every pass the model's forward runs (EasyCache skips the forward entirely)
    assert len(onloads) - block_onloads == (computed if method == "easycache" else total)
    plain, plain_stats = cached(build_t2v(), method, **SETTINGS[method])
    assert plain_stats.pattern() == stats.pattern() and torch.equal(output, plain)
    zero, _ = cached(pipe, method, thresh=0.0)
    assert torch.equal(zero, baseline)


def test_offloading_applied_after_enable_onloads_no_block_on_a_reused_pass(onloads):
    torch.set_num_threads(1)
    output, stats = cached(build_t2v(), "magcache", offload_after_enable=True, **SETTINGS["magcache"])
    computed, total = stats.counts()
    assert 0 < computed < total
    assert sum(name == "WanTransformerBlock" for name in onloads) == computed * 3
    plain, _ = cached(build_t2v(), "magcache", **SETTINGS["magcache"])
    assert torch.equal(output, plain)
