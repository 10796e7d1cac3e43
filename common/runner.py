"""The one place that holds tensors between transformer passes.

An adapter calls the runner at three points of every pass: ``begin_pass`` (a ``skips == MODEL`` method decides
here), ``enter_stack`` / ``leave_stack`` around the block stack (a ``skips == STACK`` method decides there and
``h_L - h0`` is stored) and ``end_pass``. What a method measures and how it decides live in its module
(:mod:`stepcache.methods`); the runner holds the tensors, the branches, the generation and the agreement
between ranks, and names no method. State is per CFG branch (by name, never by call parity) and per runner,
and a runner belongs to one model instance.

Design notes: docs/design.md#the-runner
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .distributed import LATENT, SIGNAL, SequenceGroup, agree_on_compute, float_abs, share_decision
from .errors import StepcacheWarning
from .methods import EXPERT_MARK, EXPERTS, MethodConfig, base_branch
from .methods.base import MODEL, STACK
from .policies import Decision
from .storage import CacheStorage


class NothingCachedWarning(StepcacheWarning):
    """A whole generation ran with caching enabled but reused no pass."""


# Every generation that caches nothing must say so, not just the first one in a process.
warnings.simplefilter("always", NothingCachedWarning)


@dataclass
class PassRecord:
    generation: int
    branch: str
    step: int
    computed: bool
    reason: str
    signal: float | None
    accumulator: float | None
    expert: str | None = None  # which expert of a two-expert model ran the pass (None: a one-expert model)


@dataclass
class BranchState:
    policy: Any
    residual: torch.Tensor | None = None  # h_L - h0 (a STACK method) or v - x (a MODEL method)
    residual_step: int | None = None
    residual_dtype: torch.dtype | None = None  # the dtype it was computed in (it may be kept in another)
    older_residual: torch.Tensor | None = None  # the one before, kept only for predict="linear"
    older_residual_step: int | None = None
    previous_signal: torch.Tensor | None = None  # the signal of the previous pass (a method that wants one)
    previous_input: torch.Tensor | None = None  # x of the previous pass (a MODEL method)
    computed_input: torch.Tensor | None = None  # x of the last computed pass (a MODEL method)
    computed_output: torch.Tensor | None = None  # v of the last computed pass (a MODEL method)
    pending: Any = None  # a method's measurement not yet read to the host (read with its next one)
    decisions: dict[int, Decision] = field(default_factory=dict)
    window: tuple[int, int] | None = None  # the steps this state serves (one expert's, experts="separate")

    def held_bytes(self) -> int:
        """Bytes of the tensors this state keeps between passes (each counted once)."""
        kept = {id(t): t for t in (self.residual, self.older_residual, self.previous_signal, self.previous_input,
                                   self.computed_input, self.computed_output) if t is not None}
        return sum(t.numel() * t.element_size() for t in kept.values())

    def decide(self, step: int, num_steps: int, measurement: float | None, have_cache: bool) -> Decision:
        """The policy's decision, in the step numbering of the steps this state serves."""
        if self.window is None:
            return self.policy.decide(step, num_steps, measurement, have_cache)
        first, end = self.window
        return self.policy.decide(step - first, end - first, measurement, have_cache)


@dataclass
class PassContext:
    branch: str  # the key of the branch state: the caller's name, "@EXPERT" added with experts="separate"
    step: int
    num_steps: int
    name: str = ""  # the caller's branch name (what the stats show)
    expert: str | None = None
    latent: torch.Tensor | None = None
    decision: Decision | None = None
    signal: float | None = None
    h0: torch.Tensor | None = None
    reused_output: torch.Tensor | None = None
    signal_tensor: torch.Tensor | None = None


def mean_abs(t: torch.Tensor) -> torch.Tensor:
    return float_abs(t).mean()


class RunStats:
    """What every pass did: computed or reused, per branch, with the policy's signal and accumulator."""

    def __init__(self, method: str):
        self.method = method
        self.records: list[PassRecord] = []
        self.notes: dict[int, list[str]] = {}  # generation -> what the run did differently from its profile
        self.tallies: dict[int, dict[str, int]] = {}  # generation -> how often something a method noted happened
        # generation -> branch -> the most bytes the cache held for that branch between two passes
        self.cache_bytes: dict[int, dict[str, int]] = {}

    def held(self, generation: int, branch: str, nbytes: int) -> None:
        per_branch = self.cache_bytes.setdefault(generation, {})
        per_branch[branch] = max(per_branch.get(branch, 0), nbytes)

    def generation_ids(self) -> list[int]:
        return sorted({r.generation for r in self.records})

    def of(self, generation: int | None = None) -> list[PassRecord]:
        """Records of one generation (default: the latest)."""
        if not self.records:
            return []
        gen = self.records[-1].generation if generation is None else generation
        return [r for r in self.records if r.generation == gen]

    def pattern(self, generation: int | None = None, branch: str | None = None, mark_switch: bool = False) -> str:
        """One character per transformer pass in call order: ``C`` computed, ``.`` reused; with ``mark_switch``,
        ``|`` where a two-expert model hands over to its next expert."""
        out, expert = [], None
        for r in self.of(generation):
            if branch not in (None, r.branch):
                continue
            if mark_switch and expert is not None and r.expert != expert:
                out.append("|")
            expert = r.expert
            out.append("C" if r.computed else ".")
        return "".join(out)

    def experts(self, generation: int | None = None) -> dict[str, dict[str, int]]:
        """Per expert of a two-expert model, in run order: computed and total passes, and its first step."""
        found: dict[str, dict[str, int]] = {}
        for r in self.of(generation):
            if r.expert is not None:
                counts = found.setdefault(r.expert, {"computed": 0, "total": 0, "first_step": r.step})
                counts["computed"] += r.computed
                counts["total"] += 1
        return found

    def counts(self, generation: int | None = None, branch: str | None = None) -> tuple[int, int]:
        records = [r for r in self.of(generation) if branch in (None, r.branch)]
        return sum(r.computed for r in records), len(records)

    def branches(self, generation: int | None = None) -> list[str]:
        seen: list[str] = []
        for r in self.of(generation):
            if r.branch not in seen:
                seen.append(r.branch)
        return seen

    def summary(self, generation: int | None = None) -> str:
        computed, total = self.counts(generation)
        if total == 0:
            return f"{self.method}: no transformer pass ran"
        lines = [f"{self.method}: computed {computed}/{total} passes (ideal speedup {total / max(computed, 1):.2f}x)",
                 f"  pattern {self.pattern(generation, mark_switch=True)}"]
        for branch in self.branches(generation):
            c, t = self.counts(generation, branch)
            lines.append(f"  branch {branch}: computed {c}/{t}")
        for expert, counts in self.experts(generation).items():
            lines.append(f"  expert {expert} (from step {counts['first_step']}): computed {counts['computed']}/"
                         f"{counts['total']}")
        gen = self.records[-1].generation if generation is None else generation
        held = self.cache_bytes.get(gen, {})
        if held:
            lines.append(f"  cache held at most {max(held.values()) / 2 ** 20:.1f} MiB per branch between passes "
                         f"({sum(held.values()) / 2 ** 20:.1f} MiB over {len(held)} branches)")
        lines += [f"  note: {note}" for note in self.notes.get(gen, [])]
        lines += [f"  {count} {text}" for text, count in self.tallies.get(gen, {}).items()]
        return "\n".join(lines)

    def to_dict(self, generation: int | None = None) -> dict[str, Any]:
        computed, total = self.counts(generation)
        return {
            "method": self.method,
            "computed_passes": computed,
            "total_passes": total,
            "ideal_speedup": total / computed if computed else None,
            "pattern": self.pattern(generation),
            "experts": self.experts(generation),
            "branches": {b: dict(zip(("computed", "total"), self.counts(generation, b)))
                         for b in self.branches(generation)},
            "notes": self.notes.get(self.records[-1].generation if generation is None and self.records
                                    else generation, []),
            "cache_peak_bytes": dict(self.cache_bytes.get(self.records[-1].generation if generation is None
                                                          and self.records else generation, {})),
            "passes": [r.__dict__ for r in self.of(generation)],
        }


class CacheRunner:
    storage = CacheStorage()  # where residuals are kept (a runner that keeps none, calibration's, has this default)

    @staticmethod
    def guidance_of() -> float | None:
        """The guidance scale of the generation being run, when the entry point can tell (an installation sets
        its clock's reader here); read once per generation, to warn when a tuned profile was tuned at another."""
        return None

    def __init__(self, config: MethodConfig, *,
                 group: SequenceGroup | Callable[[], SequenceGroup | None] | None = None,
                 sharded: frozenset[str] | set[str] = frozenset(), cfg_group: SequenceGroup | None = None,
                 storage: CacheStorage = CacheStorage()):
        """``group`` (or a callable returning it, asked at each measurement) is the sequence-parallel group;
        ``sharded`` names the measurements (``stepcache.distributed.SIGNAL``, ``LATENT``) that are taken on a
        rank's shard and must be reduced over it. Measurements not named are rank-invariant: no collective.

        ``cfg_group`` spans ranks that run *different* CFG branches of the same step (CFG parallelism, one
        branch per rank): a method whose branches follow one leader branch (its ``decide_on`` parameter) then gets
        the leader's decision from the rank that runs it. ``storage`` says where and in what dtype residuals are
        kept between passes (:mod:`stepcache.storage`)."""
        self.config = config
        self.storage = storage
        self.method = config.method
        self.group_of = group if callable(group) else (lambda: group)
        self.sharded = frozenset(sharded)
        self.cfg_group = cfg_group
        self.stats = RunStats(config.method)
        self.spec = config.spec
        self.predict = config.params.get("predict", "reuse")
        self.separate_experts = config.params.get("experts") == "separate"
        self.method_state = self.spec.start(config)
        self.generation = 0
        self.current: PassContext | None = None
        self._reset_state()

    def _mean_abs(self, measurement: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """``mean(|t|)`` of each tensor: over the whole sequence when ``measurement`` is a shard under a group
        (one all-reduce for all of them), else over what this rank holds."""
        group = self.group_of() if measurement in self.sharded else None
        if group is not None:
            return group.mean_abs(*tensors)
        return [mean_abs(t) for t in tensors]

    def signal_mean_abs(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Means of tensors derived from the adapter's signal (reduced when the adapter marks it a shard)."""
        return self._mean_abs(SIGNAL, *tensors)

    def latent_mean_abs(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Means of tensors derived from the model's input and output (reduced when marked a shard)."""
        return self._mean_abs(LATENT, *tensors)

    def tally(self, text: str) -> None:
        """Count, per generation, something a method wants said in the stats ("N <text>")."""
        counts = self.stats.tallies.setdefault(self.generation, {})
        counts[text] = counts.get(text, 0) + 1

    @property
    def wants_signal(self) -> bool:
        return self.spec.wants_signal

    # ---------------------------------------------------------------------------------------------- lifecycle
    def _reset_state(self) -> None:
        self.branches: dict[str, BranchState] = {}
        self.num_steps: int | None = None
        self.signature: tuple | None = None
        self.branches_at_start: set[str] = set()
        self.finished_branches: set[str] = set()
        self.last_steps: dict[str, int] = {}  # the caller's branch name -> its latest step (any expert)
        self.switch_step: int | None = None  # where a two-expert run's second expert starts, when told
        self.expert: str | None = None  # the expert of the latest pass
        self.generation_open = False

    def reset(self) -> None:
        """End the current generation (if any) and drop every cached tensor."""
        self._finish_generation()
        self._reset_state()

    def _finish_generation(self) -> None:
        if not self.generation_open:
            return
        self.generation_open = False
        computed, total = self.stats.counts(self.generation)
        if total and computed == total:
            why = ("a threshold of 0 disables reuse" if self.config.thresh == 0 else
                   "the threshold may be too low for this model, the warm-up may cover the whole run, or the "
                   "profile may not fit the model")
            warnings.warn(f"stepcache: {self.config.describe()} reused no pass in this generation ({total} passes "
                          f"computed): {why}.", NothingCachedWarning, stacklevel=3)

    def _start_generation(self, num_steps: int, signature: tuple, switch_step: int | None) -> None:
        self.reset()
        self.generation += 1
        self.generation_open = True
        self.num_steps = num_steps
        self.signature = signature
        self.switch_step = switch_step
        for note in self.spec.generation_notes(self.config, num_steps):
            self.note(note)
        from .profiles import ProfileFitWarning, operating_point_mismatch
        for text in self.spec.generation_warnings(self.config, num_steps):
            self.note(text)
            warnings.warn(f"stepcache: {text}", ProfileFitWarning, stacklevel=4)
        if not self.storage.default:
            self.note(self.storage.describe())
        profile = getattr(self.config, "profile", None)  # a calibration run has no profile
        mismatch = operating_point_mismatch(profile, num_steps, self.guidance_of())
        if mismatch:
            self.note(mismatch)
            warnings.warn(f"stepcache: {mismatch}", ProfileFitWarning, stacklevel=4)

    def note(self, text: str) -> None:
        """Say once per generation what this run did differently (shown in the stats' summary and dict)."""
        notes = self.stats.notes.setdefault(self.generation, [])
        if text not in notes:
            notes.append(text)

    def _branch(self, key: str, expert: str | None) -> BranchState:
        state = self.branches.get(key)
        if state is None:
            window = self._expert_window(expert) if self.separate_experts and expert is not None else None
            policy = self.config.make_policy(key, self.num_steps, window, self.switch_step)
            state = self.branches[key] = BranchState(policy, window=window)
        return state

    # ---------------------------------------------------------------------------------------------- experts
    def _run_switch_step(self) -> int:
        if self.switch_step is not None:
            return self.switch_step
        if not self.config.profile.experts:
            raise ValueError(f"stepcache was not told where this two-expert run switches experts, and profile "
                             f"{self.config.profile.name!r} has no model.experts to compute it from")
        return self.config.profile.expert_switch_step(self.num_steps)

    def _expert_window(self, expert: str) -> tuple[int, int]:
        """The steps ``expert`` serves in this run: the first expert up to the switch, the second after it."""
        if expert not in EXPERTS:
            raise ValueError(f"unknown expert {expert!r}; a two-expert model's experts are {', '.join(EXPERTS)}")
        switch = self._run_switch_step()
        return (0, switch) if expert == EXPERTS[0] else (switch, self.num_steps)

    def _enter_expert(self, expert: str, step: int) -> None:
        """A pass of ``expert``: with separate states, the one expert before it is done for this generation, so
        its tensors are released; a pass outside the expert's steps means the switch step was wrong."""
        if self.separate_experts:
            first, end = self._expert_window(expert)
            if not first <= step < end:
                raise ValueError(f"expert {expert!r} ran step {step}, but this run's switch step "
                                 f"{self._run_switch_step()} gives it steps [{first}, {end})")
            if self.expert is not None and expert != self.expert:
                ended = EXPERT_MARK + self.expert
                for key in [k for k in self.branches if k.endswith(ended)]:
                    del self.branches[key]
        self.expert = expert

    # ------------------------------------------------------------------------------------------------- passes
    def begin_pass(self, branch: str, step: int, num_steps: int, latent: torch.Tensor, expert: str | None = None,
                   switch_step: int | Callable[[], int | None] | None = None) -> PassContext:
        """Start one pass of CFG branch ``branch`` at ``step``. A two-expert model names the ``expert`` running
        it and, at least at a generation's first pass, the ``switch_step`` where the second expert takes over
        (or a function giving it, called only when a generation starts)."""
        signature = (tuple(latent.shape), latent.device)
        last = self.last_steps.get(branch)
        if (not self.generation_open or num_steps != self.num_steps or signature != self.signature
                or (last is not None and step <= last)):
            self._start_generation(num_steps, signature, switch_step() if callable(switch_step) else switch_step)
        if not 0 <= step < num_steps:
            raise ValueError(f"step index {step} is outside [0, {num_steps}) for branch {branch!r}")
        if step == 0:
            self.branches_at_start.add(branch)
        self.last_steps[branch] = step
        if expert is not None:
            self._enter_expert(expert, step)
        key = branch + EXPERT_MARK + expert if self.separate_experts and expert is not None else branch
        state = self._branch(key, expert)
        ctx = self.current = PassContext(key, step, num_steps, branch, expert, latent=latent)
        if self.spec.skips == MODEL:
            self._decide_on_input(ctx, state)
        return ctx

    def enter_stack(self, h0: torch.Tensor, signal: torch.Tensor | None = None) -> torch.Tensor | None:
        """Decide for the block stack. Returns ``h0 + residual`` when the stack is to be skipped, else None."""
        ctx = self._require_pass()
        if self.spec.skips != STACK:
            return None  # decided at begin_pass; a stack reached here is computed
        state = self.branches[ctx.branch]
        have_cache = state.residual is not None and state.residual.shape == h0.shape
        ctx.signal = self.spec.measure(self, state, ctx, h0, signal)
        decision = state.decide(ctx.step, ctx.num_steps, ctx.signal, have_cache)
        decision = ctx.decision = self._agreed(decision, state, h0.device)
        ctx.h0 = h0
        if decision.compute:
            # The stack is about to run, and leave_stack replaces the tensor it would drop: release it now, one
            # residual-sized tensor less at the pass's peak (the last residual reusing; the older one predicting)
            if self.predict == "linear":
                state.older_residual = None
            else:
                state.residual = None
            return None
        return self._reused_from(state, ctx.step, h0, h0.dtype)

    def leave_stack(self, h_out: torch.Tensor) -> None:
        ctx = self._require_pass()
        if self.spec.skips != STACK or ctx.h0 is None:
            return
        self._store_residual(self.branches[ctx.branch], ctx.step, h_out - ctx.h0)
        ctx.h0 = None

    def _store_residual(self, state: BranchState, step: int, residual: torch.Tensor) -> None:
        if self.predict == "linear":
            state.older_residual, state.older_residual_step = state.residual, state.residual_step
        state.residual, state.residual_step = self.storage.keep(residual.detach()), step
        state.residual_dtype = residual.dtype

    def _reused_from(self, state: BranchState, step: int, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``base`` plus the residual predicted for ``step``, on ``base``'s device in ``dtype`` (a stored residual is
        copied only when it is kept elsewhere, or the model moved since: offloading)."""
        residual = self.storage.bring(state.residual, base.device, dtype)
        older = state.older_residual
        if (self.predict != "linear" or older is None or older.shape != residual.shape
                or state.residual_step == state.older_residual_step):
            return base + residual
        # A straight line through the last two computed residuals, in step index, read at this step: lerp's
        # weight 1 + slope lies past the last one, and lerp makes one temporary where r + (r - older) * slope
        # makes three; the sum with ``base`` then goes into it.
        slope_steps = (step - state.residual_step) / (state.residual_step - state.older_residual_step)
        return torch.lerp(self.storage.bring(older, base.device, dtype), residual, 1 + slope_steps).add_(base)

    def end_pass(self, output: torch.Tensor | None) -> None:
        """Close the pass; ``output`` is the model's latent-space prediction (needed by a MODEL method only)."""
        ctx = self._require_pass()
        state = self.branches[ctx.branch]
        if self.spec.skips == MODEL and ctx.decision.compute:
            self.spec.observe(self, state, ctx, output)
            self._store_residual(state, ctx.step, output - ctx.latent)
        self.current = None
        decision = ctx.decision
        if decision is None:
            raise RuntimeError("the adapter never reached the block stack in this pass")
        state.decisions[ctx.step] = decision
        self.stats.held(self.generation, ctx.name, state.held_bytes())
        self.stats.records.append(PassRecord(self.generation, ctx.name, ctx.step, decision.compute,
                                             decision.reason, ctx.signal, decision.accumulator, ctx.expert))
        if ctx.step == ctx.num_steps - 1:
            self.finished_branches.add(ctx.name)
            if self.branches_at_start and self.branches_at_start <= self.finished_branches:
                self.reset()

    def abort_pass(self) -> None:
        """A pass raised: the generation cannot go on, so end it and release every cached tensor now."""
        self.current = None
        self.reset()

    def _agreed(self, decision: Decision, state: BranchState, device: torch.device) -> Decision:
        """The decision every rank of the parallel group takes: compute if any rank computes."""
        group = self.group_of()
        if group is None or not agree_on_compute(group, decision.compute, device) or decision.compute:
            return decision
        state.policy.restart_accumulation()  # as the policy does itself when it decides to compute
        return Decision(True, "agreed", decision.accumulator)

    def _require_pass(self) -> PassContext:
        if self.current is None:
            raise RuntimeError("stepcache runner used outside a transformer pass")
        return self.current

    # ------------------------------------------------------------------------------ deciding at the pass's start
    def _decide_on_input(self, ctx: PassContext, state: BranchState) -> None:
        """A MODEL method decides before the model runs. With ``decide_on`` set, the other CFG branches follow
        that branch's decision of the same step (from its rank, under CFG parallelism)."""
        x = ctx.latent
        leader = self.config.decide_on
        if leader is not None:  # a video (and an expert's state) follows its own leader branch
            leader += ctx.branch[len(base_branch(ctx.branch)):]
        leader_state = self.branches.get(leader) if leader and leader != ctx.branch else None
        have_cache = state.residual is not None and state.residual.shape == x.shape
        remote = leader is not None and self.cfg_group is not None  # the leader branch runs on another rank
        followed = None
        if remote and ctx.branch != leader:
            followed = share_decision(self.cfg_group, None, x.device)
        elif leader_state is not None and ctx.step in leader_state.decisions:
            followed = leader_state.decisions[ctx.step]
        if followed is not None:
            compute = followed.compute or not have_cache
            ctx.decision = Decision(compute, "follow" if compute == followed.compute else "no-cache",
                                    followed.accumulator)
            self.spec.follow(self, state, ctx, x)
        else:
            ctx.signal = self.spec.measure(self, state, ctx, x, None)
            ctx.decision = self._agreed(state.decide(ctx.step, ctx.num_steps, ctx.signal, have_cache), state,
                                        x.device)
            if remote:
                share_decision(self.cfg_group, ctx.decision, x.device)
        if not ctx.decision.compute:
            ctx.reused_output = self._reused_from(state, ctx.step, x, state.residual_dtype)
