"""Caching composes with torch.compile: enable on a compiled transformer (torch.compile(model), model.compile()),
compile after enable (whole model, or regional with diffusers' compile_repeated_blocks, fullgraph), either order.

Each case runs two generations on the demo model with dynamo's "eager" backend (the same tracing, guards and
graph breaks as inductor, without code generation, so the output must equal the uncompiled cached run bit for bit)
and with ``error_on_recompile``: no pass, branch or step may recompile. The speed of compiled-and-cached runs is
measured by ``python -m stepcache.eval.bench_compile`` (docs/design.md#torchcompile), not here.
"""
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import stepcache
from stepcache.wan21.demo.model import PROFILE, DemoPipeline, load

pytest.importorskip("diffusers")

PROMPTS = ("a red square moving right on a dark background", "a blue disc moving up on a light background")
METHODS = ("teacache", "magcache", "easycache")
MODES = ("torch.compile(model) before", "torch.compile(model) after", "model.compile() after",
         "model.compile() before", "regional fullgraph after", "regional fullgraph before")


def compile_model(pipe, mode: str, when: str) -> None:
    if not mode.endswith(when):
        return
    if mode.startswith("torch.compile(model)"):
        pipe.transformer = torch.compile(pipe.transformer, backend="eager")
    elif mode.startswith("model.compile()"):
        pipe.transformer.compile(backend="eager")
    else:
        pipe.transformer.compile_repeated_blocks(backend="eager", fullgraph=True)


def generate(method: str, mode: str | None):
    """Latents of both prompts, the pass pattern, and dynamo's counters over the two generations."""
    torch._dynamo.reset()
    demo = DemoPipeline(load())
    pipe = demo.pipe
    if mode:
        compile_model(pipe, mode, "before")
    stepcache.enable(pipe, method, profile=str(PROFILE))
    if mode:
        compile_model(pipe, mode, "after")
    counters.clear()
    with warnings.catch_warnings(), torch._dynamo.config.patch(error_on_recompile=True):
        warnings.simplefilter("ignore")
        latents = [demo.latents([p], [1], steps=30) for p in PROMPTS]
    patterns = [stepcache.stats(pipe).pattern(g) for g in stepcache.stats(pipe).generation_ids()]
    graphs = counters["stats"]["unique_graphs"]
    stepcache.disable(pipe)
    return latents, patterns, graphs, pipe


def pipe_children():
    return list(DemoPipeline(load()).pipe.transformer.children())


@pytest.fixture(scope="module")
def eager():
    torch.set_num_threads(1)
    return {method: generate(method, None) for method in METHODS}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", METHODS)
def test_compiled_and_cached_equals_cached_without_recompiling(eager, method, mode):
    latents, patterns, graphs, _ = generate(method, mode)
    want_latents, want_patterns, _, _ = eager[method]
    assert patterns == want_patterns and any("." in p or "-" in p for p in patterns)   # some passes reused
    for got, want in zip(latents, want_latents):
        assert torch.equal(got, want)
    # one graph for all the blocks alike, and with the whole model compiled one per embedding or head module (it is
    # compiled block by block, its code between the blocks eager); never one per step or branch (error_on_recompile
    # would have raised on any recompile)
    parts = [c for c in pipe_children() if not isinstance(c, torch.nn.ModuleList)]
    assert graphs == 1 if mode.startswith("regional") else 1 <= graphs <= 1 + len(parts), graphs


def test_disable_hands_back_a_model_compiled_the_way_it_was_asked():
    _, _, _, pipe = generate("magcache", "regional fullgraph after")
    blocks = pipe.transformer.blocks
    assert all(b.__dict__.get("_compiled_call_impl") is not None for b in blocks)   # nn.Module.compile's own
    assert all("forward" not in b.__dict__ and "compile" not in b.__dict__ for b in blocks)
    _, _, _, pipe = generate("magcache", "regional fullgraph before")
    assert all(b.__dict__.get("_compiled_call_impl") is not None for b in pipe.transformer.blocks)


def test_disable_after_a_whole_model_compile_leaves_the_model_as_compiled_and_nothing_of_the_cache():
    _, _, _, pipe = generate("teacache", "model.compile() after")
    model = pipe.transformer
    assert model.__dict__.get("_compiled_call_impl") is not None              # the user's model.compile()
    assert all(c.__dict__.get("_compiled_call_impl") is None for c in model.children())
    assert "compile" not in model.__dict__ and "forward" not in model.__dict__
    _, _, _, pipe = generate("teacache", "torch.compile(model) before")
    assert type(pipe.transformer).__name__ == "OptimizedModule"
    assert "forward" not in pipe.transformer._orig_mod.__dict__


def test_teacache_keeps_its_own_copy_of_a_signal_that_cuda_graphs_would_overwrite():
    """Under CUDA graphs (mode="reduce-overhead") a compiled module writes each call's output into the same memory.
    Stood in for here: the condition embedder returns the same tensors every call, refilled. TeaCache compares a
    pass's signal with the previous one, so a kept reference would compare the signal with itself and reuse every
    pass after the warm-up; its own copy keeps the decisions of the plain run."""
    torch.set_num_threads(1)

    def patterns(static_outputs: bool):
        demo = DemoPipeline(load())
        embedder = demo.pipe.transformer.condition_embedder
        if static_outputs:
            forward, buffers = embedder.forward, []

            def refilled(*args, **kwargs):
                fresh = forward(*args, **kwargs)
                if not buffers:
                    buffers.extend(t.clone() if torch.is_tensor(t) else t for t in fresh)
                for buffer, t in zip(buffers, fresh):
                    if torch.is_tensor(t):
                        buffer.copy_(t)
                return tuple(buffers)
            embedder.forward = refilled
        stepcache.enable(demo.pipe, "teacache", profile=str(PROFILE))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            demo.latents([PROMPTS[0]], [1], steps=30)
        pattern = stepcache.stats(demo.pipe).pattern()
        stepcache.disable(demo.pipe)
        return pattern
    plain = patterns(False)
    assert "C" in plain[4:] and "." in plain
    assert patterns(True) == plain
