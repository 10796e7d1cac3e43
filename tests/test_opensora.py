"""Open-Sora 1.2 without the VideoSys fork: the policy side (published MagCache schedules, both rules, the profile's
defaults), and the STDiT3 adapter on a stand-in with the fork's interface (tests/opensora_tiny.py)."""
import subprocess
import sys

import pytest
import torch

import stepcache
from stepcache.methods import resolve_method
from stepcache.policies import ParameterError
from stepcache.profiles import load_profile
from stepcache.opensora.adapter import (BRANCH, MultiGPUNotSupported, STDiT3Adapter, block0_modulated_input,
                                        blocks_in_call_order)
from stepcache.opensora.rules import RELEASED, REFERENCE, magcache_profile, released_profile, schedule
from stepcache.runner import NothingCachedWarning

from helpers import BlockWork
from opensora_tiny import STDiT3, model_args, sample

# The MagCache eval README (eval/magcache): 0.12/K3 computes 12 of 30 steps, 0.24/K5 10 of 30.
PUBLISHED_E012K3 = "CCCCCC...C...C...C...C...C...C"
PUBLISHED_E024K5 = "CCCCCC.....C.....C.....C.....C"


# ------------------------------------------------------------------------------------------- policy side
def test_schedule_command_prints_the_published_pattern():
    result = subprocess.run([sys.executable, "-m", "stepcache.cli", "schedule", "--profile", "opensora-1.2",
                             "--method", "magcache", "--steps", "30", "--thresh", "0.12", "--K", "3"],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert PUBLISHED_E012K3 in lines
    assert "computed 12/30 passes (ideal speedup 2.50x)" in lines


def test_profile_default_is_the_rule_the_published_numbers_used():
    config = resolve_method("magcache", "opensora-1.2")
    assert {k: config.params[k] for k in ("thresh", "K", "retention_ratio")} == {"thresh": 0.12, "K": 3,
                                                                                "retention_ratio": 0.2}
    section = load_profile("opensora-1.2").method("magcache")
    assert (section["ratio_power"], section["absolute_error"], section["inclusive"]) == (0.5, False, True)
    assert magcache_profile(REFERENCE).name == "opensora-1.2"
    assert schedule(REFERENCE) == (PUBLISHED_E012K3, 12, 30)


@pytest.mark.parametrize("preset, pattern, computed", [("E012K3R02", PUBLISHED_E012K3, 12),
                                                        ("E024K5R02", PUBLISHED_E024K5, 10)])
def test_reference_rule_presets_give_the_published_schedules(preset, pattern, computed):
    from stepcache.schedule import simulate
    stats = simulate(resolve_method("magcache", "opensora-1.2", preset), 30)
    assert stats.pattern() == pattern
    assert stats.counts() == (computed, 30)


def test_reference_rule_retains_six_of_thirty_steps_and_indexes_t_minus_one():
    from stepcache.schedule import simulate
    stats = simulate(resolve_method("magcache", "opensora-1.2", thresh=0.12, K=3), 30)
    reasons = [r.reason for r in stats.of()]
    assert reasons[:6] == ["warmup"] * 6 and reasons[6] == "reuse"
    # MC-OS indexes its 29 ratios with t - 1; the profile pads a 1.0 in front so that index = step.
    ratios = load_profile("opensora-1.2").method("magcache")["ratios"]
    assert len(ratios) == 30 and ratios[0] == 1.0 and ratios[1] == 0.93359 and ratios[-1] == 0.96484
    # accumulated error at step 6 (first reuse): 1 - sqrt(ratio[6]) with no abs (MC-OS:301)
    assert stats.of()[6].accumulator == pytest.approx(1 - 0.99609 ** 0.5)


def test_released_rule_is_a_named_alternative():
    profile = released_profile()
    assert profile.name == "opensora-1.2-released"
    section = profile.method("magcache")
    assert (section["ratio_power"], section["absolute_error"]) == (1.0, True)
    assert section["ratios"] == load_profile("opensora-1.2").method("magcache")["ratios"]
    assert schedule(RELEASED, thresh=0.12, K=3) == ("CCCCCC...C...C...C...C...C..C.", 12, 30)
    assert schedule(RELEASED, thresh=0.24, K=5) == ("CCCCCC.....C.....C.....C....C.", 10, 30)
    with pytest.raises(ValueError, match="unknown MagCache rule"):
        magcache_profile("paper")


def test_rules_command_prints_both_rules_and_writes_a_profile(tmp_path):
    from stepcache.opensora.rules import main
    target = tmp_path / "released.json"
    assert main(["--write", str(target)]) == 0
    result = subprocess.run([sys.executable, "-m", "stepcache.cli", "schedule", "--profile", str(target),
                             "--preset", "E024K5R02"], capture_output=True, text=True, check=True)
    assert "CCCCCC.....C.....C.....C....C." in result.stdout


def test_easycache_section_is_derived_and_documented_as_such():
    section = load_profile("opensora-1.2").method("easycache")
    assert section["derived"] is True and "derived, not published" in section["source"]
    config = resolve_method("easycache", "opensora-1.2")
    assert (config.params["thresh"], config.params["warmup_steps"], config.params["force_last"],
            config.params["decide_on"]) == (0.05, 6, True, None)


def test_teacache_published_thresholds():
    assert resolve_method("teacache", "opensora-1.2", "slow").params["thresh"] == 0.1
    assert resolve_method("teacache", "opensora-1.2", "fast").params["thresh"] == 0.2


# ---------------------------------------------------------------------------------------------- adapter
@pytest.fixture(scope="module")
def tiny():
    return STDiT3().eval()


@pytest.fixture(scope="module")
def z0():
    return torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def baseline(tiny, z0):
    outputs = []
    with torch.no_grad():
        final = sample(tiny, z0, model_args(), outputs=outputs)
    return final, outputs


def _run(model, z0, method, outputs=None, dtype=torch.float32, **params):
    cached = stepcache.enable(model, method, profile="opensora-1.2", **params)
    try:
        with torch.no_grad():
            final = sample(model, z0.to(dtype), model_args(dtype=dtype), outputs=outputs)
        return final, cached.stats
    finally:
        stepcache.disable(model)


def test_adapter_is_registered_and_blocks_are_in_call_order(tiny):
    from stepcache.api import adapter_for
    assert isinstance(adapter_for(tiny), STDiT3Adapter)
    order = blocks_in_call_order(tiny)
    assert order[0] is tiny.spatial_blocks[0] and order[1] is tiny.temporal_blocks[0]
    assert order[-1] is tiny.temporal_blocks[-1] and len(order) == 2 * len(tiny.spatial_blocks)


@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_threshold_zero_is_bit_identical(tiny, z0, baseline, method):
    outputs = []
    with pytest.warns(NothingCachedWarning):
        final, stats = _run(tiny, z0, method, outputs, thresh=0)
    assert torch.equal(final, baseline[0])
    assert all(torch.equal(a, b) for a, b in zip(outputs, baseline[1])) and len(outputs) == 30
    assert stats.counts() == (30, 30)
    assert type(tiny).forward is STDiT3.forward and "forward" not in tiny.__dict__  # disabled exactly


def test_magcache_gives_the_published_pattern_through_the_sampler(tiny, z0, baseline):
    work = BlockWork(tiny, ("spatial_blocks", "temporal_blocks"))
    try:
        final, stats = _run(tiny, z0, "magcache")
    finally:
        work.remove()
    assert stats.pattern() == PUBLISHED_E012K3
    assert stats.branches() == [BRANCH]
    # A reused pass runs no block, a computed one the whole stack (the same work on every computed pass).
    assert work.ran() == PUBLISHED_E012K3 and set(work.block) == {0, max(work.block)}
    assert not torch.equal(final, baseline[0])
    _, stats = _run(tiny, z0, "magcache", preset="E024K5R02")
    assert stats.pattern() == PUBLISHED_E024K5


def test_bf16_start_latent_does_not_split_the_generation(tiny, z0):
    """The pipeline starts RFlow from a bf16 latent that is float32 from step 1 on (the forward returns float32):
    one generation of 30 passes, not 1 + 29."""
    model = STDiT3().eval().to(torch.bfloat16)
    _, stats = _run(model, z0, "magcache", dtype=torch.bfloat16)
    assert stats.generation_ids() == [1] and stats.pattern() == PUBLISHED_E012K3


def test_teacache_forces_first_and_last_step_by_index(tiny, z0):
    """The reference compares timestep[0] with int() of the bf16 schedule, so its last step is forced only when
    that value is an integer. Here the schedule's last timestep is not (143.1-like), and it is still forced."""
    _, stats = _run(tiny, z0, "teacache", thresh=50.0)  # so large that only forced steps compute
    records = stats.of()
    assert [r.reason for r in records][0] == "warmup" and records[-1].reason == "forced-last"
    assert stats.pattern() == "C" + "." * 28 + "C"


def test_teacache_signal_is_block0_modulated_input(tiny):
    block = tiny.spatial_blocks[0]
    x, t_mlp = torch.randn(2, 48, 32), torch.randn(2, 6 * 32)
    shift, scale = (block.scale_shift_table[None] + t_mlp.reshape(2, 6, -1)).chunk(6, dim=1)[:2]
    expected = block.norm1(x) * (1 + scale) + shift
    got = block0_modulated_input(block, (x, None, t_mlp), {})
    assert torch.equal(got, expected)


def test_every_generation_starts_fresh(tiny, z0):
    cached = stepcache.enable(tiny, "magcache", profile="opensora-1.2")
    try:
        with torch.no_grad():
            sample(tiny, z0, model_args())
            sample(tiny, z0, model_args())
        assert cached.stats.generation_ids() == [1, 2]
        assert cached.stats.pattern(1) == cached.stats.pattern(2) == PUBLISHED_E012K3
    finally:
        stepcache.disable(tiny)


def test_easycache_reuses_in_the_velocity_space_with_the_output_shape(tiny, z0, baseline):
    outputs = []
    _, stats = _run(tiny, z0, "easycache", outputs, thresh=0.5, warmup_steps=3)
    computed, total = stats.counts()
    assert total == 30 and computed < 30
    reused = [i for i, r in enumerate(stats.of()) if not r.computed]
    for i in reused:
        assert outputs[i].shape == baseline[1][i].shape and outputs[i].dtype == torch.float32
        # the sigma half of a reused pass is the last computed pass's
        last = max(j for j in range(i) if stats.of()[j].computed)
        assert torch.equal(outputs[i][:, 4:], outputs[last][:, 4:])


def test_multi_gpu_is_refused_with_a_clear_message():
    model = STDiT3().eval()
    model.parallel_manager.sp_size = 2
    with pytest.raises(MultiGPUNotSupported, match="enable it on every rank with that group"):
        stepcache.enable(model, "magcache", profile="opensora-1.2")
    assert "forward" not in model.__dict__


def test_parallel_enabled_after_the_cache_is_refused_at_the_call(tiny, z0):
    model = STDiT3().eval()
    stepcache.enable(model, "magcache", profile="opensora-1.2")
    model.parallel_manager.cp_size = 2
    try:
        with pytest.raises(MultiGPUNotSupported):
            with torch.no_grad():
                sample(model, z0, model_args(), steps=3)
    finally:
        stepcache.disable(model)


def _sequence_parallel(model, sp_size=2, sp_rank=0, cp_size=1):
    import types
    manager = types.SimpleNamespace(sp_size=sp_size, sp_rank=sp_rank, cp_size=cp_size, dp_size=1)
    for module in model.modules():
        if hasattr(module, "parallel_manager"):
            module.parallel_manager = manager
    return manager


class _Group:
    """What check_parallel_setup reads of a stepcache.distributed.SequenceGroup (its size)."""

    def __init__(self, size):
        self.size = size


def test_sequence_parallel_needs_the_group_and_cfg_parallel_is_refused():
    from stepcache.opensora.adapter import check_parallel_setup
    model = STDiT3().eval()
    _sequence_parallel(model, sp_size=2)
    check_parallel_setup(model, _Group(2))  # the sequence-parallel group: accepted
    for group in (None, _Group(1), _Group(4)):
        with pytest.raises(MultiGPUNotSupported, match="sequence parallel over 2 ranks"):
            check_parallel_setup(model, group)
    _sequence_parallel(model, sp_size=1, cp_size=2)
    with pytest.raises(MultiGPUNotSupported, match="CFG parallel"):
        check_parallel_setup(model, _Group(2))


def test_teacache_signal_leaves_out_the_forks_padding_frames(monkeypatch):
    """Under sequence parallelism the fork pads the frame count to a multiple of sp_size with zero frames at the end
    (set_pad/split_sequence): the last rank's signal covers its real frames only."""
    import sys
    import types

    from stepcache.opensora.adapter import real_frames
    model = STDiT3().eval()
    block = model.spatial_blocks[0]
    fork_module = types.ModuleType("fake_fork_transformer")
    fork_module.get_pad = lambda name: {"temporal": 1}[name]  # 3 frames over 2 ranks: one padding frame
    monkeypatch.setitem(sys.modules, "fake_fork_transformer", fork_module)
    monkeypatch.setattr(type(block), "__module__", "fake_fork_transformer")
    frames, tokens, hidden = 2, 5, block.norm1.normalized_shape[0]
    x = torch.randn(2, frames * tokens, hidden)
    t_mlp = torch.randn(2, 6 * hidden)
    args = (x, None, t_mlp, None, None, None, frames, tokens)
    _sequence_parallel(model, sp_size=2, sp_rank=0)
    assert real_frames(block, frames) == 2 and block0_modulated_input(block, args, {}).shape[1] == 2 * tokens
    _sequence_parallel(model, sp_size=2, sp_rank=1)
    assert real_frames(block, frames) == 1
    last = block0_modulated_input(block, args, {})
    assert last.shape[1] == tokens
    _sequence_parallel(model, sp_size=1)
    assert torch.equal(block0_modulated_input(block, args, {})[:, :tokens], last)


def test_profile_detection_and_a_wrong_profile():
    from stepcache.profiles import ProfileError
    adapter = STDiT3Adapter()
    big = STDiT3(depth=1)
    big.config.depth, big.config.hidden_size = 28, 1152
    assert [p.name for p in adapter.detect_profiles(big)] == ["opensora-1.2"]
    with pytest.raises(ProfileError):
        stepcache.enable(STDiT3(), "magcache")  # a tiny config matches no shipped profile
    with pytest.raises(ProfileError, match="opensora"):
        stepcache.enable(STDiT3(), "magcache", profile="wan2.1-t2v-1.3b")
    with pytest.raises(ParameterError):
        stepcache.enable(STDiT3(), "magcache", profile="opensora-1.2", K=0)
