"""Judge the calibration tool on the demo model: ``python -m stepcache.wan21.demo.calibration_study``.

Everything here is measured in one run, with the project's calibration tool (:mod:`stepcache.calibrate`):

* **repeatability**: the same prompts and seeds calibrated twice give the same tables (exactly);
* **prompt independence**: a calibration on other prompts gives ratios inside the first one's reported spread;
* **TeaCache fit**: the degree-4 polynomial against a straight line, in-sample and on held-out runs;
* **resampling**: from a 50-step calibration, ``nearest`` (the reference's) and ``compose`` (ours) each predict
  the ratios measured at 10, 20, 30 and 75 steps; the mean absolute error of each is reported.

It writes ``study.json`` and ``study.md`` (a table a person can check) into ``--out``.
"""
from __future__ import annotations

import json
import sys

import torch

from ...cliargs import OneLineParser, float_at_least, int_at_least
from ...errors import run_cli
from ...outputs import check_output_dir, write_json, write_text
from .calibrate_demo import CALIBRATION_SEED, calibration_profile, calibration_prompts
from .model import GUIDANCE, DemoPipeline, load

BASE_STEPS = 50
TARGET_STEPS = (10, 20, 30, 75)


def tables_equal(a: dict, b: dict) -> bool:
    """The measured parts of two profiles (everything but when and where they were written)."""
    def measured(data):
        data = json.loads(json.dumps(data))
        data.pop("source", None)
        data.get("measured_on", {}).pop("tool", None)
        return data
    return measured(a) == measured(b)


def spread_agreement(first: dict, second: dict) -> dict:
    """How the second calibration's mean ratios sit in the first one's spread, step by step (padding excluded)."""
    mag_a, mag_b = first["magcache"], second["magcache"]
    nb = len(mag_a["branches"])
    rows = []
    for i, (mean_a, mean_b, std_a, std_b, low, high) in enumerate(zip(
            mag_a["ratios"], mag_b["ratios"], mag_a["spread"]["std"], mag_b["spread"]["std"],
            mag_a["spread"]["min"], mag_a["spread"]["max"])):
        if i < nb:
            continue
        rows.append({"step": i // nb, "branch": mag_a["branches"][i % nb], "diff": abs(mean_a - mean_b),
                     "std": max(std_a, std_b), "in_range": low <= mean_b <= high})
    return {"steps": len(rows), "max_abs_diff": max(r["diff"] for r in rows),
            "largest_std": max(r["std"] for r in rows),
            "within_1_std": sum(r["diff"] <= r["std"] for r in rows) / len(rows),
            "within_2_std": sum(r["diff"] <= 2 * r["std"] for r in rows) / len(rows),
            "inside_min_max": sum(r["in_range"] for r in rows) / len(rows), "rows": rows}


def teacache_fit(profile: dict) -> dict:
    variant = profile["teacache"]["variants"]["default"]
    keys = ("pairs", "fit_range", "fit_rmse", "linear_rmse", "heldout_rmse", "heldout_linear_rmse",
            "heldout_pairs", "negative_inside_range", "coefficients")
    return {k: variant[k] for k in keys if k in variant}


def study(weights=None, prompts: int = 8, seeds=(CALIBRATION_SEED,), guidance: float = GUIDANCE,
          base_steps: int = BASE_STEPS, target_steps=TARGET_STEPS, progress: bool = True) -> dict:
    from stepcache.calibrate import resampling_errors
    from tqdm.auto import tqdm
    demo = DemoPipeline(load(weights))
    pool = calibration_prompts(2 * prompts)
    first, second = pool[:prompts], pool[prompts:]
    jobs = [("first", first, base_steps), ("repeat", first, base_steps), ("other prompts", second, base_steps)]
    jobs += [(f"{n} steps", first, n) for n in target_steps]
    profiles = {}
    for label, chosen, steps in tqdm(jobs, desc="calibrations", disable=not progress, file=sys.stderr):
        profiles[label] = calibration_profile(demo, chosen, list(seeds), steps, guidance, "demo-study")
    base = profiles["first"]
    resampling = {}
    for n in target_steps:
        errors = resampling_errors(base["magcache"], profiles[f"{n} steps"]["magcache"])
        resampling[str(n)] = {**errors, "winner": min(errors, key=errors.get)}
    wins = {mode: sum(r["winner"] == mode for r in resampling.values()) for mode in ("nearest", "compose")}
    mean_error = {mode: sum(r[mode] for r in resampling.values()) / len(resampling) for mode in ("nearest", "compose")}
    return {
        "model": str(demo.model.metadata.get("path")), "trained_steps": json.loads(
            demo.model.metadata.get("info", "{}")).get("trained_steps"),
        "guidance": guidance, "seeds": list(seeds), "prompts": first, "other_prompts": second,
        "base_steps": base_steps,
        "repeat_identical": tables_equal(base, profiles["repeat"]),
        "other_prompts_agreement": spread_agreement(base, profiles["other prompts"]),
        "teacache_fit": teacache_fit(base),
        "resampling": resampling, "resampling_wins": wins, "resampling_mean_error": mean_error,
        "better_resampling": min(mean_error, key=mean_error.get),
        "measured_ratios": {label: p["magcache"]["ratios"] for label, p in profiles.items()},
        "branches": base["magcache"]["branches"],
    }


def render(result: dict) -> str:
    agree = result["other_prompts_agreement"]
    fit = result["teacache_fit"]
    lines = [
        "# Calibration on the demo model",
        "",
        f"Model: {result['model']} (trained steps {result['trained_steps']}), guidance {result['guidance']}, "
        f"seeds {result['seeds']}, {len(result['prompts'])} prompts per calibration, "
        f"{result['base_steps']}-step base calibration.",
        "",
        f"- Same prompts and seeds twice: tables identical = **{result['repeat_identical']}**.",
        f"- Other prompts: the largest difference of a step's mean ratio is {agree['max_abs_diff']:.4f} "
        f"(largest per-step std over runs {agree['largest_std']:.4f}); {agree['within_1_std']:.0%} of the "
        f"{agree['steps']} step-branch ratios within 1 std, {agree['within_2_std']:.0%} within 2 std, "
        f"{agree['inside_min_max']:.0%} inside the first calibration's min-max range.",
        f"- TeaCache, degree 4 vs straight line on {fit['pairs']} pairs over signal change "
        f"[{fit['fit_range'][0]:.4g}, {fit['fit_range'][1]:.4g}]: in-sample RMSE {fit['fit_rmse']:.4g} vs "
        f"{fit['linear_rmse']:.4g}"
        + (f"; held-out RMSE {fit['heldout_rmse']:.4g} vs {fit['heldout_linear_rmse']:.4g} "
           f"({fit['heldout_pairs']} pairs)" if "heldout_rmse" in fit else "")
        + f"; negative inside its range: {fit['negative_inside_range']}.",
        "",
        f"Resampling the {result['base_steps']}-step MagCache table to other step counts (mean absolute error "
        "against the ratios measured at that step count):",
        "",
        "| steps | nearest (reference) | compose (stepcache) | better |",
        "|---:|---:|---:|:---|",
    ]
    for n, row in result["resampling"].items():
        lines.append(f"| {n} | {row['nearest']:.4f} | {row['compose']:.4f} | {row['winner']} |")
    mean = result["resampling_mean_error"]
    lines += ["", f"Mean over step counts: nearest {mean['nearest']:.4f}, compose {mean['compose']:.4f}; "
                  f"better: **{result['better_resampling']}** (wins {result['resampling_wins']})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stepcache.wan21.demo.calibration_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="model file (default: the shipped one)")
    p.add_argument("--out", default="calibration-study", help="folder for study.json and study.md")
    p.add_argument("--prompts", type=int_at_least(1), default=8, help="prompts per calibration (default 8)")
    p.add_argument("--seeds", type=int, nargs="+", default=[CALIBRATION_SEED])
    p.add_argument("--guidance", type=float_at_least(1.0), default=GUIDANCE, help=f"CFG scale (default {GUIDANCE})")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads (default 1)")
    a = p.parse_args(argv)

    def body():
        out = check_output_dir(a.out, "--out")
        torch.set_num_threads(a.threads)
        result = study(a.weights, a.prompts, a.seeds, a.guidance)
        write_json(out / "study.json", result)
        text = render(result)
        write_text(out / "study.md", text)
        print(text)
    return run_cli(body, prog="python -m stepcache.wan21.demo.calibration_study")


if __name__ == "__main__":
    sys.exit(main())
