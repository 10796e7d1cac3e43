"""`stepcache schedule`: the pass pattern of an input-independent method, without a model.

A method whose ``needs_model`` is None (MagCache: the step index and the profile's ratio table) has its whole
schedule known before a model runs. The simulation drives the same runner and policies a real run uses, with
one-element stand-in tensors, so the printed pattern is what a generation will do.
"""
from __future__ import annotations

import sys
import warnings

from .cliargs import int_at_least
from . import methods
from .methods import PARAMETERS, resolve_method
from .profiles import ProfileFitWarning, load_profile


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


# The grid searched for a target speedup: the K and retention values the published presets use.
SPEEDUP_KS = (2, 3, 4, 6)
SPEEDUP_RETENTIONS = (0.1, 0.2)


def magcache_reaching(profile, speedup: float, steps: int, branches: list[str] | None = None) -> list[dict]:
    """Per K and retention of the grid, the smallest MagCache threshold (4 significant digits) whose schedule on
    ``profile`` reaches ``speedup`` at ``steps`` (in passes), with its speedup and its estimated error: the sum of
    the accumulated magnitude error over the reused passes, MagCache's own measure of what reuse costs. The
    schedule does not depend on the input, so this needs no model."""
    out = []
    for k in SPEEDUP_KS:
        for retention in SPEEDUP_RETENTIONS:
            def run(thresh):
                config = resolve_method("magcache", profile, None, thresh=thresh, K=k, retention_ratio=retention)
                return simulate(config, steps, branches)

            def speed(stats):
                computed, total = stats.counts()
                return total / computed
            if speed(run(1e3)) < speedup:
                continue
            low, high = 0.0, 1e3
            for _ in range(30):
                mid = (low + high) / 2
                low, high = (mid, high) if speed(run(mid)) < speedup else (low, mid)
            thresh = float(f"{high:.4g}")
            stats = run(thresh)
            if speed(stats) < speedup:  # rounding to 4 digits went below the boundary
                thresh = float(f"{thresh * 1.001:.4g}")
                stats = run(thresh)
            error = sum(r.accumulator or 0.0 for r in stats.records if not r.computed)
            out.append({"params": {"thresh": thresh, "K": k, "retention_ratio": retention},
                        "speedup": speed(stats), "error": error})
    return out


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
    parser.add_argument("--speedup", type=float, default=None,
                        help="MagCache: print the setting that reaches this speedup (in passes) with the least "
                             "estimated error on the profile's table, and a tuned preset of that speed if the "
                             "profile has one (stepcache tune)")
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
    if args.speedup is not None:
        return speedup_setting(args)
    config = resolve_method(args.method, args.profile, args.preset, thresh=args.thresh, K=args.K,
                            retention_ratio=args.retention, resample=args.resample,
                            retention_rule=args.retention_rule, experts=args.experts)
    steps = args.steps or int(config.profile.method("magcache")["steps"])
    branches = config.profile.magcache_branches()[:1] if args.no_cfg else None
    with warnings.catch_warnings():   # what a run would warn of is printed below, with the stats' notes
        warnings.simplefilter("ignore", ProfileFitWarning)
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
    for note in stats.to_dict()["notes"]:
        print(f"note: {note}")
    return 0


def speedup_setting(args) -> int:
    """``--speedup X``: the least-error MagCache setting of the profile's table that reaches X."""
    import math
    if not math.isfinite(args.speedup) or args.speedup <= 1:
        print(f"error: --speedup {args.speedup}: give a speedup > 1 (1 is the uncached run)", file=sys.stderr)
        return 2
    profile = load_profile(args.profile)
    steps = args.steps or int(profile.method("magcache")["steps"])
    branches = profile.magcache_branches()[:1] if args.no_cfg else None
    found = magcache_reaching(profile, args.speedup, steps, branches)
    tuned = profile.method("magcache").get("presets", {}).get(f"{args.speedup:g}x")
    if tuned is not None:
        note = profile.method("magcache").get("preset_notes", {}).get(f"{args.speedup:g}x", "")
        print(f"tuned on your model (stepcache tune): preset {args.speedup:g}x = {tuned}  [{note}]")
    if not found:
        print(f"error: no MagCache setting of the grid (K {SPEEDUP_KS}, retention {SPEEDUP_RETENTIONS}) reaches "
              f"{args.speedup:g}x at {steps} steps on {profile.name}", file=sys.stderr)
        return 2
    best = min(found, key=lambda f: f["error"])
    print(f"from the table alone, the least estimated error at {args.speedup:g}x ({steps} steps): {best['params']} "
          f"({best['speedup']:.2f}x, estimated error {best['error']:.3f})")
    for f in sorted(found, key=lambda f: f["error"]):
        print(f"  {str(f['params']):<52} {f['speedup']:.2f}x  estimated error {f['error']:.3f}")
    print("The estimate is MagCache's own error model, not a measurement: `stepcache tune` measures PSNR on your "
          "model.")
    return 0
