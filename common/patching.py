"""Installing a cache on one model instance, and taking it off again exactly.

Nothing here copies a model's forward. The cache sits at two seams every supported model has:

* the instance's ``forward`` (wrapped, so EasyCache can skip the whole model and every pass is bracketed);
* the block stack: the first block decides (and on reuse returns ``h0 + residual``), the blocks after it pass
  their input through, and the last block stores ``h_L - h0`` after a computed pass.

Both are instance attributes, never ``model.__class__`` attributes: the class is shared with every other
instance (and, under FSDP, is ``FullyShardedDataParallel`` itself), and parallel wrappers bind instance-level
forwards that a class patch would never reach.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

_MISSING = object()


class InstalledPatch:
    """Instance attributes set on modules, and how to restore what was there before."""

    def __init__(self):
        self._saved: list[tuple[nn.Module, str, Any, Any]] = []
        self._handles: list[Any] = []

    def hook(self, handle: Any) -> None:
        """Keep a ``torch.utils.hooks.RemovableHandle`` to remove with the rest."""
        self._handles.append(handle)

    def set(self, module: nn.Module, name: str, value: Any) -> None:
        self._saved.append((module, name, module.__dict__.get(name, _MISSING), value))
        setattr(module, name, value)

    def restore(self) -> None:
        for module, name, before, installed in reversed(self._saved):
            if module.__dict__.get(name, _MISSING) is not installed:
                raise RuntimeError(
                    f"cannot remove the cache: {type(module).__name__}.{name} was replaced by something else after "
                    f"the cache was installed; remove that first")
        for module, name, before, _ in reversed(self._saved):
            if before is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, before)
        for handle in self._handles:
            handle.remove()
        self._saved.clear()
        self._handles.clear()


@dataclass
class BlockIO:
    """How one block class takes and returns the image-token hidden states.

    ``hidden_in(args, kwargs)`` reads the block's input hidden states; ``hidden_out(output)`` reads them from its
    output; ``passthrough(args, kwargs)`` builds the output a skipped block returns (its inputs unchanged, in its
    output format); ``replace_hidden(output, hidden)`` puts new hidden states into such an output.
    """

    hidden_in: Callable[[tuple, dict], torch.Tensor]
    hidden_out: Callable[[Any], torch.Tensor]
    passthrough: Callable[[tuple, dict], Any]
    replace_hidden: Callable[[Any, torch.Tensor], Any]


def first_arg_io(name: str = "hidden_states") -> BlockIO:
    """Blocks that take the hidden states first (positionally or as ``name``) and return them alone."""
    def hidden_in(args, kwargs):
        return args[0] if args else kwargs[name]
    return BlockIO(hidden_in, lambda out: out, hidden_in, lambda out, hidden: hidden)


def install_stack(patch: InstalledPatch, runner_of: Callable[[], Any], blocks: Sequence[nn.Module],
                  io: BlockIO, signal_of: Callable[[tuple, dict], torch.Tensor | None] | None = None) -> None:
    """Wrap a block stack (blocks in call order) so that the runner decides at its first block.

    ``signal_of(args, kwargs)`` computes the TeaCache signal from the first block's call, when the method needs
    it and the adapter takes it from there; otherwise the adapter has handed it to the runner already.
    """
    blocks = list(blocks)
    if not blocks:
        raise ValueError("the model has no transformer blocks to cache")
    first, last = blocks[0], blocks[-1]
    skipping = {"active": False}

    def wrap(block: nn.Module, original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(*args, **kwargs):
            runner = runner_of()
            if runner is None or runner.current is None:
                return original(*args, **kwargs)
            if block is first:
                skipping["active"] = False
                signal = signal_of(args, kwargs) if signal_of is not None and runner.method == "teacache" else None
                if signal is None:
                    signal = runner.current.signal_tensor
                reused = runner.enter_stack(io.hidden_in(args, kwargs), signal)
                if reused is not None:
                    skipping["active"] = True
                    return io.replace_hidden(io.passthrough(args, kwargs), reused)
            elif skipping["active"]:
                return io.passthrough(args, kwargs)
            output = original(*args, **kwargs)
            if block is last:
                runner.leave_stack(io.hidden_out(output))
            return output
        return forward

    for block in blocks:
        patch.set(block, "forward", wrap(block, block.forward))


def install_forward(patch: InstalledPatch, model: nn.Module,
                    around: Callable[[Callable, tuple, dict], Any]) -> None:
    """Replace ``model.forward`` (at instance level) by ``around(original_forward, args, kwargs)``."""
    original = model.forward

    @functools.wraps(original)
    def forward(*args, **kwargs):
        return around(original, args, kwargs)

    patch.set(model, "forward", forward)
