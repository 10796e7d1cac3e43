"""What the cache keeps between passes, per CFG branch, as stepcache.stats reports it: one residual-sized tensor
when reusing, two with linear prediction, plus TeaCache's previous signal; counted from the tensors the runner
holds, checked against the block stack's own hidden-state size."""
import warnings

import pytest
import torch

import stepcache
from stepcache.wan21.demo.model import PROFILE, DemoPipeline, load

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return DemoPipeline(load())


def held(demo, method, **params):
    sizes = []
    hook = demo.pipe.transformer.blocks[0].register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].numel() * args[0].element_size()))
    stepcache.enable(demo.pipe, method, profile=str(PROFILE), **params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo.latents(["a red square moving right on a dark background"], [1], steps=30)
    stats = stepcache.stats(demo.pipe)
    stepcache.disable(demo.pipe)
    hook.remove()
    return stats, max(sizes)


@pytest.mark.parametrize("predict,tensors", [("reuse", 1), ("linear", 2)])
def test_magcache_holds_one_residual_per_branch_or_two_predicting_linearly(demo, predict, tensors):
    stats, residual = held(demo, "magcache", predict=predict)
    assert stats.to_dict()["cache_peak_bytes"] == {"cond": tensors * residual, "uncond": tensors * residual}
    assert "cache held at most" in stats.summary()


def test_teacache_also_holds_its_previous_signal(demo):
    stats, residual = held(demo, "teacache")
    per_branch = stats.to_dict()["cache_peak_bytes"]
    assert set(per_branch) == {"cond", "uncond"}
    assert all(residual < v < 1.1 * residual for v in per_branch.values())   # + the timestep embedding


@pytest.mark.parametrize("predict", ["reuse", "linear"])
def test_a_computed_pass_runs_its_blocks_without_the_tensor_it_is_about_to_replace(demo, predict):
    """At the peak of a computed pass (inside the block stack) the branch holds one residual-sized tensor fewer:
    reusing, none (the last residual is replaced when the stack ends); predicting linearly, only the last one."""
    cached = stepcache.enable(demo.pipe, "magcache", profile=str(PROFILE), predict=predict)
    seen = []

    def inside(module, args):
        runner = cached.runner
        if runner.current.decision.compute:     # (a reused pass passes its blocks by: they run nothing)
            state = runner.branches[runner.current.branch]
            seen.append((state.residual is not None) + (state.older_residual is not None))
    middle = demo.pipe.transformer.blocks[len(demo.pipe.transformer.blocks) // 2]
    hook = middle.register_forward_pre_hook(inside)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo.latents(["a red square moving right on a dark background"], [1], steps=30)
    hook.remove()
    stepcache.disable(demo.pipe)
    assert seen and max(seen) == (0 if predict == "reuse" else 1)
