"""MagCache calibration: measure the magnitude ratios of one uncached run and write them as a profile file.

MagCache's table is, per CFG branch and per step, the mean over tokens of ``||r_t|| / ||r_{t-1}||`` where ``r`` is
the block-stack residual ``h_L - h0`` (MagCache4Wan2.1/magcache_generate.py, ``magcache_calibration``). The
reference also records the per-token std of that ratio and the mean cosine distance ``1 - cos(r_t, r_{t-1})``;
they are kept for inspection, not used by the policy.

The reference prints the list for the user to paste into its source. Here the measurement is written as a
``stepcache-profile/1`` file that every entry point loads by path (``profile=...``, ``--cache_profile``).

Nothing here knows a model: the recorder is given the block stack, how a block takes and returns its hidden
states (:class:`stepcache.patching.BlockIO`), and a function naming the CFG branch of a model call.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .methods.magcache import RULE as MAGCACHE_RULE, interleave_with_padding, residual_ratio_stats
from .patching import BlockIO, InstalledPatch
from .outputs import write_text
from .profiles import FORMAT, Profile, load_profile


@dataclass
class RatioRecord:
    step: int
    ratio: float
    std: float
    cos_distance: float


@dataclass
class _Branch:
    steps_seen: int = 0
    previous: torch.Tensor | None = None
    records: list[RatioRecord] = field(default_factory=list)


class ResidualRatioRecorder:
    """Records, per CFG branch, the magnitude ratio of successive block-stack residuals of an uncached run.

    ``branch_of(args, kwargs)`` names the branch of a model call (it is called from a forward pre-hook on
    ``model``). The step index of a pass is the number of earlier passes of its branch since
    :meth:`start_generation`, which is how a denoising loop with one call per branch and step counts them.

    Under sequence parallelism each rank sees a shard of the tokens; ``all_reduce`` (default: the default
    process group when one is initialised with more than one rank) sums the per-token statistics over ranks so
    that every rank records the ratio over the whole sequence.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module], io: BlockIO,
                 branch_of: Callable[[tuple, dict], str],
                 all_reduce: Callable[[torch.Tensor], None] | None = None):
        blocks = list(blocks)
        if not blocks:
            raise ValueError("the model has no transformer blocks to calibrate")
        self.model = model
        self.first, self.last = blocks[0], blocks[-1]
        self.io = io
        self.branch_of = branch_of
        self.all_reduce = all_reduce if all_reduce is not None else _default_all_reduce()
        self.patch = InstalledPatch()
        self.branches: dict[str, _Branch] = {}
        self.order: list[str] = []
        self._branch: str | None = None
        self._h0: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------------------- lifecycle
    def install(self) -> "ResidualRatioRecorder":
        self.patch.hook(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self.patch.hook(self.first.register_forward_pre_hook(self._on_stack_enter, with_kwargs=True))
        self.patch.hook(self.last.register_forward_hook(self._on_stack_leave, with_kwargs=True))
        return self

    def remove(self) -> None:
        self.patch.restore()
        self._release()

    def start_generation(self) -> None:
        """Forget earlier measurements; the next model call is step 0 of its branch."""
        self.branches.clear()
        self.order.clear()
        self._release()

    def _release(self) -> None:
        self._branch = None
        self._h0 = None
        for state in self.branches.values():
            state.previous = None

    # ----------------------------------------------------------------------------------------------- hooks
    def _on_model_call(self, module, args, kwargs):
        name = self.branch_of(args, kwargs)
        if name not in self.branches:
            self.branches[name] = _Branch()
            self.order.append(name)
        self._branch = name
        self._h0 = None

    def _on_stack_enter(self, module, args, kwargs):
        if self._branch is not None:
            self._h0 = self.io.hidden_in(args, kwargs)

    def _on_stack_leave(self, module, args, kwargs, output):
        if self._branch is None or self._h0 is None:
            return
        state = self.branches[self._branch]
        residual = (self.io.hidden_out(output) - self._h0).detach()
        if state.previous is not None and state.previous.shape == residual.shape:
            state.records.append(RatioRecord(state.steps_seen, *self._ratio_stats(residual, state.previous)))
        state.previous = residual
        state.steps_seen += 1
        self._branch = None
        self._h0 = None

    def _ratio_stats(self, current: torch.Tensor, previous: torch.Tensor) -> tuple[float, float, float]:
        return residual_ratio_stats(current, previous, self.all_reduce)

    # ----------------------------------------------------------------------------------------------- results
    def ratios(self, branch: str) -> list[RatioRecord]:
        return list(self.branches[branch].records) if branch in self.branches else []

    def steps(self) -> int:
        """Passes per branch of the last generation (all branches must agree)."""
        counts = {b: s.steps_seen for b, s in self.branches.items()}
        if not counts:
            return 0
        if len(set(counts.values())) != 1:
            raise RuntimeError(f"the branches ran different numbers of passes: {counts}")
        return next(iter(counts.values()))


def _default_all_reduce() -> Callable[[torch.Tensor], None]:
    def reduce(t: torch.Tensor) -> None:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
    return reduce


def calibrated_source(when: _dt.datetime | None = None, where: str | None = None) -> str:
    from . import __version__
    when = when or _dt.datetime.now(_dt.timezone.utc)
    text = f"calibrated by stepcache {__version__} on {when.strftime('%Y-%m-%d %H:%M UTC')}"
    return f"{text} ({where})" if where else text




def magcache_profile_data(*, name: str, description: str, model: dict[str, Any], recorder_or_ratios,
                          branches: Sequence[str], steps: int, source: str, measured_on: dict[str, Any],
                          defaults: dict[str, Any], presets: dict[str, Any] | None = None,
                          base: Profile | None = None) -> dict[str, Any]:
    """A profile dict holding a calibrated MagCache table.

    ``recorder_or_ratios`` is a :class:`ResidualRatioRecorder` after a run, or ``{branch: [RatioRecord, ...]}``.
    The table keeps the decision rule of ``base``'s MagCache table (HunyuanVideo's ``<=``, Wan's ``<``), or
    without a base the released Wan rule (``<``, ``|1 - prod(ratio)|``, no square root). ``base``'s other method
    sections (TeaCache, EasyCache) are copied, named as copied, so that the file serves every method.
    """
    if isinstance(recorder_or_ratios, ResidualRatioRecorder):
        records = {b: recorder_or_ratios.ratios(b) for b in branches}
    else:
        records = {b: list(recorder_or_ratios[b]) for b in branches}
    for b in branches:
        if len(records[b]) != steps - 1:
            raise ValueError(f"branch {b!r} has {len(records[b])} measured ratios; a {steps}-step run has "
                             f"{steps - 1} (every step after the first)")
    ratios = interleave_with_padding({b: [round(r.ratio, 5) for r in records[b]] for b in branches}, branches)
    rule = base.data.get("magcache", {}) if base is not None else {}
    data: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "description": description,
        "model": model,
        "magcache": {
            "ratios": ratios,
            "steps": int(steps),
            "branches": list(branches),
            **{key: rule.get(key, default) for key, default in MAGCACHE_RULE.items()},
            "source": source,
            "measured_on": measured_on,
            "std": interleave_with_padding({b: [round(r.std, 5) for r in records[b]] for b in branches},
                                           branches, pad=0.0),
            "cos_distance": interleave_with_padding(
                {b: [round(r.cos_distance, 5) for r in records[b]] for b in branches}, branches, pad=0.0),
            "defaults": dict(defaults),
        },
    }
    if presets:
        data["magcache"]["presets"] = dict(presets)
    if base is not None:
        from .methods import names
        for method in names():
            if method != "magcache" and base.has(method):
                section = json.loads(json.dumps(base.data[method]))
                section["copied_from_profile"] = base.name
                data[method] = section
    return data


def write_profile(path: str | os.PathLike, data: dict[str, Any]) -> Profile:
    """Write a profile file atomically and load it back, so that a file that cannot be used is never left."""
    path = Path(path).expanduser()
    if path.suffix != ".json":
        raise ValueError(f"a profile file must end in .json (got {str(path)!r})")
    Profile(str(data.get("name", path.stem)), data)  # the schema check, before anything is written
    write_text(path, json.dumps(data, indent=1) + "\n")
    return load_profile(str(path))
