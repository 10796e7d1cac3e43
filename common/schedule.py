"""`stepcache schedule`: the pass pattern of an input-independent method, without a model.

A method whose ``needs_model`` is None (MagCache: the step index and the profile's ratio table) has its whole
schedule known before a model runs. The simulation drives the same runner and policies a real run uses, with
one-element stand-in tensors, so the printed pattern is what a generation will do.
"""
from __future__ import annotations

import sys

from .cliargs import int_at_least
from . import methods
from .methods import PARAMETERS, resolve_method
from .profiles import load_profile


def simulate(config, num_steps: int, branches: list[str] | None = None):
    """Run the real runner over ``num_steps`` steps with stand-in tensors; returns its stats. For a two-expert
    profile the passes before the profile's switch step are the first expert's, the rest the second's."""
    import torch

    from .methods import EXPERTS
    from .runner import CacheRunner

    branches = branches or config.profile.magcache_branches()
    runner = CacheRunner(config)
    one = torch.zeros(1)
    switch = config.profile.expert_switch_step(num_steps) if config.profile.experts else None
    for step in range(num_steps):
        expert = None if switch is None else EXPERTS[step >= switch]
        for branch in branches:
            runner.begin_pass(branch, step, num_steps, one, expert, switch)
            if runner.enter_stack(one) is None:
                runner.leave_stack(one)
            runner.end_pass(one)
    return runner.stats


def add_arguments(parser) -> None:
    parser.add_argument("--profile", required=True, help="a shipped profile name (see `stepcache profiles`) or a "
                                                         "profile file")
    parser.add_argument("--method", default="magcache", help="teacache, magcache or easycache (only magcache's "
                                                             "schedule is input-independent)")
    parser.add_argument("--steps", type=int_at_least(2), default=None,
                        help="denoising steps (default: the steps the profile's table was measured at)")
    parser.add_argument("--preset", default=None, help="one of the profile's named settings, e.g. E024K6R02")
    parser.add_argument("--thresh", type=float, default=None, help=PARAMETERS["magcache"]["thresh"])
    parser.add_argument("--K", type=int, default=None, help=PARAMETERS["magcache"]["K"])
    parser.add_argument("--retention", "--retention-ratio", dest="retention", type=float, default=None,
                        help=PARAMETERS["magcache"]["retention_ratio"])
    parser.add_argument("--resample", default=None, help=PARAMETERS["magcache"]["resample"])
    parser.add_argument("--retention-rule", dest="retention_rule", default=None,
                        help=PARAMETERS["magcache"]["retention_rule"])
    parser.add_argument("--experts", default=None, help=PARAMETERS["magcache"]["experts"])
    parser.add_argument("--no-cfg", action="store_true",
                        help="simulate one branch only (a run with guidance off) for a profile calibrated with CFG")
    parser.add_argument("--list-presets", action="store_true",
                        help="list every method's presets for the profile, with MagCache's computed/total passes")


def list_presets(profile_name: str, steps: int | None) -> list[str]:
    from .profiles import load_profile
    profile = load_profile(profile_name)
    lines = [f"presets of {profile.name}" + (f" at {steps} steps" if steps else "") + ":"]
    for method in methods.names():
        if not profile.has(method):
            continue
        section = profile.method(method)
        notes = section.get("preset_notes", {})
        for name, params in section.get("presets", {}).items():
            if methods.get(method).needs_model is None:
                config = resolve_method(method, profile, name)
                run_steps = steps or int(section["steps"])
                computed, total = simulate(config, run_steps).counts()
                passes = f"{computed}/{total} passes ({total / computed:.2f}x)"
            else:
                passes = "input-dependent"
            note = f"  [{notes[name]}]" if name in notes else ""
            lines.append(f"  {method:<9} {name:<22} {str(params):<52} {passes}{note}")
    return lines


def run(args) -> int:
    if args.list_presets:
        print("\n".join(list_presets(args.profile, args.steps)))
        return 0
    needs_model = methods.get(args.method).needs_model
    if args.experts is not None and not load_profile(args.profile).experts:
        print(f"error: --experts needs a two-expert profile (with model.experts, where the switch is); "
              f"{args.profile} has none", file=sys.stderr)
        return 2
    if needs_model:
        print(f"error: {needs_model}; run it (e.g. `stepcache generate`) and read its stats instead.",
              file=sys.stderr)
        return 2
    config = resolve_method(args.method, args.profile, args.preset, thresh=args.thresh, K=args.K,
                            retention_ratio=args.retention, resample=args.resample,
                            retention_rule=args.retention_rule, experts=args.experts)
    steps = args.steps or int(config.profile.method("magcache")["steps"])
    branches = config.profile.magcache_branches()[:1] if args.no_cfg else None
    stats = simulate(config, steps, branches)
    computed, total = stats.counts()
    branches = stats.branches()
    print(config.describe())
    experts = stats.experts()
    switch = (f"; '|' where expert {list(experts)[1]} takes over at step {experts[list(experts)[1]]['first_step']}"
              if len(experts) > 1 else "")
    print(f"{steps} steps x {len(branches)} branch(es) ({', '.join(branches)}), passes in call order{switch}:")
    print(stats.pattern(mark_switch=True))
    print(f"computed {computed}/{total} passes (ideal speedup {total / computed:.2f}x)")
    return 0
