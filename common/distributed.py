"""One decision for the whole sequence-parallel group.

Under sequence parallelism every rank runs the same loop on its own shard of the tokens, and a cached pass must
be skipped or computed on every rank alike: a rank that skips its blocks while another runs them waits in a
different collective and the job hangs. So a rank-invariant measurement adds no collective, and one taken on a
shard (the names an adapter lists in ``sequence_sharded``) is reduced to the full-sequence mean, ``sum |t|``
over ``count``, never a mean of shard means nor rank 0's shard alone.

Design notes: docs/multi-gpu.md#in-the-code-shards-and-the-agreement
"""
from __future__ import annotations

from typing import Any, Callable

import torch

# Measurement names an adapter may list in ``sequence_sharded``.
SIGNAL = "signal"  # TeaCache's signal at the block stack
LATENT = "latent"  # EasyCache's model input x and output v

MEASUREMENTS = (SIGNAL, LATENT)


def float_abs(t: torch.Tensor) -> torch.Tensor:
    """``|t|`` in float32, with one temporary: a low-precision tensor's float32 copy is made absolute in place
    (``t.float().abs()`` holds two: on HunyuanVideo's bf16 signal at 720p, 2.72 GiB where this holds 1.36), and a
    float32 tensor, which ``float()`` returns as is, is never written to."""
    t = t.detach()
    return t.abs() if t.dtype == torch.float32 else t.float().abs_()


class SequenceGroup:
    """The ranks that hold the shards of one sequence, and the one reduction they share.

    ``group`` is a ``torch.distributed`` process group (``None`` for the default, world group). ``name`` says
    where it came from, for messages and stats.
    """

    def __init__(self, group: Any = None, name: str = "world"):
        self.group = group
        self.name = name

    @property
    def size(self) -> int:
        import torch.distributed as dist
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        import torch.distributed as dist
        return dist.get_rank(self.group)

    def mean_abs(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``mean(|t|)`` over the full sequence for each tensor: one all-reduce of (sum, count) pairs."""
        import torch.distributed as dist
        if not tensors:
            return []
        device = tensors[0].device
        parts = []
        for t in tensors:
            parts.append(float_abs(t).sum().reshape(1).to(device, torch.float64))
            parts.append(torch.tensor([t.numel()], dtype=torch.float64, device=device))
        packed = torch.cat(parts)
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        return [(packed[2 * i] / packed[2 * i + 1]).to(torch.float32) for i in range(len(tensors))]

    def sum(self, tensor: torch.Tensor) -> None:
        """Sum ``tensor`` over the group, in place (per-token statistics of a shard: calibration)."""
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def __repr__(self) -> str:
        return f"SequenceGroup({self.name})"


def share_decision(group: SequenceGroup, decision: Any | None, device: torch.device) -> Any:
    """CFG parallelism: the one rank of ``group`` that runs the leader branch passes its ``Decision``, the
    others pass ``None``; every rank gets the leader's decision (one all-reduce of four numbers, on ``device``,
    the activation's device, which is the one the group's backend serves whatever its name)."""
    import torch.distributed as dist

    from .policies import Decision
    acc = decision.accumulator if decision is not None else None
    packed = torch.tensor([1.0 if decision is not None else 0.0, float(bool(decision and decision.compute)),
                           0.0 if acc is None else 1.0, 0.0 if acc is None else float(acc)], dtype=torch.float64,
                          device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group.group)
    sources = int(packed[0])
    if sources != 1:
        raise RuntimeError(f"stepcache: {sources} ranks of the CFG group {group.name} ran the leader branch in this "
                           f"step; CFG parallelism needs exactly one (one branch per rank)")
    return Decision(bool(packed[1] > 0.5), "follow", float(packed[3]) if packed[2] > 0.5 else None)


def agree_on_compute(group: SequenceGroup, compute: bool, device: torch.device) -> bool:
    """Whether any rank of ``group`` computes this pass: one 1-element all-reduce (max) on ``device``.

    Every rank of a sequence-parallel group must skip or compute alike, or ranks wait in different collectives
    and the job hangs. Rather than trusting each measurement to be rank-invariant, every pass ends with this
    agreement, so a decision agrees by construction (for example EasyCache under diffusers' context parallelism
    on ranks whose latents differ because they were not seeded alike)."""
    import torch.distributed as dist
    if group.size <= 1:
        return compute
    flag = torch.tensor([1.0 if compute else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group.group)
    return bool(flag.item() > 0.5)


def _initialized() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def diffusers_group(model: Any) -> SequenceGroup | None:
    """The context-parallel group of a diffusers model after ``enable_parallelism`` (``None`` without one).

    It is the flattened ring x ulysses mesh diffusers shards with, which is the world unless a custom ``mesh``
    holds other dimensions (CFG or data parallel replicas): those replicas never share a sequence and never vote
    together.
    """
    config = getattr(model, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None) if config is not None else None
    if cp is None or not _initialized():
        return None
    mesh = getattr(cp, "_flattened_mesh", None)
    if mesh is None or mesh.size() <= 1:
        return None
    return SequenceGroup(mesh.get_group(), f"diffusers context parallel (ring {cp.ring_degree} x ulysses "
                                           f"{cp.ulysses_degree})")


def xdit_group() -> SequenceGroup | None:
    """xDiT's (xfuser's) sequence-parallel group, as the official scripts initialise it; ``None`` on one process.

    The official HunyuanVideo and Wan2.1 scripts make the sequence-parallel degree the world size, so without an
    importable xfuser (never the case when they run in parallel) the world group is the same group.
    """
    if not _initialized():
        return None
    try:
        from xfuser.core.distributed import get_sp_group
        coordinator = get_sp_group()
    except Exception:  # noqa: BLE001 - xfuser missing or not initialised: the scripts' SP group is the world
        coordinator = None
    group = getattr(coordinator, "device_group", None) if coordinator is not None else None
    if group is not None:
        found = SequenceGroup(group, "xDiT sequence parallel")
    else:
        found = SequenceGroup(None, "world")
    return found if found.size > 1 else None


def as_group(spec: Any) -> SequenceGroup | None:
    """A :class:`SequenceGroup` from what a caller passed: a group already, a torch process group, an xfuser
    ``GroupCoordinator`` (its ``device_group``), ``"world"``, or ``None``."""
    if spec is None or spec is False:
        return None
    if isinstance(spec, SequenceGroup):
        return spec
    if spec == "world":
        if not _initialized():
            raise RuntimeError("parallel='world' needs torch.distributed to be initialised first")
        return SequenceGroup(None, "world")
    if getattr(spec, "device_group", None) is not None:  # xfuser's GroupCoordinator
        return SequenceGroup(spec.device_group, "xDiT group")
    import torch.distributed as dist
    if isinstance(spec, dist.ProcessGroup):
        return SequenceGroup(spec, "process group")
    raise TypeError(f"parallel={spec!r}: pass 'auto', None, 'world', a torch.distributed ProcessGroup, an xfuser "
                    f"group coordinator or a stepcache.distributed.SequenceGroup")


def resolve_parallel(spec: Any, model: Any) -> Callable[[], SequenceGroup | None]:
    """What the runner asks, at every pass, for the group its sharded measurements are reduced over.

    ``"auto"`` (the default of :func:`stepcache.enable`) reads the model's diffusers context-parallel config at
    each pass, so the cache may be enabled before or after ``enable_parallelism``. Anything else is fixed now.
    """
    if isinstance(spec, str) and spec == "auto":
        return lambda: diffusers_group(model)
    group = as_group(spec)
    return lambda: group
