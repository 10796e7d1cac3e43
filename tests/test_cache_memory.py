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


def test_the_meta_shapes_give_what_the_runner_holds_on_a_real_run(demo):
    """The docs' memory table multiplies shapes read on the meta device by tensor counts measured on the demo;
    on the demo itself, that product must be what stepcache's stats report for a real run."""
    from stepcache.eval.cache_memory import shapes_on_meta
    config = {k: v for k, v in dict(demo.pipe.transformer.config).items() if not k.startswith("_")}
    latents = []
    hook = demo.pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: latents.append(kwargs["hidden_states"].shape), with_kwargs=True)
    stats, residual = held(demo, "magcache", predict="linear")
    hook.remove()
    shapes = shapes_on_meta("WanTransformer3DModel", config, list(latents[0][1:]), 12, "float32")
    assert shapes["hidden_bytes"] == residual
    assert stats.to_dict()["cache_peak_bytes"]["cond"] == 2 * shapes["hidden_bytes"]


def test_the_table_covers_the_listed_models_with_their_published_widths():
    import json
    from stepcache.eval.cache_memory import DATA, shapes_on_meta
    from stepcache.profiles import load_profile
    wan14 = next(e for e in json.loads(DATA.read_text())["models"]
                 if e["source"] == "Wan-AI/Wan2.1-T2V-14B-Diffusers" and e["size"].startswith("1280x720"))
    shipped = load_profile("wan2.1-t2v-14b").data["model"]["config"]
    assert all(wan14["config"][k] == v for k, v in shipped.items())      # the same model the profile is for
    shapes = shapes_on_meta(wan14["class"], wan14["config"], wan14["latent"], wan14["text_tokens"], wan14["dtype"])
    assert shapes["hidden_shape"] == [1, 75600, 5120]                   # 21 x 45 x 80 tokens at 720p, 40 x 128 wide
    assert shapes["signal_bytes"] == 0                                   # Wan's TeaCache signal: the timestep's
    hunyuan = next(e for e in json.loads(DATA.read_text())["models"] if e["name"] == "HunyuanVideo")
    shapes = shapes_on_meta(hunyuan["class"], hunyuan["config"], hunyuan["latent"], hunyuan["text_tokens"],
                            hunyuan["dtype"])
    assert shapes["signal_bytes"] == shapes["hidden_bytes"]              # block 0's modulated input: token-sized


def test_the_temporaries_of_a_predicted_pass_and_of_a_mean_are_halved():
    """Counted on meta tensors: a reused pass with linear prediction holds one residual-sized tensor (its output)
    where the expression it replaced held two; mean|t| of a bf16 tensor holds a float32 copy where the published
    expression held two. The counter itself is checked on an expression whose temporaries are known."""
    from stepcache.eval.cache_memory import mean_abs_before, transient_bytes, transients
    from stepcache.runner import mean_abs
    a = torch.empty(4, 8, device="meta")
    assert transient_bytes(lambda: (a + a) * 2) == 2 * a.numel() * 4       # the sum is alive while scaled
    assert transient_bytes(lambda: (a + a).mul_(2)) == a.numel() * 4       # in place: one tensor
    shape = [1, 300, 64]
    residual = 300 * 64 * 2                                                 # bf16
    t = transients(shape, "bfloat16")
    assert (t["linear_before"], t["linear_now"]) == (2 * residual, residual)
    assert (t["mean_abs_before"], t["mean_abs_now"]) == (4 * residual, 2 * residual + 4)
    signal = torch.randn(shape, dtype=torch.bfloat16)
    assert torch.equal(mean_abs(signal), mean_abs_before(signal))          # the same value, bit for bit


def test_open_sora_shapes_from_the_forks_own_model():
    """Opt-in (OPENSORA_REPO): the VideoSys fork's STDiT3-XL/2 built on the meta device at the published 480p, 51
    frames: its block stack takes both CFG halves, 15 x 30 x 53 tokens each, 1,152 wide (the fork's imports of
    colossalai and timm are the tests' stand-ins, which change no shape)."""
    import json
    from helpers import opensora_checkout
    repo = str(opensora_checkout())
    import opensora_fork
    opensora_fork.load(repo)
    from stepcache.eval.cache_memory import DATA, fork_shapes_on_meta
    entry = next(e for e in json.loads(DATA.read_text())["models"] if e.get("code") == "videosys-fork")
    shapes = fork_shapes_on_meta(repo, entry)
    assert shapes["hidden_shape"] == [2, 15 * 30 * 53, 1152] and shapes["hidden_bytes"] == 2 * 23850 * 1152 * 2
    assert shapes["latent_shape"] == [2, 4, 15, 60, 106] and shapes["latent_bytes"] == 2 * 4 * 15 * 60 * 106 * 4


def test_without_the_fork_its_row_is_named_not_computed(monkeypatch):
    from stepcache.eval import cache_memory
    monkeypatch.setattr(cache_memory, "demo_tensor_counts", lambda: {cache_memory.mode_name(m, p): 1.0
                                                                      for m, p in cache_memory.MODES})
    monkeypatch.setattr(cache_memory, "shapes_on_meta", lambda *a: {"hidden_shape": [1, 2, 3], "hidden_bytes": 12,
                                                                    "latent_shape": [1], "latent_bytes": 4,
                                                                    "signal_bytes": 0})
    result = cache_memory.table(None)
    assert all("Open-Sora" not in row["name"] for row in result["rows"])
    assert result["skipped"] == ["Open-Sora 1.2 (STDiT3-XL/2): its model is the VideoSys fork's; pass "
                                 "--opensora-repo PATH"]
    assert "Not computed: Open-Sora 1.2" in cache_memory.markdown(result)
