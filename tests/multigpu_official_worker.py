"""One rank of the official-repo multi-GPU tests, on CPU:
``torchrun --nproc_per_node=2 multigpu_official_worker.py CASES.json OUT_DIR`` (started by
``tests/test_multigpu_official.py``; needs ``HUNYUANVIDEO_REPO`` / ``WAN21_REPO``).

xfuser (xDiT) cannot even be imported without a GPU, so the few xfuser names upstream's parallel code uses are
stood in for by gloo, and nothing else changes:

* ``xfuser.core.distributed``: ``get_sequence_parallel_world_size`` / ``_rank`` and ``get_sp_group()`` (its
  ``all_gather(t, dim)`` and ``device_group``) over a gloo group;
* upstream's HunyuanVideo pipeline picks ``cuda:{rank}`` when torch.distributed is initialised; its module sees
  ``is_initialized() == False`` instead, so it stays on the CPU;
* the long-context attention: upstream HunyuanVideo's ``parallel_attention`` (xFuser's joint attention followed
  by a flash-attn call on the padding) and Wan2.1's ``xFuserLongContextAttention()(None, query, key, value)`` are
  replaced by what they compute: each rank's queries against the keys and values of every rank (all-gathered)
  plus, for HunyuanVideo, the valid text tokens; the padding attends to itself. On GPU upstream runs these under
  autocast; here the result is returned in float32.

Upstream's own wrappers do the rest: HunyuanVideo's ``parallelize_transformer`` (called by
``HunyuanVideoSampler.__init__`` for ``--ulysses-degree 2``) cuts ``x`` and RoPE to the rank's image-token shard and
all-gathers the output; Wan2.1's ``usp_dit_forward`` / ``usp_attn_forward`` (bound on the instances exactly as
``WanT2V.__init__`` does for ``use_usp``) shard after the patch embedding. Each rank writes what it saw to
``OUT_DIR/rank{r}.pt``.
"""
from __future__ import annotations

import json
import os
import sys
import types
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from helpers import sdpa
from multigpu_rank import finish, join

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SP = {"group": None}  # the sequence-parallel group the stand-ins use (None: the world)
OUT: Path | None = None


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    group = SP["group"]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _SPGroup:
    def all_gather(self, t, dim=0):
        return _gather(t, dim)

    @property
    def device_group(self):
        return SP["group"] if SP["group"] is not None else dist.group.WORLD


def _sdpa(q, k, v):
    """(B, S, H, D) attention in float32 (helpers.sdpa, the one CPU attention stand-in)."""
    return sdpa(q.float(), k.float(), v.float())


class LongContextAttention:
    """Stand-in for ``xFuserLongContextAttention`` (Ulysses/ring give the same result): local queries against
    all ranks' keys and values."""

    def __call__(self, _, query, key, value, **kwargs):
        return _sdpa(query, _gather(key, 1), _gather(value, 1))


def install_xfuser_stub() -> None:
    xfuser, core = types.ModuleType("xfuser"), types.ModuleType("xfuser.core")
    distributed = types.ModuleType("xfuser.core.distributed")
    distributed.get_sequence_parallel_world_size = lambda: dist.get_world_size(SP["group"])
    distributed.get_sequence_parallel_rank = lambda: dist.get_rank(SP["group"])
    distributed.get_sp_group = _SPGroup
    distributed.init_distributed_environment = distributed.initialize_model_parallel = lambda *a, **k: None
    attention = types.ModuleType("xfuser.core.long_ctx_attention")
    attention.xFuserLongContextAttention = LongContextAttention
    xfuser.core, core.distributed, core.long_ctx_attention = core, distributed, attention
    sys.modules.update({"xfuser": xfuser, "xfuser.core": core, "xfuser.core.distributed": distributed,
                        "xfuser.core.long_ctx_attention": attention})


def hunyuan_joint_attention(hybrid_attn, q, k, v, img_q_len, img_kv_len, cu_seqlens_q, cu_seqlens_kv):
    """What upstream's ``parallel_attention`` computes (batch 1): this rank's image queries and the text queries
    against every rank's image keys plus the valid text; the padding attends to itself."""
    end_q, end_kv = int(cu_seqlens_q[1]), int(cu_seqlens_kv[1])
    keys = torch.cat((_gather(k[:, :img_kv_len], 1), k[:, img_kv_len:end_kv]), dim=1)
    values = torch.cat((_gather(v[:, :img_kv_len], 1), v[:, img_kv_len:end_kv]), dim=1)
    parts = [_sdpa(q[:, :end_q], keys, values)]
    if end_q < q.shape[1]:
        parts.append(_sdpa(q[:, end_q:], k[:, end_kv:], v[:, end_kv:]))
    attn = torch.cat(parts, dim=1)
    return attn.reshape(attn.shape[0], attn.shape[1], -1).to(q.dtype)


# ----------------------------------------------------------------------------------------------- HunyuanVideo
HY_FLAGS = {"magcache": "--magcache-thresh", "teacache": "--teacache-thresh", "easycache": "--easycache-thresh"}


def run_hunyuan(case: dict) -> dict:
    import hunyuan_tiny as T
    import stepcache
    from stepcache.hunyuan import official

    import hyvideo.diffusion.pipelines.pipeline_hunyuan_video as pipeline_module
    import hyvideo.modules.models as models
    models.parallel_attention = hunyuan_joint_attention
    # Upstream's pipeline puts every rank on ``cuda:{rank}`` once torch.distributed is initialised; here the
    # pipeline module alone sees a distributed package that says it is not (so its device stays the CPU).
    pipeline_module.dist = types.SimpleNamespace(is_initialized=lambda: False, get_rank=dist.get_rank)
    model = T.build_upstream_model()
    method = case.get("method")
    argv = ["--cache-method", method or "none", *case.get("argv", []), "--save-path", str(OUT / "videos")]
    if case.get("parallel"):
        argv += ["--ulysses-degree", str(dist.get_world_size()), "--ring-degree", "1"]
    block_inputs, class_calls = [], []
    hook = model.double_blocks[0].register_forward_pre_hook(lambda m, a: block_inputs.append(a[0].shape[1]))
    calls = T.Calls(model)
    original = type(model).forward
    seen = {}

    def class_patch(self, *a, **k):
        class_calls.append(1)
        return original(self, *a, **k)

    def load(args):
        sampler = T.build_sampler(args, model)  # upstream's __init__ runs parallelize_transformer here
        seen["xdit"] = "forward" in model.__dict__
        if case.get("class_patch"):  # what the published scripts do next: patch the class forward
            type(model).forward = class_patch
        return sampler

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            official.main(method or "magcache", T.tiny_argv(*argv, steps=case.get("steps", 12)), load=load,
                          save=lambda sample, path: Path(path).write_bytes(b"video"))
    finally:
        type(model).forward = original
        hook.remove()
        calls.remove()
    result = {"outputs": torch.stack(calls.outputs), "block0_tokens": block_inputs, "xdit": seen["xdit"],
              "class_calls": len(class_calls)}
    cached = getattr(model, "_stepcache", None)
    if cached is not None:
        stats = stepcache.stats(model)
        result.update(pattern=stats.pattern(), signals=[r.signal for r in stats.of()],
                      group=repr(cached.runner.group_of()) if cached.runner else None)
        stepcache.disable(model)
    return result


# ----------------------------------------------------------------------------------------------------- Wan2.1
def apply_usp(sampler) -> None:
    """What ``WanT2V.__init__`` does for ``use_usp=True`` (upstream wan/text2video.py:90-101)."""
    from wan.distributed.xdit_context_parallel import usp_attn_forward, usp_dit_forward
    from xfuser.core.distributed import get_sequence_parallel_world_size
    for block in sampler.model.blocks:
        block.self_attn.forward = types.MethodType(usp_attn_forward, block.self_attn)
    sampler.model.forward = types.MethodType(usp_dit_forward, sampler.model)
    sampler.use_usp = True
    sampler.sp_size = get_sequence_parallel_world_size()


def run_wan(case: dict, up) -> dict:
    import wan_official_tiny as W
    from stepcache.wan21.official import attach

    model = W.tiny_model(up, "t2v")
    sampler = W.bare_sampler(up, "t2v", model)
    sampler.rank = 0  # upstream decodes on rank 0 only; the stub VAE is the identity, so every rank returns it
    if case.get("usp"):
        apply_usp(sampler)
    class_calls, block_inputs = [], []
    if case.get("class_patch"):
        original = type(model).forward

        def class_patch(self, *a, **k):
            class_calls.append(1)
            return original(self, *a, **k)
        type(model).forward = class_patch
    hook = model.blocks[0].register_forward_pre_hook(lambda m, a: block_inputs.append(a[0].shape[1]))
    attachment = None
    try:
        if case.get("method"):
            attachment = attach(sampler, case["method"], "wan2.1-t2v-1.3b", case.get("params", {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = W.run_t2v(sampler, steps=case.get("steps", 8))
    finally:
        hook.remove()
        if case.get("class_patch"):
            type(model).forward = original
    result = {"out": out, "class_calls": len(class_calls), "block0_tokens": block_inputs}
    if attachment is not None:
        stats = attachment.cached.stats
        result.update(pattern=stats.pattern(), signals=[r.signal for r in stats.of()],
                      branches=[r.branch for r in stats.of()],
                      group=repr(attachment.cached.runner.group_of()) if attachment.cached.runner else None)
        attachment.remove()
        result["restored"] = model.forward.__func__.__name__ == ("usp_dit_forward" if case.get("usp") else "forward")
    return result


def main() -> int:
    global OUT
    cases_file, out_dir = sys.argv[1], Path(sys.argv[2])
    OUT = out_dir
    rank, world = join()
    own = [dist.new_group([r]) for r in range(world)][rank]  # a 1-rank "sequence-parallel group" for references
    install_xfuser_stub()
    cases = json.loads(Path(cases_file).read_text())
    results = {}
    families = {c["family"] for c in cases}
    if "hunyuan" in families:
        import hunyuan_tiny as T
        with T.upstream_on_cpu(Path(os.environ["HUNYUANVIDEO_REPO"])):
            for case in (c for c in cases if c["family"] == "hunyuan"):
                results[case["id"]] = run_hunyuan(case)
    if "wan" in families:
        import wan_official_tiny as W
        with W.upstream_on_cpu(os.environ["WAN21_REPO"]) as up:
            for case in (c for c in cases if c["family"] == "wan"):
                SP["group"] = own if case.get("usp") == "self" else None
                results[case["id"]] = run_wan(case, up)
                SP["group"] = None
    return finish(results, out_dir)


if __name__ == "__main__":
    sys.exit(main())
