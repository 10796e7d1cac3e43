"""Open-Sora 1.2 on the VideoSys fork itself (``OPENSORA_REPO`` = a Zehong-Ma/MagCache or ali-vilab/TeaCache
checkout): a tiny fork ``STDiT3`` driven by the fork's own ``RFLOW.sample``, on CPU (see opensora_fork.py for the
import-only stand-ins). The published forwards of ``eval/magcache/experiments/opensora.py`` are the reference."""
import contextlib
import io

import pytest
import torch

from helpers import BlockWork, opensora_checkout
from opensora_fork import published_model, sample, tiny_model, model_args

REPO = str(opensora_checkout())

import stepcache  # noqa: E402
from stepcache.opensora.adapter import BRANCH, MultiGPUNotSupported, blocks_in_call_order  # noqa: E402
from stepcache.opensora.rules import released_profile  # noqa: E402
from stepcache.runner import NothingCachedWarning  # noqa: E402

PUBLISHED_E012K3 = "CCCCCC...C...C...C...C...C...C"
PUBLISHED_E024K5 = "CCCCCC.....C.....C.....C.....C"


_SETUPS = {}


def _setup(dtype):
    if dtype not in _SETUPS:
        model = tiny_model(REPO, dtype=dtype)
        z0 = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
        args = model_args(dtype=dtype)
        outputs = []
        final = sample(REPO, model, z0, args, outputs=outputs)
        _SETUPS[dtype] = dict(model=model, z0=z0, args=args, final=final, outputs=outputs, dtype=dtype)
    return _SETUPS[dtype]


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def setup(request):
    return _setup(request.param)


@pytest.fixture
def fp32():
    return _setup(torch.float32)


@pytest.fixture
def bf16():
    return _setup(torch.bfloat16)


def run(s, method, profile="opensora-1.2", **params):
    model = s["model"]
    cached = stepcache.enable(model, method, profile=profile, **params)
    outputs = []
    try:
        final = sample(REPO, model, s["z0"], s["args"], outputs=outputs)
        return final, outputs, cached.stats
    finally:
        stepcache.disable(model)


def run_published(s, method, **settings):
    """The published forward on a copy of the model; returns (final, outputs, pattern of computed steps)."""
    ref = published_model(REPO, s["model"], method, **settings)
    work = BlockWork(ref, ("spatial_blocks", "temporal_blocks"))
    outputs = []
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # MC-OS prints on every skip
            final = sample(REPO, ref, s["z0"], s["args"], outputs=outputs)
    finally:
        work.remove()
    assert set(work.block) <= {0, max(work.block)}, "a pass ran part of the block stack"
    return final, outputs, work.ran()


def identical(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_fork_class_is_the_one_patched(setup):
    model = setup["model"]
    assert type(model).__name__ == "STDiT3" and type(model).__module__.startswith("videosys.")
    assert setup["outputs"][0].shape == (2, 8, 3, 8, 8)  # batched CFG, pred_sigma: twice the channels
    order = blocks_in_call_order(model)
    assert order[0] is model.spatial_blocks[0] and order[-1] is model.temporal_blocks[-1]


@pytest.mark.parametrize("method", ["teacache", "magcache", "easycache"])
def test_threshold_zero_is_bit_identical_to_the_unpatched_model(setup, method):
    with pytest.warns(NothingCachedWarning):
        final, outputs, stats = run(setup, method, thresh=0)
    assert torch.equal(final, setup["final"]) and identical(outputs, setup["outputs"])
    assert stats.counts() == (30, 30)
    assert "forward" not in setup["model"].__dict__  # removed exactly


@pytest.mark.parametrize("preset, pattern", [("E012K3R02", PUBLISHED_E012K3), ("E024K5R02", PUBLISHED_E024K5)])
def test_magcache_reference_rule_gives_the_published_pattern(setup, preset, pattern):
    final, outputs, stats = run(setup, "magcache", preset=preset)
    assert stats.pattern() == pattern and stats.branches() == [BRANCH]
    assert stats.counts() == (pattern.count("C"), 30)


@pytest.mark.parametrize("thresh, K", [(0.12, 3), (0.24, 5)])
def test_magcache_matches_the_published_forward_bit_for_bit(setup, thresh, K):
    final, outputs, stats = run(setup, "magcache", thresh=thresh, K=K)
    ref_final, ref_outputs, ref_pattern = run_published(setup, "magcache", thresh=thresh, K=K)
    assert ref_pattern == stats.pattern()
    assert torch.equal(final, ref_final) and identical(outputs, ref_outputs)


def test_magcache_released_rule(fp32):
    _, _, stats = run(fp32, "magcache", profile=released_profile(), thresh=0.12, K=3)
    assert stats.pattern() == "CCCCCC...C...C...C...C...C..C."


@pytest.mark.parametrize("thresh", [0.1, 0.2])
def test_teacache_matches_the_published_forward_in_bf16(bf16, thresh):
    """In bf16 (the published runs' dtype) the published last-step test fires at 480p (143.0 == int(143.0)), so
    the published forward and ours agree bit for bit."""
    final, outputs, stats = run(bf16, "teacache", thresh=thresh)
    ref_final, ref_outputs, ref_pattern = run_published(bf16, "teacache", thresh=thresh)
    assert ref_pattern == stats.pattern() and ref_pattern.endswith("C")
    assert torch.equal(final, ref_final) and identical(outputs, ref_outputs)


def test_teacache_forces_the_last_step_by_index_where_bf16_equality_fails(fp32):
    """In float32 the last timestep is 143.1 against int() 143 in all_timesteps: the published test never fires; forcing by step index does. Everything before the last step is identical."""
    final, outputs, stats = run(fp32, "teacache", thresh=0.1)
    ref_final, ref_outputs, ref_pattern = run_published(fp32, "teacache", thresh=0.1)
    assert stats.of()[-1].reason == "forced-last" and stats.pattern().endswith("C")
    assert ref_pattern.endswith(".")
    assert ref_pattern[:-1] == stats.pattern()[:-1] and identical(outputs[:-1], ref_outputs[:-1])


def test_easycache_on_the_fork(fp32):
    final, outputs, stats = run(fp32, "easycache", thresh=0.5, warmup_steps=3)
    computed, total = stats.counts()
    assert total == 30 and computed < 30
    for record, out in zip(stats.of(), outputs):
        assert out.shape == (2, 8, 3, 8, 8) and out.dtype == torch.float32
    assert not torch.equal(final, fp32["final"])


def test_sequence_parallel_is_refused(fp32):
    model = tiny_model(REPO)
    manager = type(model.parallel_manager)
    model.parallel_manager = manager(cp_size=1, sp_size=2, dp_size=1)
    with pytest.raises(MultiGPUNotSupported, match="enable it on every rank with that group"):
        stepcache.enable(model, "magcache", profile="opensora-1.2")
    assert "forward" not in model.__dict__


def test_generate_set_on_the_forks_own_pipeline(tmp_path):
    """generate_set drives the fork's OpenSoraPipeline.generate() and save_video() unchanged (fake T5 and VAE, in a
    subprocess; see opensora_fork_pipeline.py): baseline, MagCache 0.12/K3, and MagCache at threshold 0."""
    opensora_checkout(pipeline=True)  # the pipeline module imports more than the transformer
    import json
    import subprocess
    import sys
    from pathlib import Path

    import imageio.v3 as iio

    from stepcache.eval.manifest import load_manifest

    driver = Path(__file__).with_name("opensora_fork_pipeline.py")
    common = ["--prompt", "a cat on a mat", "--prompt", "a dog", "--resolution", "144p", "--aspect-ratio", "1:1",
              "--num-frames", "17"]
    runs = {"base": ["--method", "none"], "magcache": ["--method", "magcache", "--preset", "E012K3R02"],
            "zero": ["--method", "magcache", "--thresh", "0"]}
    argv = [sys.executable, str(driver), REPO]
    for name, flags in runs.items():
        argv += ["--", *common, *flags, "--out", str(tmp_path / name)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    names = ["a cat on a mat-0.mp4", "a dog-0.mp4"]
    for name in runs:
        assert sorted(load_manifest(tmp_path / name).videos) == names
    sidecar = json.loads((tmp_path / "magcache" / "opensora_set.json").read_text())
    assert [sidecar["videos"][n]["pattern"] for n in names] == [PUBLISHED_E012K3] * 2
    for n in names:
        base = iio.imread(tmp_path / "base" / n)
        assert base.shape[0] == 17 and base.dtype.name == "uint8"
        assert (iio.imread(tmp_path / "zero" / n) == base).all()
        assert not (iio.imread(tmp_path / "magcache" / n) == base).all()
