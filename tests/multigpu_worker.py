"""One rank of the multi-GPU tests, on CPU: ``torchrun --nproc_per_node=2 multigpu_worker.py CASES.json OUT_DIR``.

Started by ``tests/test_multigpu.py`` (never by hand). Every rank builds the same tiny diffusers pipeline (same
seed), enables stepcache and diffusers' context parallelism in the order the case says, runs the pipeline, and
writes what it saw (final latents, the per-pass decisions and signals) to ``OUT_DIR/rank{r}.pt``; the test
compares the ranks with each other and with a one-process run.

The two CPU work-arounds live here, in test code only:

* ``torch.accelerator.device_count()`` is 0 on CPU torch, and diffusers computes ``rank % device_count()``;
* ring attention needs an attention op that returns the log-sum-exp; diffusers' native op refuses
  ``return_lse=True``, and CPU aten has ``_scaled_dot_product_flash_attention_for_cpu``, which returns it.

gloo collectives time out after ``STEPCACHE_TEST_GLOO_TIMEOUT`` seconds (default 45), so ranks that disagree fail
instead of hanging.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from multigpu_rank import finish, join

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WAN_STEPS, HY_STEPS = 10, 10


def cpu_workarounds() -> None:
    torch.accelerator.device_count = lambda: 1  # W1

    import diffusers.models.attention_dispatch as ad
    original = ad._native_attention_forward_op

    def forward_op_with_lse(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                            enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # W2
        if not return_lse:
            return original(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                            _save_ctx, _parallel_config)
        q, k, v = (x.transpose(1, 2).contiguous() for x in (query, key, value))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal,
                                                                             attn_mask=attn_mask, scale=scale)
        return out.transpose(1, 2).contiguous(), lse.transpose(1, 2).contiguous()

    ad._native_attention_forward_op = forward_op_with_lse


# ------------------------------------------------------------------------------------------------- families
def build(family: str):
    if family == "wan":
        import wan_tiny
        return wan_tiny.build_t2v(0)
    if family == "wan_i2v":
        import wan_tiny
        return wan_tiny.build_i2v(0)
    import hunyuan_tiny
    return hunyuan_tiny.build_pipeline(0)


def hunyuan_embeds(pipe, padded: bool, true_cfg: bool):
    """6 text tokens; padded: only the first 2 are valid, so the padding crosses the shard boundary (rank 0 holds
    [valid, valid, pad], rank 1 [pad, pad, pad])."""
    import hunyuan_tiny
    out = hunyuan_tiny.embeds(pipe, seed=1, negative=true_cfg)
    mask = torch.ones_like(out["prompt_attention_mask"])
    if padded:
        mask[:, 2:] = 0
    out["prompt_attention_mask"] = mask
    return out


def run(family: str, pipe, case: dict) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if family == "wan":
        import wan_tiny
        embeds = wan_tiny.embeds(1)
        embeds["negative_prompt_embeds"] = embeds["negative_prompt_embeds"] * case.get("negative_scale", 1.0)
        return pipe(height=32, width=32, num_frames=5, num_inference_steps=WAN_STEPS, guidance_scale=5.0,
                    generator=generator, output_type="latent", **embeds).frames
    if family == "wan_i2v":
        import wan_tiny
        return wan_tiny.run_i2v(pipe, steps=WAN_STEPS)
    true_cfg = case.get("true_cfg", False)
    return pipe(height=32, width=32, num_frames=9, num_inference_steps=HY_STEPS, guidance_scale=6.0,
                true_cfg_scale=4.0 if true_cfg else 1.0, generator=generator, output_type="latent",
                **hunyuan_embeds(pipe, case.get("padded", True), true_cfg)).frames


PROFILES = {"wan": "wan2.1-t2v-1.3b", "wan_i2v": "wan2.1-i2v-14b-480p", "hunyuan": "hunyuanvideo-t2v-720p"}


def enable_cache(family: str, pipe, case: dict) -> None:
    import stepcache
    parallel = None if case.get("naive") else "auto"  # naive: every rank decides on its own shard
    stepcache.enable(pipe, case["method"], profile=PROFILES[family], parallel=parallel, **case.get("params", {}))


def enable_cp(family: str, pipe, case: dict) -> None:
    from diffusers import ContextParallelConfig
    config = ContextParallelConfig(**{f"{case['engine']}_degree": dist.get_world_size()})
    if family in ("wan", "wan_i2v"):
        pipe.transformer.enable_parallelism(config=config)
    elif case.get("setup") == "plain_plan":  # diffusers' enable_parallelism with the plan, without our mask hooks
        from stepcache.hunyuan.diffusers_adapter import context_parallel_plan
        pipe.transformer.enable_parallelism(config=config, cp_plan=context_parallel_plan(pipe.transformer))
    else:
        from stepcache.hunyuan.diffusers_adapter import enable_context_parallel
        enable_context_parallel(pipe.transformer, config)


def run_case(case: dict) -> dict:
    family = case["family"]
    pipe = build(family)
    order = case.get("order", "cache_first")
    cached = case.get("method") is not None
    parallel = case.get("engine") is not None
    if order == "cache_first":
        if cached:
            enable_cache(family, pipe, case)
        if parallel:
            enable_cp(family, pipe, case)
    else:
        if parallel:
            enable_cp(family, pipe, case)
        if cached:
            enable_cache(family, pipe, case)
    with torch.no_grad():
        out = run(family, pipe, case)
    result = {"out": out}
    if cached:
        import stepcache
        stats = stepcache.stats(pipe)
        result["pattern"] = stats.pattern()
        result["signals"] = [r.signal for r in stats.of()]
        result["branches"] = [r.branch for r in stats.of()]
        stepcache.disable(pipe)
        result["restored"] = _restored(pipe.transformer)
    return result


def _restored(transformer) -> bool:
    """After disable(): no stepcache wrapper is left on the transformer or its blocks, wherever diffusers' hooks
    moved it."""
    import stepcache.patching
    ours = os.path.realpath(stepcache.patching.__file__)

    def is_ours(f):
        f = getattr(f, "func", f)  # functools.partial
        code = getattr(f, "__code__", None)
        return code is not None and os.path.realpath(code.co_filename) == ours

    modules = [transformer, *getattr(transformer, "blocks", []), *getattr(transformer, "transformer_blocks", []),
               *getattr(transformer, "single_transformer_blocks", [])]
    for module in modules:
        forwards = [module.__dict__.get("forward")]
        for ref in getattr(module.__dict__.get("_diffusers_hook"), "_fn_refs", None) or []:
            forwards += [ref.forward, ref.original_forward]
        if any(is_ours(f) for f in forwards if f is not None):
            return False
    return True


# ------------------------------------------------------------------- shards on which decisions would differ
class _IdentityTeaCache:
    """A real TeaCache configuration whose rescaling is the identity (P(d) = d), so that the accumulated value is
    the measured relative L1 itself and a threshold between two shards' values is easy to place."""

    def __init__(self, thresh: float):
        from stepcache.methods import resolve_method
        from stepcache.profiles import load_profile
        self._real = resolve_method("teacache", load_profile(PROFILES["hunyuan"]), None, thresh=thresh)
        self.thresh = thresh

    def __getattr__(self, name):
        return getattr(self._real, name)

    def make_policy(self, branch, num_steps, window=None, switch_step=None):
        from stepcache.methods.teacache import TeaCachePolicy
        return TeaCachePolicy([1.0, 0.0], self.thresh, warmup_steps=1, force_last=True)


def disagreement_case() -> dict:
    """Two unequal shards (3 and 5 tokens): rank 0's signal barely changes, rank 1's changes a lot, so a runner
    deciding on its own shard reuses on rank 0 and computes on rank 1. With the group, both ranks decide on the
    full sequence: the sum and count over all 8 tokens."""
    from stepcache.distributed import SIGNAL, SequenceGroup
    from stepcache.runner import CacheRunner

    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7)
    full0 = torch.randn(1, 8, 4, generator=g) + 3.0
    change = torch.zeros(1, 8, 4)
    change[:, :3] = 0.01   # rank 0's tokens: 0.3 % change
    change[:, 3:] = 0.6    # rank 1's tokens: ~20 % change
    full1 = full0 + change
    shards = [(0, 3), (3, 8)]
    lo, hi = shards[rank]

    def steps(runner, sig0, sig1):
        out = []
        for step, sig in enumerate((sig0, sig1, sig1)):
            runner.begin_pass("cond", step, 4, sig)
            reused = runner.enter_stack(sig, sig)
            if reused is None:
                runner.leave_stack(sig + 1.0)
            runner.end_pass(None)
            out.append((runner.stats.records[-1].computed, runner.stats.records[-1].signal))
        return out

    def rel(a, b):
        return float((a - b).abs().mean() / b.abs().mean())

    per_shard = [rel(full1[:, a:b], full0[:, a:b]) for a, b in shards]
    whole = rel(full1, full0)
    mean_of_means = float(sum((full1[:, a:b] - full0[:, a:b]).abs().mean() for a, b in shards) /
                          sum(full0[:, a:b].abs().mean() for a, b in shards))
    # Between the two shards' own values, and between the full-sequence mean and a mean of shard means: a
    # decision per shard, or on averaged shard means, differs from the single-process one.
    thresh = (mean_of_means + whole) / 2
    alone = steps(CacheRunner(_IdentityTeaCache(thresh)), full0[:, lo:hi], full1[:, lo:hi])
    agreed = steps(CacheRunner(_IdentityTeaCache(thresh), group=SequenceGroup(None), sharded={SIGNAL}),
                   full0[:, lo:hi], full1[:, lo:hi])
    single = steps(CacheRunner(_IdentityTeaCache(thresh)), full0, full1)
    return {"per_shard": per_shard, "whole": whole, "mean_of_means": mean_of_means, "thresh": thresh,
            "alone": alone, "agreed": agreed, "single": single}


# ----------------------------------------------------------------------- CFG branches split across the ranks
class CfgSplitTransformer:
    """What a CFG-parallel engine does, in front of the pipeline's transformer: rank 0 runs only the "cond"
    pass of each step and rank 1 only the "uncond" pass, then they exchange predictions (one all-gather per step),
    so both ranks hold both and step the scheduler alike. The pipeline's own loop is unchanged: it calls cond and
    then uncond, and combines them only after the uncond call, which is when the exchange fills in the other
    rank's prediction."""

    def __init__(self, inner, rank: int):
        self.inner, self.mine = inner, ("cond", "uncond")[rank]
        self.current, self.buffer, self.own = None, None, None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def cache_context(self, name, **kwargs):
        self.current = name
        return self.inner.cache_context(name, **kwargs)

    def __call__(self, *args, **kwargs):
        if self.current == self.mine:
            self.own = self.inner(*args, **kwargs)[0]
        if self.current == "cond":  # the pipeline reads it only after the uncond call: filled in then
            self.buffer = torch.empty_like(self.own if self.own is not None else kwargs["hidden_states"])
            return (self.buffer,)
        parts = [torch.empty_like(self.own) for _ in range(2)]
        dist.all_gather(parts, self.own.contiguous())
        self.buffer.copy_(parts[0])
        self.own = None
        return (parts[1],)


def cfg_split_case(case: dict) -> dict:
    import stepcache
    pipe = build("wan")
    cfg_parallel = "world" if case.get("cfg_parallel") else None
    stepcache.enable(pipe, case["method"], profile=PROFILES["wan"], parallel=None, cfg_parallel=cfg_parallel,
                     **case.get("params", {}))
    inner = pipe.transformer
    object.__setattr__(pipe, "transformer", CfgSplitTransformer(inner, dist.get_rank()))
    try:
        with torch.no_grad():
            out = run("wan", pipe, case)
    finally:
        object.__setattr__(pipe, "transformer", inner)
    stats = stepcache.stats(inner)
    return {"out": out, "pattern": stats.pattern(), "branches": [r.branch for r in stats.of()],
            "signals": [r.signal for r in stats.of()]}


def main() -> int:
    cases_file, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, _ = join()
    cpu_workarounds()
    import logging
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    import warnings
    warnings.simplefilter("ignore")
    results = {}
    cases = json.loads(Path(cases_file).read_text())
    try:
        for case in cases:
            if case.get("kind") == "disagreement":
                results[case["id"]] = disagreement_case()
                continue
            if case.get("kind") == "cfg_split":
                results[case["id"]] = cfg_split_case(case)
                continue
            try:
                results[case["id"]] = run_case(case)
            except Exception as exc:  # noqa: BLE001 - reported to the test, which decides
                if not case.get("expect_error"):
                    raise
                results[case["id"]] = {"error": f"{type(exc).__name__}: {exc}"}
    except Exception:
        traceback.print_exc()
        return finish(results, out_dir, ok=False)
    return finish(results, out_dir)


if __name__ == "__main__":
    sys.exit(main())
