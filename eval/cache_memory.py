"""How much memory the cache holds, per method and prediction mode, on the real models: computed, not written by
hand.

``python -m stepcache.eval.cache_memory [--json] [--opensora-repo PATH]``

Two measurements make each number:
- the shapes: each real model is built from its published config on the ``meta`` device (no memory, no weights)
  and run on a meta latent of the listed size; the block stack's input (what a STACK method's residual has the
  shape of, read through the model's stepcache adapter) and the model's input latent (what EasyCache's tensors
  have the shape of) are recorded;
- the tensor counts: the demo model runs each method for real, and stepcache's own stats report the bytes each CFG
  branch held between passes; divided by the demo's residual (or latent) bytes, that is how many such tensors a
  method keeps.

The table multiplies the two, per CFG branch (a CFG run holds two branches; a guidance-distilled HunyuanVideo one),
in the model's dtype.

A second table gives the temporaries of two steps at each model's size, counted on meta tensors (every tensor an
operation makes, alive until its last reference goes): a reused pass with linear prediction (the runner's
``lerp``, against the three-temporary ``r + (r - older) * slope`` it replaced), and ``mean|t|`` of a
residual-sized bf16 tensor, as TeaCache reads HunyuanVideo's signal (stepcache's, against
``t.float().abs().mean()``). Design notes: docs/design.md#cache-memory
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

from ..cliargs import OneLineParser
from ..errors import InputError, run_cli

DATA = Path(__file__).with_name("data") / "model-shapes.json"
PROMPT = "a red square moving right on a dark background"
MODES = [("magcache", {}), ("magcache", {"predict": "linear"}), ("teacache", {}), ("easycache", {})]


class _Reached(Exception):
    pass


def shapes_on_meta(model_class: str, config: dict, latent: list[int], text_tokens: int, dtype: str) -> dict:
    """The block stack's input and the model's input latent (shape, bytes) of one call of the real model at this
    size, built and run on the meta device."""
    import diffusers
    import torch
    from stepcache.api import adapter_for
    torch_dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = getattr(diffusers, model_class)(**config).to(torch_dtype)
    adapter = adapter_for(model)
    first = adapter.blocks(model)[0]
    seen = {}

    def reach(module, args, kwargs):
        seen["hidden"] = adapter.block_io.hidden_in(args, kwargs)
        raise _Reached
    hook = first.register_forward_pre_hook(reach, with_kwargs=True)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.empty(1, *latent, dtype=torch_dtype)
        text = torch.empty(1, text_tokens, model.config.get("text_dim") or model.config["text_embed_dim"],
                           dtype=torch_dtype)
        kwargs = dict(timestep=torch.tensor([999.0]), encoder_hidden_states=text, return_dict=False)
        if model_class == "HunyuanVideoTransformer3DModel":
            kwargs.update(encoder_attention_mask=torch.ones(1, text_tokens),
                          pooled_projections=torch.empty(1, model.config["pooled_projection_dim"], dtype=torch_dtype),
                          guidance=torch.tensor([6000.0]))
        try:
            model(x, **kwargs)
        except _Reached:
            pass
        finally:
            hook.remove()
    hidden = seen["hidden"]
    return {"hidden_shape": list(hidden.shape), "hidden_bytes": hidden.numel() * hidden.element_size(),
            "latent_shape": list(x.shape), "latent_bytes": x.numel() * x.element_size(),
            "signal_bytes": block_signal_bytes(adapter, hidden.numel() * hidden.element_size())}


# The TeaCache signal an adapter reads off block 0 (its modulated input: the block-stack input's shape) rather than
# off the timestep embedding (a few KiB, counted in the demo's own measurement).
BLOCK_SIGNAL = "block0_modulated"


def block_signal_bytes(adapter, hidden_bytes: int) -> int:
    """Bytes of TeaCache's kept signal beyond what the demo model's measurement counts, for a block-stack input of
    ``hidden_bytes``."""
    return hidden_bytes if getattr(adapter, "default_signal", None) == BLOCK_SIGNAL else 0


FORK_TRANSFORMER = "videosys.models.transformers.open_sora_transformer_3d"


def fork_shapes_on_meta(repo: str, entry: dict) -> dict:
    """As :func:`shapes_on_meta`, for Open-Sora 1.2's STDiT3 from the VideoSys fork in a Zehong-Ma/MagCache or
    ali-vilab/TeaCache checkout at ``repo`` (its config defaults are the XL/2 checkpoint). Its forward reads the
    pixel size from host tensors, so those are given on the CPU."""
    import importlib
    import os
    import types

    import torch
    from accelerate import init_empty_weights
    from stepcache.opensora.adapter import STDiT3Adapter
    if not os.path.isdir(os.path.join(repo, "videosys")):
        raise InputError(f"--opensora-repo {repo} has no videosys/ folder (a Zehong-Ma/MagCache or ali-vilab/TeaCache "
                         f"checkout has it)")
    if "videosys" not in sys.modules:   # the package alone, without its __init__'s engine imports
        package = types.ModuleType("videosys")
        package.__path__ = [os.path.join(repo, "videosys")]
        sys.modules["videosys"] = package
    try:
        fork = importlib.import_module(FORK_TRANSFORMER)
    except ImportError as exc:
        raise InputError(f"the VideoSys fork's STDiT3 does not import here ({exc}); it needs colossalai and timm "
                         f"besides its own requirements") from exc
    dtype = getattr(torch, entry["dtype"])
    with init_empty_weights():
        model = fork.STDiT3(fork.STDiT3Config(**entry["config"]))
    model = model.to("meta", dtype).eval()
    for module in model.modules():
        if hasattr(module, "parallel_manager"):
            module.parallel_manager = types.SimpleNamespace(cp_size=1, sp_size=1, dp_size=1)
    adapter = STDiT3Adapter()
    seen = {}

    def reach(module, args, kwargs):
        seen["hidden"] = adapter.block_io.hidden_in(args, kwargs)
        raise _Reached
    hook = adapter.blocks(model)[0].register_forward_pre_hook(reach, with_kwargs=True)
    batch, (height, width) = entry["batch"], (int(v) for v in entry["size"].split(" ")[0].split("x")[::-1])
    pixels = dict(height=torch.full((batch,), float(height)), width=torch.full((batch,), float(width)))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.empty(batch, *entry["latent"], dtype=dtype)
        kwargs = dict(y=torch.empty(batch, 1, entry["text_tokens"], model.config.caption_channels, dtype=dtype),
                      mask=None, fps=torch.full((batch,), 24.0), num_frames=torch.full((batch,), 51.0), **pixels)
        call = (x, torch.full((batch,), 999.0), [999.0])
        try:
            model(*call, **kwargs)
        except _Reached:
            pass
        finally:
            hook.remove()
    hidden, latent = seen["hidden"], adapter.latent_of(model, call, kwargs)
    from stepcache.opensora.adapter import TEACACHE_SIGNAL
    return {"hidden_shape": list(hidden.shape), "hidden_bytes": hidden.numel() * hidden.element_size(),
            "latent_shape": list(latent.shape), "latent_bytes": latent.numel() * latent.element_size(),
            "signal_bytes": hidden.numel() * hidden.element_size() if TEACACHE_SIGNAL == BLOCK_SIGNAL else 0}


def demo_tensor_counts() -> dict[str, float]:
    """Per method and mode, the bytes a CFG branch held between passes on the demo model over its residual's
    (STACK methods) or its latent's (EasyCache) bytes: how many such tensors the method keeps."""
    import torch
    import stepcache
    from stepcache.wan21.demo.model import PROFILE, DemoPipeline, load
    demo = DemoPipeline(load())
    from stepcache.api import adapter_for
    transformer = demo.pipe.transformer
    adapter = adapter_for(transformer)
    sizes = {}

    def size_of(name, read):
        def hook(module, a, k):
            tensor = read(module, a, k)
            sizes[name] = tensor.numel() * tensor.element_size()
        return hook
    hooks = [adapter.blocks(transformer)[0].register_forward_pre_hook(
                 size_of("hidden", lambda m, a, k: adapter.block_io.hidden_in(a, k)), with_kwargs=True),
             transformer.register_forward_pre_hook(size_of("latent", adapter.latent_of), with_kwargs=True)]
    counts = {}
    try:
        for method, params in MODES:
            stepcache.enable(demo.pipe, method, profile=str(PROFILE), **params)
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                demo.latents([PROMPT], [1], steps=30)
            held = stepcache.stats(demo.pipe).to_dict()["cache_peak_bytes"]
            stepcache.disable(demo.pipe)
            unit = sizes["latent"] if method == "easycache" else sizes["hidden"]
            counts[mode_name(method, params)] = max(held.values()) / unit
    finally:
        for hook in hooks:
            hook.remove()
    return counts


def transient_bytes(fn, *args) -> int:
    """The most bytes held at once in tensors ``fn(*args)`` makes (not its inputs; an in-place result or a view is
    no new memory), run as given: call it on meta tensors to count without memory."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    live = {"now": 0, "peak": 0}

    def release(nbytes):
        live["now"] -= nbytes

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            outputs = out if isinstance(out, (tuple, list)) else (out,)
            for returned, value in zip(func._schema.returns, outputs):
                if returned.alias_info is None and hasattr(value, "untyped_storage"):
                    nbytes = value.numel() * value.element_size()
                    live["now"] += nbytes
                    live["peak"] = max(live["peak"], live["now"])
                    weakref.finalize(value, release, nbytes)
            return out
    with Count():
        result = fn(*args)
    del result
    return live["peak"]


def reused_pass_before(h0, residual, older, slope):
    """A reused pass with linear prediction as the runner computed it before lerp."""
    return h0 + (residual + (residual - older) * slope)


def mean_abs_before(t):
    """``mean|t|`` as the published TeaCache code reads it, in float32."""
    return t.float().abs().mean()


def transients(shape: list[int], dtype: str) -> dict[str, int]:
    """Temporaries (bytes) of a linear-prediction reused pass and of a mean|t| at a residual of ``shape``, before
    and now."""
    import torch
    from stepcache.methods import resolve_method
    from stepcache.runner import BranchState, CacheRunner, mean_abs
    torch_dtype = getattr(torch, dtype)
    meta = [torch.empty(shape, dtype=torch_dtype, device="meta") for _ in range(3)]
    h0, residual, older = meta
    runner = CacheRunner(resolve_method("magcache", "wan2.1-t2v-1.3b", predict="linear"))
    state = BranchState(None, residual=residual, residual_step=2, older_residual=older, older_residual_step=0)
    signal = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    return {"linear_before": transient_bytes(reused_pass_before, h0, residual, older, 0.5),
            "linear_now": transient_bytes(lambda: runner._reused_from(state, 3, h0, torch_dtype)),
            "mean_abs_before": transient_bytes(mean_abs_before, signal),
            "mean_abs_now": transient_bytes(mean_abs, signal)}


def mode_name(method: str, params: dict) -> str:
    return method + (f" ({params['predict']})" if params.get("predict") else "")


def table(opensora_repo: str | None = None) -> dict:
    data = json.loads(DATA.read_text())
    counts = demo_tensor_counts()
    rows, skipped = [], []
    for entry in data["models"]:
        if entry.get("code") == "videosys-fork":
            if opensora_repo is None:
                skipped.append(f"{entry['name']}: its model is the VideoSys fork's; pass --opensora-repo PATH")
                continue
            shapes = fork_shapes_on_meta(opensora_repo, entry)
        else:
            shapes = shapes_on_meta(entry["class"], entry["config"], entry["latent"], entry["text_tokens"],
                                    entry["dtype"])
        per_branch = {}
        for method, params in MODES:
            name = mode_name(method, params)
            unit = shapes["latent_bytes"] if method == "easycache" else shapes["hidden_bytes"]
            per_branch[name] = counts[name] * unit + (shapes["signal_bytes"] if method == "teacache" else 0)
        rows.append({**{k: entry[k] for k in ("name", "size", "branches", "dtype", "source")}, **shapes,
                     "per_branch_bytes": per_branch, "transient_bytes": transients(shapes["hidden_shape"],
                                                                                   entry["dtype"])})
    return {"tensor_counts": counts, "rows": rows, "skipped": skipped, "sources": data["_about"]}


def markdown(result: dict) -> str:
    names = [mode_name(m, p) for m, p in MODES]

    def gib(value: float) -> str:
        return f"{value / 2 ** 30:.2f}"
    lines = ["| model, size | block-stack input | " + " | ".join(f"{n}, GiB" for n in names) + " |",
             "|---|---|" + "---|" * len(names)]
    for row in result["rows"]:
        b = row["branches"]
        cells = [f"{gib(row['per_branch_bytes'][n])} x {b} = {gib(row['per_branch_bytes'][n] * b)}" for n in names]
        lines.append(f"| {row['name']}, {row['size']} ({row['dtype']}) | {' x '.join(map(str, row['hidden_shape']))} "
                     f"| " + " | ".join(cells) + " |")
    counts = ", ".join(f"{k} {v:.2f}" for k, v in result["tensor_counts"].items())
    lines += ["", f"Tensors held per branch (measured on the demo model): {counts}.", "",
              "| model, size | reused pass, linear prediction: before -> now, GiB | mean of a residual-sized bf16 "
              "signal: before -> now, GiB |", "|---|---|---|"]
    for row in result["rows"]:
        t = row["transient_bytes"]
        lines.append(f"| {row['name']}, {row['size']} | {gib(t['linear_before'])} -> {gib(t['linear_now'])} | "
                     f"{gib(t['mean_abs_before'])} -> {gib(t['mean_abs_now'])} |")
    lines += [f"Not computed: {why}." for why in result["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stepcache.eval.cache_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a markdown table")
    p.add_argument("--opensora-repo", default=os.environ.get("OPENSORA_REPO"), metavar="PATH",
                   help="a Zehong-Ma/MagCache or ali-vilab/TeaCache checkout, for Open-Sora 1.2's row (its STDiT3 is "
                        "the VideoSys fork's; default: $OPENSORA_REPO)")
    args = p.parse_args(argv)

    def body():
        result = table(args.opensora_repo)
        print(json.dumps(result, indent=1) if args.json else markdown(result))
    return run_cli(body, prog="python -m stepcache.eval.cache_memory")


if __name__ == "__main__":
    sys.exit(main())
