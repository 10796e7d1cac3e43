"""What every rank of a multi-GPU test does first and last: join the gloo group (one thread, collectives that
time out after ``STEPCACHE_TEST_GLOO_TIMEOUT`` seconds, so ranks that disagree fail instead of hanging), and
save what it saw to ``OUT_DIR/rank{r}.pt`` for the test to compare."""
from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist


def join() -> tuple[int, int]:
    """(rank, world size) after joining the torchrun's gloo group."""
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("STEPCACHE_TEST_GLOO_TIMEOUT", "45")))
    dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def finish(results: dict, out_dir: str | Path, ok: bool = True) -> int:
    """Save this rank's results, leave the group (after the others, when every case ran) and give the exit code."""
    torch.save(results, Path(out_dir) / f"rank{dist.get_rank()}.pt")
    if ok:
        dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1
