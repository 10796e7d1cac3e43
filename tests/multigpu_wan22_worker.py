"""One rank of the Wan2.2 parallel tests, on CPU:
``torchrun --nproc_per_node=2 multigpu_wan22_worker.py CASES.json OUT_DIR`` (started by
``tests/test_wan22_parallel.py``; needs ``WAN22_REPO``).

Upstream Wan2.2's parallel paths use torch.distributed directly (no xfuser), so nothing of theirs is stood in for
but the attention kernel: each expert of a tiny ``WanT2V`` is configured by upstream's own ``_configure_model``
(wan22_official_tiny.configure_parallel), which for ``--ulysses_size 2`` binds ``sp_dit_forward`` (the model's
instance forward: shard after the patch embedding, all-gather after the head) and ``sp_attn_forward`` (Ulysses'
all-to-all around the attention, q / k / v cast to bfloat16 by its ``half()``), and for ``--dit_fsdp`` wraps the
expert with upstream's ``shard_model`` (FSDP around the model, each block its own unit; FULL_SHARD over the 2
ranks). ``flash_attention`` is the SDPA stand-in of the harness (wan22_official_tiny.sp_flash_attention inside the
Ulysses all-to-all, cpu_attention for the cross-attention).

:func:`run_case` is also what the test process runs for its 1-process references (on a 1-process gloo group the
same ``sp_dit_forward`` / ``sp_attn_forward`` run with a world of one). Each rank writes what it saw to
``OUT_DIR/rank{r}.pt``.
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

EXPERTS = (("high_noise_model", "high"), ("low_noise_model", "low"))


def forwards(sampler) -> dict[str, object]:
    """Every instance-level ``forward`` in both experts (FSDP wrappers included) and the sampler's ``generate``,
    by qualified name: what was bound on the instances, to compare before the cache and after its removal."""
    found = {"sampler.generate": sampler.__dict__.get("generate")}
    for attribute, _ in EXPERTS:
        for name, module in getattr(sampler, attribute).named_modules():
            found[f"{attribute}.{name}"] = module.__dict__.get("forward")
    return found


def unchanged(before: dict, after: dict) -> bool:
    """Whether two :func:`forwards` snapshots hold the very same objects."""
    return after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def run_case(up, case: dict, rank: int = 0) -> dict:
    """One generation of a tiny WanT2V (8 steps at 64x64, 5 frames: 32 tokens), configured, cached and observed as
    ``case`` says: ``sp`` / ``fsdp`` (upstream's ``_configure_model``), ``method`` / ``profile`` / ``params``
    (stepcache.wan22.official.attach), ``class_patch`` (what the published MagCache4Wan2.2 script does:
    ``WanModel.forward`` replaced on the class), ``params_by_rank`` (each rank its own parameters, so that the
    ranks' own rules disagree)."""
    import wan22_official_tiny as W
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from stepcache.wan21.official import unwrap
    from stepcache.wan22.official import attach

    fsdp_forward = FSDP.__dict__["forward"]

    def fsdp_untouched() -> bool:
        """FSDP's class forward as it was, and no instance forward on an expert's FSDP wrapper (the cache's is on
        the WanModel inside; its block wrappers, FSDP units of their own, do get one, as any block does)."""
        return FSDP.__dict__["forward"] is fsdp_forward and not any(
            "forward" in getattr(sampler, attribute).__dict__ for attribute, _ in EXPERTS)

    sampler = W.bare_sampler(up, "t2v")
    sampler.rank = 0  # upstream decodes on rank 0 only; the stub VAE is the identity, so every rank returns it
    if case.get("sp") or case.get("fsdp"):
        W.configure_parallel(up, sampler, use_sp=bool(case.get("sp")), dit_fsdp=bool(case.get("fsdp")))
    inners = {short: unwrap(getattr(sampler, attribute)) for attribute, short in EXPERTS}
    result = {"sp_bound": {short: "forward" in m.__dict__ and m.forward.__func__.__name__ == "sp_dit_forward"
                           and all(b.self_attn.forward.__func__.__name__ == "sp_attn_forward" for b in m.blocks)
                           for short, m in inners.items()},
              "fsdp": {short: isinstance(getattr(sampler, attribute), FSDP) for attribute, short in EXPERTS}}
    if case.get("fsdp"):
        flat = inners["high"].blocks[0]._handle.flat_param  # a block's parameters, outside a forward: this shard
        result["block0_params"] = (flat.numel(), flat._unpadded_unsharded_size.numel())
    tokens = {short: [] for short in inners}
    hooks = [m.blocks[0].register_forward_pre_hook(lambda _, a, short=short: tokens[short].append(a[0].shape[1]))
             for short, m in inners.items()]
    class_calls = []
    original_class_forward = type(inners["high"]).forward
    if case.get("class_patch"):
        def published_class_patch(self, *args, **kwargs):
            class_calls.append(1)
            return original_class_forward(self, *args, **kwargs)
        type(inners["high"]).forward = published_class_patch
    before = forwards(sampler)
    inner_before = {short: m.__dict__.get("forward") for short, m in inners.items()}
    attachment = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if case.get("method"):
                params = case["params_by_rank"][rank] if "params_by_rank" in case else case.get("params", {})
                attachment = attach(sampler, case["method"], case["profile"], params)
                result["wrapped"] = {short: m.__dict__.get("forward") not in (None, inner_before[short])
                                     for short, m in inners.items()}  # an instance forward of the cache's
                if case.get("fsdp"):
                    result["fsdp_untouched_attached"] = fsdp_untouched()
            result["out"] = W.run_t2v(sampler, steps=case.get("steps", 8), seed=case.get("seed", 0))
    finally:
        for hook in hooks:
            hook.remove()
        type(inners["high"]).forward = original_class_forward
    result.update(tokens=tokens, class_calls=len(class_calls))
    if attachment is not None:
        stats = attachment.cached.stats
        result.update(pattern=stats.pattern(mark_switch=True), experts=stats.experts(),
                      reasons=[r.reason for r in stats.of()], switch_step=attachment.generations[-1].switch_step,
                      group=repr(attachment.cached.runner.group_of()))
        attachment.remove()
    result["restored"] = unchanged(before, forwards(sampler))
    if case.get("fsdp"):
        result["fsdp_untouched"] = fsdp_untouched()
    return result


def main() -> int:
    import wan22_official_tiny as W
    from multigpu_rank import finish, join

    cases_file, out_dir = sys.argv[1], Path(sys.argv[2])
    rank, _ = join()
    cases = json.loads(Path(cases_file).read_text())
    results = {}
    with W.upstream_on_cpu(os.environ["WAN22_REPO"]) as up, W.sp_attention(up):
        for case in cases:
            results[case["id"]] = run_case(up, case, rank)
    return finish(results, out_dir)


if __name__ == "__main__":
    sys.exit(main())
