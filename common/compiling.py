"""Caching beside ``torch.compile``: the per-pass decision stays out of every compiled graph.

A cache decides in Python, per pass, from state that changes every pass (the step, the branch, accumulated
errors). Traced by dynamo, that state becomes guards, and the compiled forward recompiles per step and per branch
until it hits the recompile limit and silently falls back to eager. So stepcache's code is never traced:

- ``around_graph`` marks a frame stepcache installs around model code (the transformer's forward, each block's):
  dynamo skips that frame but compiles the model code it calls, so a compiled model stays compiled;
- ``outside_graph`` marks stepcache's own logic (the runner's pass methods, the adapters' hooks and helpers):
  dynamo neither traces it nor anything it calls.

Compiling works either way round: ``enable`` on a model compiled with ``torch.compile(model)`` (an
``OptimizedModule``: stepcache installs on the module inside it) or with ``model.compile()``, and compiling after
``enable``. Each block's forward runs as its own compiled frame (as diffusers' ``compile_repeated_blocks`` does),
and the skipped passes run no block at all.

Design notes: docs/design.md#torchcompile
"""
from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])


def _disable(fn: F, recursive: bool) -> F:
    compiler = getattr(torch, "compiler", None)
    disable = getattr(compiler, "disable", None)
    if disable is None:   # torch before 2.1 has no torch.compile to stay out of
        return fn
    return disable(fn, recursive=recursive)


def around_graph(fn: F) -> F:
    """A frame that wraps model code: not traced itself; what it calls is compiled as usual."""
    return _disable(fn, recursive=False)


def outside_graph(fn: F) -> F:
    """stepcache's own logic: never traced, nor anything it calls."""
    return _disable(fn, recursive=True)


def compiled_inner(module: Any) -> Any:
    """The module a ``torch.compile(module)`` wrapper (``OptimizedModule``) compiles, else ``module`` itself."""
    inner = getattr(module, "_orig_mod", None) if type(module).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, torch.nn.Module) else module


def whole_model_compiler(module: Any) -> Callable[[Callable], Callable] | None:
    """How a whole model was compiled, as a function that compiles another function the same way: the context of
    a ``torch.compile(model)`` wrapper, or of an in-place ``model.compile()``; None for a model not compiled whole."""
    if type(module).__name__ == "OptimizedModule":
        context = getattr(module, "dynamo_ctx", None)
        return context if callable(context) else None
    in_place = getattr(module, "__dict__", {}).get("_compiled_call_impl")
    if in_place is None:
        return None
    return lambda fn: compiled_like(in_place, fn) or torch.compile(fn)


def compiled_like(compiled: Callable, fn: Callable) -> Callable | None:
    """``fn`` compiled the way ``compiled`` (what ``torch.compile`` returned) was: the same backend and options
    (``fullgraph``, ``mode`` ...), read from the compile context it carries; None where this torch keeps them
    elsewhere."""
    for cell in getattr(compiled, "__closure__", None) or ():
        try:
            context = cell.cell_contents
        except ValueError:   # an empty cell
            continue
        if type(context).__name__ == "OptimizeContext" and callable(context):
            return context(fn)
    return None


def kept_output(output: torch.Tensor) -> torch.Tensor:
    """A module's output that the cache keeps past the module's next call (TeaCache's signal, compared with the
    next pass's): its own copy. Compiled with ``mode="reduce-overhead"`` (CUDA graphs), the module's next replay
    writes its new output into the same memory, so the kept one would silently become the new one. The signals
    kept this way are timestep embeddings, a few KiB."""
    return output.detach().clone()
