"""Open-Sora's two MagCache rules, by name, and the profile each one uses.

* ``reference`` (default; profile ``opensora-1.2``): the rule of the code the published Open-Sora numbers were
  made with, ``eval/magcache/experiments/opensora.py`` in Zehong-Ma/MagCache (MC-OS:229-373, 420-433):
  square-rooted ratios (``ratio ** 0.5``), error ``1 - acc`` without ``abs``, ``<=``, retention
  ``skip_time = 6`` of 30 steps (``int(0.2 * 30)``), and the 29-entry table indexed ``t - 1`` (stored with a
  leading padding 1.0, so index = step). At 30 steps 0.12/K3 gives ``CCCCCC...C...C...C...C...C...C`` (12/30)
  and 0.24/K5 gives 10/30.
* ``released``: the rule of MagCache's released model scripts (MagCache4HunyuanVideo, MagCache4Wan2.1) on the
  same table: raw ratios (no square root) and error ``|1 - acc|``. Retention (``int(0.2 * steps)``) and indexing
  (padding 1.0 at index 0) are the same; the comparison is ``<=`` as in the released single-branch script
  (MagCache4HunyuanVideo; MagCache4Wan2.1 uses ``<``, which gives the same Open-Sora schedules at the published
  settings). It is built from ``opensora-1.2`` at run time (profile name ``opensora-1.2-released``); write it to a
  file with ``python -m stepcache.opensora.rules --write FILE`` to use it elsewhere (``stepcache schedule
  --profile FILE``).

``python -m stepcache.opensora.rules`` prints both rules' schedules at the published settings.
"""
from __future__ import annotations

import argparse
import sys

from ..methods.magcache import with_rule
from ..outputs import write_json
from ..profiles import Profile, load_profile

PROFILE = "opensora-1.2"
REFERENCE = "reference"
RELEASED = "released"
MAGCACHE_RULES = {
    REFERENCE: "the published Open-Sora numbers' rule (eval/magcache/experiments/opensora.py): sqrt ratios, "
               "1 - acc without abs, <=, retention 6 of 30",
    RELEASED: "MagCache's released model scripts' rule: raw ratios, |1 - acc|, <=, retention int(0.2 * steps)",
}
PUBLISHED_SETTINGS = {"E012K3R02": dict(thresh=0.12, K=3, retention_ratio=0.2),
                      "E024K5R02": dict(thresh=0.24, K=5, retention_ratio=0.2)}


def released_profile(base: str | Profile = PROFILE) -> Profile:
    """``base`` with its MagCache section switched to the released scripts' rule (every other table unchanged)."""
    return with_rule(load_profile(base), RELEASED, MAGCACHE_RULES[RELEASED])


def magcache_profile(rule: str = REFERENCE, base: str | Profile = PROFILE) -> Profile:
    if rule not in MAGCACHE_RULES:
        raise ValueError(f"unknown MagCache rule {rule!r}; known rules: {', '.join(MAGCACHE_RULES)}")
    return load_profile(base) if rule == REFERENCE else released_profile(base)


def schedule(rule: str, steps: int = 30, **params) -> tuple[str, int, int]:
    """(pattern, computed, total) of MagCache under ``rule`` without a model (the shipped schedule simulator)."""
    from ..methods import resolve_method
    from ..schedule import simulate

    stats = simulate(resolve_method("magcache", magcache_profile(rule), **params), steps)
    computed, total = stats.counts()
    return stats.pattern(), computed, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepcache.opensora.rules", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30, as published)")
    parser.add_argument("--write", metavar="FILE", help="write the released-rule profile to FILE (.json)")
    args = parser.parse_args(argv)
    if args.write:
        if not args.write.endswith(".json"):
            print(f"error: --write {args.write!r} must be a .json file", file=sys.stderr)
            return 2
        write_json(args.write, released_profile().data)
        print(f"wrote {args.write}")
    for rule in MAGCACHE_RULES:
        print(f"{rule}: {MAGCACHE_RULES[rule]}")
        for name, params in PUBLISHED_SETTINGS.items():
            pattern, computed, total = schedule(rule, args.steps, **params)
            print(f"  {name}  {pattern}  {computed}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
