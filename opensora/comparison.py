"""The published Open-Sora comparison, run by a drop-in script (or ``python -m stepcache.opensora.generate_set``)
given no argument at all, as the seed's ``cd eval/magcache && python experiments/opensora.py`` runs it.

The published script (MC-OS:375-455, ``eval/magcache/experiments/opensora.py`` in Zehong-Ma/MagCache) makes the
VBench prompts with seed 0 (``loop=1``) four times: uncached (``eval_base``), TeaCache 0.1 and 0.2
(``eval_teacache_slow`` / ``_fast``) and MagCache 0.12, K 3, retention 6 of 30 (``eval_ours``), each into its
folder under ``./samples/``, at the engine's defaults (480p, 9:16, 51 frames, 30 steps, cfg 7.0). As published it
stops at once: it reads ``../vbench/VBench_full_info.json`` from the working directory, which from
``eval/magcache`` names a missing ``eval/vbench/``.

Here the same settings, folders and prompts run through :mod:`.generate_set`: the prompt list is the checkout's
own file, found from the script's folder (:func:`.generate_set.repository_prompt_files`); every folder is
checked before any model loads (one that holds another setting stops the run with one line); each setting
resumes where it stopped; one engine serves every setting (the published script built one per setting: the cache
is put on and taken off the transformer instance between them); and the ``stepcache compare`` command is printed
at the end. EasyCache has no published Open-Sora setting, so ``easycache_opensora.py`` adds its derived default
after the published four.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Callable

from .generate_set import (PlanError, build_parser, engine_from_args, find_repository_prompts, make_plan,
                           repository_prompt_files, run)
from .adapter import MultiGPUNotSupported

SAMPLES = Path("samples")  # the published script writes ./samples/... under the working directory
REPORT = SAMPLES / "opensora_compare"
# (folder, method, flags): the published eval_* functions in their order, with their folder names.
PUBLISHED = (
    ("opensora_base", "none", ()),
    ("opensora_teacache_slow", "teacache", ("--preset", "slow")),           # rel_l1_thresh 0.1
    ("opensora_teacache_fast", "teacache", ("--preset", "fast")),           # rel_l1_thresh 0.2
    ("opensora_ours_012_max3step", "magcache", ("--preset", "E012K3R02")),  # 0.12, K 3, skip_time 6 = 0.2 * 30
)
UNPUBLISHED = {"easycache": ("opensora_easycache", "easycache", ("--preset", "derived"))}


def settings(method: str | None) -> list[tuple[str, str, tuple[str, ...]]]:
    """The published four, and the script's own method at its default when the comparison has none of it."""
    found = list(PUBLISHED)
    if method in UNPUBLISHED:
        found.append(UNPUBLISHED[method])
    return found


def comparison_prompts(script: str | os.PathLike | None) -> Path:
    """The checkout's VBench list (what the published script meant to read), else the installed vbench's."""
    from ..eval.prompts import VBENCH_INFO_FILE, vbench_prompt_file

    found = find_repository_prompts(script) or vbench_prompt_file()
    if found is None:
        looked = ", ".join(str(p) for p in repository_prompt_files(script))
        raise PlanError(f"no arguments: the published comparison reads {VBENCH_INFO_FILE}, but none of {looked} "
                        f"exists and the vbench package is not installed; copy this script into eval/magcache/"
                        f"experiments/ of a MagCache checkout, `pip install --no-deps vbench`, or give --prompts FILE "
                        f"--out DIR (--help)")
    return found


def command(words: list[str]) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def run_comparison(method: str | None, script: str | os.PathLike | None = None,
                   engine_factory: Callable[[Any], Any] | None = None, log=print) -> int:
    prompts = comparison_prompts(script)
    steps = []
    for folder, setting_method, flags in settings(method):
        argv = ["--prompts", str(prompts), "--seeds", "0", "--method", setting_method, *flags,
                "--out", str(SAMPLES / folder)]
        args = build_parser(None).parse_args(argv)  # the generic parser: each setting checked as its command line
        steps.append((args, make_plan(args, script=script), argv))
    log(f"no arguments: the published Open-Sora comparison (eval/magcache/experiments/opensora.py) over "
        f"{len(steps[0][1].jobs)} prompts of {prompts}, seed 0; rerun to resume, --help for flags")
    for args, plan, argv in steps:
        todo = len(plan.remaining())
        log(f"  {plan.label}: {plan.out}, {len(plan.jobs) - todo} made, {todo} to make  "
            f"(the same as: {command(['python', '-m', 'stepcache.opensora.generate_set', *argv])})")
    engine = None
    for args, plan, _ in steps:
        if not plan.remaining():
            continue
        try:
            if engine is None:  # built once, and only when something is left to make
                engine = (engine_factory or engine_from_args)(args)
            log(f"{plan.label} -> {plan.out}")
            code = run(plan, engine, log)
        except (MultiGPUNotSupported, ImportError) as exc:  # the fork missing, an engine whose workers lack the cache
            raise PlanError(str(exc)) from None
        if code:
            return code
    baseline, *cached = (str(plan.out) for _, plan, _ in steps)
    log(f"all {len(steps)} settings are made; compare them (from {os.getcwd()}):")
    log("  " + command(["stepcache", "compare", "--gt_video_dir", baseline, "--generated_video_dir", *cached,
                        "--out", str(REPORT)]))
    return 0
