"""One rank of the agreement test: ``torchrun --nproc_per_node=2 multigpu_agreement_worker.py CASES.json OUT``.

Started by ``tests/test_multigpu_agreement.py``. Each rank drives a runner with inputs of its own (as ranks that
were not seeded alike would see), once alone and once under the world group, and saves the decisions.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from multigpu_rank import finish, join

STEPS = 20


def drive(runner, rank: int) -> str:
    """EasyCache measures the latent's change: rank 1's latent moves 50x more per step than rank 0's."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(1, 64, generator=g)
    v = torch.randn(1, 64, generator=g)
    step_size = 0.002 if rank == 0 else 0.1
    for step in range(STEPS):
        ctx = runner.begin_pass("cond", step, STEPS, x)
        if ctx.reused_output is None:
            runner.enter_stack(x)
            runner.leave_stack(x)
            v = v + 0.05 * torch.randn(1, 64, generator=g)
            runner.end_pass(v)
        else:
            runner.end_pass(None)
        x = x - step_size * v
    return runner.stats.pattern()


def main() -> int:
    out_dir = Path(sys.argv[2])
    rank, _ = join()
    from stepcache.distributed import SequenceGroup, agree_on_compute
    from stepcache.methods import resolve_method
    from stepcache.runner import CacheRunner
    config = resolve_method("easycache", "wan2.1-t2v-1.3b", thresh=0.05, warmup_steps=2, decide_on=None)
    results = {"alone": drive(CacheRunner(config), rank),
               "agreed": drive(CacheRunner(config, group=SequenceGroup(None, "world")), rank)}
    # The agreement's cost: one 1-element all-reduce, timed over many passes.
    group, device = SequenceGroup(None, "world"), torch.device("cpu")
    dist.barrier()
    start, rounds = time.perf_counter(), 500
    for i in range(rounds):
        agree_on_compute(group, bool((i + rank) % 2), device)
    results["seconds_per_agreement"] = (time.perf_counter() - start) / rounds
    return finish(results, out_dir)


if __name__ == "__main__":
    sys.exit(main())
