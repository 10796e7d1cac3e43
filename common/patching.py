"""Installing a cache on one model instance, and taking it off again exactly.

The cache sits at two seams every supported model has, the instance's ``forward`` and the block stack, and
both are set as instance attributes, never on ``model.__class__`` (shared with every other instance, and
``FullyShardedDataParallel`` itself under FSDP; parallel wrappers bind instance forwards a class patch never
reaches). Blocks are wrapped beneath diffusers' hooks, and beneath accelerate's in ``_old_forward``, so that the
cache sees a block's real (sharded) input and survives offload hooks being removed and re-added.

Design notes: docs/design.md#patching-where-the-cache-sits
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .compiling import around_graph, compiled_like, outside_graph

_MISSING = object()


class InstalledPatch:
    """Instance attributes set on modules, and how to restore what was there before."""

    def __init__(self):
        self._saved: list[tuple[nn.Module, str, Any, Any]] = []
        self._forwards: list[tuple[nn.Module, Any, Any, Any]] = []  # (module, installed, original, before)
        self._handles: list[Any] = []
        self._order: list[tuple[str, int]] = []
        self._after_restore: list[Callable[[], None]] = []
        # Set by install_stack: compile every block's forward with the given function (a whole model compiled
        # around the cache is compiled block by block; see stepcache.compiling)
        self.compile_blocks: Callable[[Callable[[Callable], Callable]], None] | None = None

    def after_restore(self, action: Callable[[], None]) -> None:
        """Run ``action`` once everything is restored (to hand back what the user did to the model meanwhile)."""
        self._after_restore.append(action)

    def hook(self, handle: Any) -> None:
        """Keep a ``torch.utils.hooks.RemovableHandle`` to remove with the rest."""
        self._handles.append(handle)

    def set(self, module: nn.Module, name: str, value: Any) -> None:
        self._saved.append((module, name, module.__dict__.get(name, _MISSING), value))
        self._order.append(("set", len(self._saved) - 1))
        setattr(module, name, value)

    def wrap_forward(self, module: nn.Module, make: Callable[[Callable], Callable], *, innermost: bool) -> None:
        """Replace a module's forward by ``make(original)``.

        ``innermost``: beneath a diffusers hook chain on the module (its hooks keep running around the wrapper),
        else the module's instance ``forward`` itself (outside any such chain).
        """
        owner, attr = _innermost_slot(module) if innermost else _outer_slot(module)
        original = getattr(owner, attr)
        installed = make(original)
        setattr(owner, attr, installed)
        self._forwards.append((module, installed, original))
        self._order.append(("forward", len(self._forwards) - 1))

    def restore(self) -> None:
        located = []
        for module, installed, original in self._forwards:
            slot = _find_slot(module, installed)
            if slot is None:
                raise RuntimeError(
                    f"cannot remove the cache: {type(module).__name__}.forward was replaced by something else after "
                    f"the cache was installed; remove that first")
            located.append(slot)
        for module, name, before, installed in reversed(self._saved):
            if module.__dict__.get(name, _MISSING) is not installed:
                raise RuntimeError(
                    f"cannot remove the cache: {type(module).__name__}.{name} was replaced by something else after "
                    f"the cache was installed; remove that first")
        for kind, index in reversed(self._order):
            if kind == "set":
                module, name, before, _ = self._saved[index]
                if before is _MISSING:
                    delattr(module, name)
                else:
                    setattr(module, name, before)
            else:
                module, installed, original = self._forwards[index]
                owner, attr = located[index]
                if owner is module and attr == "forward" and _is_class_forward(module, original):
                    delattr(module, "forward")  # the class's own forward again, with no instance attribute left
                else:
                    setattr(owner, attr, original)
        for handle in self._handles:
            handle.remove()
        actions = list(self._after_restore)
        self._saved.clear()
        self._forwards.clear()
        self._order.clear()
        self._handles.clear()
        self._after_restore.clear()
        for action in actions:
            action()


def _registry_refs(module: nn.Module) -> list[Any]:
    """The function references of a diffusers ``HookRegistry`` on ``module``, innermost first ([] without one)."""
    registry = module.__dict__.get("_diffusers_hook")
    return list(getattr(registry, "_fn_refs", None) or [])


def _is_class_forward(module: nn.Module, fn: Any) -> bool:
    return getattr(fn, "__self__", None) is module and getattr(fn, "__func__", None) is type(module).forward


def _outer_slot(module: nn.Module) -> tuple[Any, str]:
    """Outside any diffusers hooks on the module, beneath an accelerate hook (which removes itself by writing
    ``_old_forward`` over ``forward``)."""
    if "_hf_hook" in module.__dict__ and "_old_forward" in module.__dict__:
        return module, "_old_forward"
    return module, "forward"


def _innermost_slot(module: nn.Module) -> tuple[Any, str]:
    """Where the module's own forward is called from: the first diffusers hook's stored forward (its
    ``original_forward`` when that hook replaces the call), else beneath an accelerate hook, else the module's
    ``forward``."""
    refs = _registry_refs(module)
    if not refs:
        return _outer_slot(module)
    ref = refs[0]
    return (ref, "original_forward") if getattr(ref, "original_forward", None) is not None else (ref, "forward")


def _find_slot(module: nn.Module, installed: Any) -> tuple[Any, str] | None:
    for attr in ("forward", "_old_forward"):
        if module.__dict__.get(attr, _MISSING) is installed:
            return module, attr
    for ref in _registry_refs(module):
        for attr in ("forward", "original_forward"):
            if getattr(ref, attr, None) is installed:
                return ref, attr
    return None


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
    # "active": this pass skips the stack; "taken": the first block's decision was taken above its hooks
    skipping = {"active": False, "taken": False}
    # The first block's hooks may be passed by when its input is the same above them and the method reads nothing
    # in the block (TeaCache reads its modulation on some models: there the block's weights must be in). Asked at
    # every pass: hooks come and go (diffusers' context parallelism, added after enable, splits the input there)
    def decide_above() -> bool:
        return signal_of is None and _hooks_leave_input(first)
    # A block either runs (``RUN``) or returns what ``before`` gives instead: the runner's decision is taken in
    # ``before``/``after``, outside any compiled graph, and a compiled block stays one compiled frame.
    RUN = object()

    @outside_graph
    def before(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        runner = runner_of()
        if runner is None or runner.current is None:
            return RUN
        if block is first and skipping["taken"]:
            skipping["taken"] = False
            return RUN
        if block is first:
            skipping["active"] = False
            signal = signal_of(args, kwargs) if signal_of is not None and runner.wants_signal else None
            if signal is None:
                signal = runner.current.signal_tensor
            reused = runner.enter_stack(io.hidden_in(args, kwargs), signal)
            if reused is not None:
                skipping["active"] = True
                return io.replace_hidden(io.passthrough(args, kwargs), reused)
        elif skipping["active"]:
            return io.passthrough(args, kwargs)
        return RUN

    @outside_graph
    def after(output: Any) -> None:
        runner = runner_of()
        if runner is not None and runner.current is not None:
            runner.leave_stack(io.hidden_out(output))

    # Regional compilation after enable (``block.compile()``, diffusers' ``compile_repeated_blocks``): the block's
    # own forward is compiled, called from the wrapper, so that a fullgraph region holds model code only; when the
    # cache is removed the block is compiled the way the user asked.
    compiled: dict[nn.Module, Callable] = {}
    originals: dict[nn.Module, Callable] = {}

    def wrap(block: nn.Module, original: Callable) -> Callable:
        originals[block] = original
        patch.set(block, "compile", compile_block(block, original))
        in_place = block.__dict__.get("_compiled_call_impl")
        if in_place is not None:   # compiled before enable: the same compilation of the forward alone
            again = compiled_like(in_place, original)
            if again is not None:   # (the call above the block's hooks takes the place of the compiled one)
                compiled[block] = again

        @functools.wraps(original)
        @around_graph
        def forward(*args, **kwargs):
            instead = before(block, args, kwargs)
            if instead is not RUN:
                return instead
            output = compiled.get(block, original)(*args, **kwargs)
            if block is last:
                after(output)
            return output
        return forward

    def compile_block(block: nn.Module, original: Callable) -> Callable:
        def compile(*args, **kwargs):
            compiled[block] = torch.compile(original, *args, **kwargs)
            patch.after_restore(lambda: nn.Module.compile(block, *args, **kwargs))
        return compile

    # Above every hook of a block (its ``__call__``): a skipped stack's blocks return at once, so that an offloading
    # hook (diffusers' group offloading, accelerate's) never moves their weights in for a pass that runs none.
    @outside_graph
    def above_hooks(block: nn.Module, args: tuple, kwargs: dict) -> Any:
        if block is first:
            if not decide_above():
                return RUN
            instead = before(block, args, kwargs)
            runner = runner_of()
            skipping["taken"] = instead is RUN and runner is not None and runner.current is not None
            return instead
        runner = runner_of()
        if skipping["active"] and runner is not None and runner.current is not None:
            return io.passthrough(args, kwargs)
        return RUN

    def call_above_hooks(block: nn.Module) -> Callable:
        # a block compiled in place before enable whose compilation could not be redone on its forward alone
        # keeps it
        in_place = block.__dict__.get("_compiled_call_impl")
        call_block = in_place if in_place is not None and block not in compiled else block._call_impl

        @around_graph
        def call(*args, **kwargs):
            instead = above_hooks(block, args, kwargs)
            if instead is not RUN:
                return instead
            try:
                return call_block(*args, **kwargs)
            finally:
                skipping["taken"] = False
        return call

    for block in blocks:
        patch.wrap_forward(block, lambda original, block=block: wrap(block, original), innermost=True)
        patch.set(block, "_compiled_call_impl", call_above_hooks(block))
    patch.compile_blocks = lambda make: compiled.update({b: make(o) for b, o in originals.items()})


# Hooks that leave a block's input as it is: diffusers' group offloading moves the block's weights in and the input
# to their device, where the stack's input already is; the execution tracker only records the order.
WEIGHT_HOOKS = frozenset({"group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading"})


def _hooks_leave_input(block: nn.Module) -> bool:
    """Whether the cache may decide for the stack above ``block``'s hooks: it sees the same input there."""
    registry = block.__dict__.get("_diffusers_hook")
    names = set(getattr(registry, "hooks", None) or {}) if registry is not None else set()
    return (names <= WEIGHT_HOOKS and not block._forward_pre_hooks and "_hf_hook" not in block.__dict__
            and not nn.modules.module._global_forward_pre_hooks)


def first_block_signal(blocks: Sequence[nn.Module], read: Callable[[nn.Module, tuple, dict], torch.Tensor],
                       wants_signal: bool, signal_name: Callable[[], str | None], provides: str,
                       model_name: str) -> Callable[[tuple, dict], torch.Tensor] | None:
    """``signal_of`` for :func:`install_stack` when the signal is an activation of the first block,
    ``read(first_block, args, kwargs)`` (None when the method wants no signal). A profile variant that asks for
    another signal than the one this model ``provides`` is refused at the first pass, never silently swapped."""
    if not wants_signal:
        return None
    if len(blocks) == 0:
        raise ValueError(f"the {provides!r} signal is read in the first block of the stack, and this {model_name} "
                         f"has no such block")
    first = blocks[0]

    def signal_of(args, kwargs):
        name = signal_name()
        if name not in (None, provides):
            raise ValueError(f"the {model_name} adapter computes the {provides!r} signal, but the profile's variant "
                             f"asks for {name!r}")
        return read(first, args, kwargs)
    return signal_of


def install_forward(patch: InstalledPatch, model: nn.Module,
                    around: Callable[[Callable, tuple, dict], Any]) -> None:
    """Replace ``model.forward`` (at instance level, outside any hooks on the model) by
    ``around(original_forward, args, kwargs)``."""
    def make(original):
        @functools.wraps(original)
        @around_graph
        def forward(*args, **kwargs):
            return around(original, args, kwargs)
        return forward

    patch.wrap_forward(model, make, innermost=False)
