"""cache_dtype and cache_device: where the cached residuals are kept between passes.

On the demo model: a host cache on the host is the same run bit for bit; a bf16 cache of the float32 model takes
the same decisions, holds half the bytes and stays within 0.2 % of the float32 cache's output. The copies a GPU
run makes (pinned host memory, non-blocking) are checked with stand-ins for a CUDA tensor and the pinned
allocator. Every entry point takes the options and refuses bad values before loading anything."""
import warnings

import pytest
import torch

import stepcache
from stepcache import storage
from stepcache.policies import ParameterError
from stepcache.storage import CacheStorage
from stepcache.wan21.demo.model import PROFILE, DemoPipeline, load

pytest.importorskip("diffusers")

PROMPT = "a red square moving right on a dark background"
STEPS = 14


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(1)
    return DemoPipeline(load())


def run(demo, method, **options):
    stepcache.enable(demo.pipe, method, profile=str(PROFILE), **options)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            latents = demo.latents([PROMPT], [1], steps=STEPS)
        return latents, stepcache.stats(demo.pipe).to_dict()
    finally:
        stepcache.disable(demo.pipe)


@pytest.mark.parametrize("method", ["magcache", "teacache", "easycache"])
def test_a_host_cache_on_the_host_is_the_same_run_and_a_bf16_cache_within_tolerance(demo, method):
    plain, plain_stats = run(demo, method)
    assert "." in plain_stats["pattern"]   # the run reuses passes, so the stored residuals are read
    on_host, host_stats = run(demo, method, cache_device="cpu")
    assert torch.equal(on_host, plain)
    assert "residuals kept on cpu" in host_stats["notes"]
    half, half_stats = run(demo, method, cache_dtype="bf16")
    assert half_stats["pattern"] == plain_stats["pattern"]
    assert not torch.equal(half, plain)    # the residuals really went through bf16
    assert (half - plain).abs().max() <= 2e-3 * plain.abs().max()
    if method != "easycache":   # the residual is all a STACK method keeps (TeaCache: + a small signal)
        for branch, nbytes in half_stats["cache_peak_bytes"].items():
            assert nbytes < 0.52 * plain_stats["cache_peak_bytes"][branch]


def test_linear_prediction_from_a_bf16_cache(demo):
    plain, plain_stats = run(demo, "magcache", predict="linear")
    half, half_stats = run(demo, "magcache", predict="linear", cache_dtype="bf16")
    assert half_stats["pattern"] == plain_stats["pattern"]
    assert (half - plain).abs().max() <= 5e-3 * plain.abs().max()
    assert half_stats["cache_peak_bytes"]["cond"] == plain_stats["cache_peak_bytes"]["cond"] // 2


# ------------------------------------------------------------------------------------ the GPU paths, stood in for
class FakeCudaTensor:
    """What CacheStorage reads of a tensor on a GPU, and the copies it asks for."""

    def __init__(self, shape=(2, 3), dtype=torch.float32):
        self.shape, self.dtype, self.device = torch.Size(shape), dtype, torch.device("cuda", 0)
        self.moves = []

    def to(self, *args, **kwargs):
        self.moves.append((args, kwargs))
        if args and isinstance(args[0], torch.dtype):
            return FakeCudaTensor(self.shape, args[0])
        return "moved"


class FakePinned:
    def __init__(self):
        self.copies = []

    def copy_(self, source, non_blocking=False):
        self.copies.append((source, non_blocking))
        return self


def test_a_gpu_residual_goes_to_pinned_host_memory_without_waiting(monkeypatch):
    made = []

    def pinned_empty(shape, dtype):
        made.append((shape, dtype))
        return FakePinned()
    monkeypatch.setattr(storage, "can_pin", lambda: True)
    monkeypatch.setattr(storage, "pinned_empty", pinned_empty)
    residual = FakeCudaTensor()
    kept = CacheStorage.of(device="cpu").keep(residual)
    assert made == [(torch.Size((2, 3)), torch.float32)]
    assert kept.copies == [(residual, True)]           # non-blocking
    halved = CacheStorage.of("bf16", "cpu").keep(FakeCudaTensor())
    assert made[-1] == (torch.Size((2, 3)), torch.bfloat16) and halved.copies[0][0].dtype == torch.bfloat16


def test_without_pinnable_memory_the_copy_is_a_plain_non_blocking_move(monkeypatch):
    monkeypatch.setattr(storage, "can_pin", lambda: False)
    monkeypatch.setattr(storage, "pinned_empty", lambda *a: pytest.fail("pinned memory without CUDA"))
    residual = FakeCudaTensor()
    assert CacheStorage.of(device="cpu").keep(residual) == "moved"
    assert residual.moves == [((torch.device("cpu"),), {"non_blocking": True})]


def test_a_stored_residual_is_brought_back_non_blocking_and_left_alone_where_it_is():
    kept = torch.randn(2, 3)
    assert CacheStorage.bring(kept, torch.device("cpu"), torch.float32) is kept
    assert CacheStorage.bring(kept, torch.device("cpu"), torch.bfloat16).dtype == torch.bfloat16
    assert CacheStorage().keep(kept) is kept and CacheStorage.of(device="cpu").keep(kept) is kept


# ---------------------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("options, words", [({"cache_dtype": "int8"}, "cache_dtype='int8' is not allowed"),
                                            ({"cache_dtype": torch.int32}, "allowed: bf16, fp16, fp32"),
                                            ({"cache_device": "tpu"}, "cache_device='tpu' is not allowed"),
                                            ({"cache_device": "cuda:0"}, "needs CUDA")])
def test_bad_storage_values_are_one_line_before_the_model_is_touched(demo, options, words):
    if torch.cuda.is_available() and "cuda_device" in words:
        pytest.skip("this machine has CUDA")
    forward = demo.pipe.transformer.forward
    with pytest.raises(ParameterError, match=words) as info:
        stepcache.enable(demo.pipe, "magcache", profile=str(PROFILE), **options)
    assert "\n" not in str(info.value)
    assert demo.pipe.transformer.forward == forward and getattr(demo.pipe.transformer, "_stepcache", None) is None


# --------------------------------------------------------------------------------------------- every entry point
def test_generate_takes_the_options_and_refuses_them_uncached(tmp_path):
    from stepcache import generate
    from wan_tiny import save_t2v_folder
    folder = save_t2v_folder(tmp_path / "tiny-wan")
    parser = __import__("argparse").ArgumentParser()
    generate.add_arguments(parser)
    common = ["--model", str(folder), "--prompt", "x", "--height", "32", "--width", "32",
              "--profile", "wan2.1-t2v-1.3b"]
    planned = generate.plan(parser.parse_args([*common, "--cache-dtype", "bf16", "--cache-device", "cpu"]))
    assert planned["storage"] == CacheStorage(torch.bfloat16, torch.device("cpu"))
    with pytest.raises(generate.GenerateError, match="--method none runs uncached"):
        generate.plan(parser.parse_args([*common, "--method", "none", "--cache-dtype", "bf16"]))
    with pytest.raises(ParameterError, match="cache_device='gpu'"):
        generate.plan(parser.parse_args([*common, "--cache-device", "gpu"]))


def test_the_wan_scripts_take_the_options():
    from test_wan_official_core import plan
    from stepcache.wan21.official_generate import PlanError
    for method, flags in (("magcache", ["--use_magcache"]), ("teacache", []), ("easycache", [])):
        assert plan(method, [*flags, "--cache_dtype", "fp16"]).storage == CacheStorage(torch.float16)
        assert plan(method, flags).storage.default
    with pytest.raises(PlanError, match="cache_device='x'"):
        plan("teacache", ["--cache_device", "x"])
    with pytest.raises(PlanError, match="--cache_dtype has no effect without --use_magcache"):
        plan("magcache", ["--cache_dtype", "bf16"])


def test_the_opensora_scripts_take_the_options_and_record_them():
    from stepcache.opensora.generate_set import PlanError, build_parser, resolve_cache
    parser = build_parser()
    args = parser.parse_args(["--prompt", "x", "--out", "o", "--method", "magcache", "--cache-dtype", "bf16",
                              "--cache-device", "cpu"])
    _, _, enable_params, recorded = resolve_cache("magcache", args)
    assert enable_params["cache_dtype"] == recorded["cache_dtype"] == "bf16"
    assert enable_params["cache_device"] == recorded["cache_device"] == "cpu"
    with pytest.raises(PlanError, match="no cache flags"):
        resolve_cache("none", parser.parse_args(["--prompt", "x", "--out", "o", "--method", "none", "--cache-dtype", "bf16"]))
    with pytest.raises(ParameterError, match="cache_device='x'"):
        resolve_cache("magcache", parser.parse_args(["--prompt", "x", "--out", "o", "--method", "magcache", "--cache-device", "x"]))
