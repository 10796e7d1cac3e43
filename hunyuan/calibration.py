"""MagCache calibration: measure a model's magnitude ratios in one uncached run and write them as a profile.

The measurement is the reference's (MC-HY:160-282, seed-methods.md §3.4): at every pass after the first, the
mean over image tokens of ``||r_t|| / ||r_{t-1}||``, with ``r`` the block-stack residual ``h_L - h0`` and the
norm over the hidden dimension, rounded to 5 decimals. One prompt, as the authors did. Nothing here is
specific to HunyuanVideo except the adapter's BlockIO that says where the image tokens are.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..patching import BlockIO
from ..profiles import FORMAT, Profile, load_profile


class MagCacheCalibration:
    """Forward hooks on the first and last block of a stack; the model itself is not changed."""

    def __init__(self, blocks: Sequence[nn.Module], io: BlockIO):
        blocks = list(blocks)
        self.io = io
        self.ratios: list[float] = []
        self._previous: torch.Tensor | None = None
        self._h0: torch.Tensor | None = None
        self._handles = [blocks[0].register_forward_pre_hook(self._enter, with_kwargs=True),
                         blocks[-1].register_forward_hook(self._leave)]

    def _enter(self, module, args, kwargs):
        self._h0 = self.io.hidden_in(args, kwargs)

    def _leave(self, module, args, output):
        residual = (self.io.hidden_out(output) - self._h0).float()
        if self._previous is not None:
            ratio = (residual.norm(dim=-1) / self._previous.norm(dim=-1)).mean()
            self.ratios.append(round(float(ratio), 5))
        self._previous = residual

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def write_profile(self, path: str | Path, base: Profile, height: int, width: int, source: str) -> Profile:
        """A profile like ``base`` (its TeaCache/EasyCache settings and MagCache presets carried over) with the
        measured table, for ``height x width`` at the run's step count. Returns it loaded back."""
        steps = len(self.ratios) + 1
        if steps < 2:
            raise ValueError("calibration needs a run of at least 2 denoising steps")
        data = copy.deepcopy(base.data)
        path = Path(path)
        data.update(format=FORMAT, name=path.stem,
                    description=f"{base.data.get('description', base.name)}; MagCache table calibrated at "
                                f"{height}x{width}, {steps} steps")
        data.setdefault("model", {})["resolution"] = [height, width]
        magcache = data.setdefault("magcache", {})
        magcache.update(ratios=[1.0, *self.ratios], steps=steps, branches=["cond"], source=source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        return load_profile(path)
