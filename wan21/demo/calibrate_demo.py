"""Calibrate the demo model's profile: ``python -m stepcache.wan21.demo.calibrate_demo [--weights F] [--out P]``.

The tables come from the project's calibration tool (:mod:`stepcache.calibrate`, the same code as
``stepcache calibrate --model demo``), run uncached through the real ``WanPipeline`` on calibration prompts
that neither the demo nor the prompt-match check uses:

* **MagCache** ratios: per CFG branch and step, the mean over tokens of ``||r_t|| / ||r_{t-1}||`` with
  ``r = h_L - h0`` the block-stack residual, averaged over the calibration videos (spread kept beside it);
* **TeaCache** polynomial: degree-4 ``numpy.polyfit`` of the relative L1 change of the transformer output
  against that of its signal, the timestep embedding ``temb``;
* **EasyCache**: the warm-up from where its transformation rate settles.

On top of the tool, which picks presets by how many passes they reuse, this script measures quality: it sweeps
each method's settings on the calibration prompts and names as ``slow``, ``medium`` and ``fast`` the best-PSNR
setting (against the uncached video) among those reusing at least 25 %, 40 % and 50 % of the passes.

It writes the profile (default ``weights/wan2.1-demo-tiny.json`` in this package), ``calibration.json`` with
the sweeps beside it, and a plot of the magnitude ratios beside the published Wan2.1 ones.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from ...cliargs import OneLineParser, float_at_least, int_at_least
from ...errors import run_cli
from ...outputs import check_output_file, write_json
from .model import GUIDANCE, PROFILE, STEPS, DemoPipeline, load
from .quality import psnr_ssim
from .scenes import ALL_SCENES

CALIBRATION_SEED = 50_000
PROFILE_NAME = "wan2.1-demo-tiny"
PRESET_TARGETS = {"slow": 0.25, "medium": 0.40, "fast": 0.50}
SWEEPS = {
    "magcache": [dict(thresh=t, K=k, retention_ratio=0.2) for k in (2, 3, 4)
                 for t in (0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24)],
    "teacache": [dict(thresh=t) for t in (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)],
    "easycache": [dict(thresh=t, warmup_steps=w) for w in (3, 6)
                  for t in (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4)],
}


def calibration_prompts(n: int) -> list[str]:
    order = torch.randperm(len(ALL_SCENES), generator=torch.Generator().manual_seed(CALIBRATION_SEED)).tolist()
    return [ALL_SCENES[order[i % len(order)]].prompt for i in range(n)]


def sweeps_for(profile_data: dict, steps: int) -> dict:
    """SWEEPS, with EasyCache also tried at the warm-up its measured rate suggests."""
    grids = {method: list(grid) for method, grid in SWEEPS.items()}
    suggested = int(profile_data["easycache"]["suggested_warmup_steps"])
    tried = {p["warmup_steps"] for p in grids["easycache"]}
    if suggested not in tried and suggested < steps - 2:
        thresholds = sorted({p["thresh"] for p in grids["easycache"]})
        grids["easycache"] += [dict(thresh=t, warmup_steps=suggested) for t in thresholds]
    return grids


def sweep(demo: DemoPipeline, profile_path, prompts, seed: int, steps: int, guidance: float, progress=True,
          grids: dict | None = None) -> dict:
    import warnings

    import stepcache
    from tqdm import tqdm
    grids = grids or SWEEPS
    references = [demo([p], [seed], steps=steps, guidance=guidance)[0] for p in prompts]
    bar = tqdm(total=sum(len(g) for g in grids.values()) * len(prompts), desc="preset sweep", unit="video",
               disable=not progress, file=sys.stderr)
    results = {}
    for method, grid in grids.items():
        rows = []
        for params in grid:
            stepcache.enable(demo.pipe, method, profile=str(profile_path), **params)
            computed = total = 0
            psnrs, ssims = [], []
            for prompt, ref in zip(prompts, references):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    video = demo([prompt], [seed], steps=steps, guidance=guidance)[0]
                c, t = stepcache.stats(demo.pipe).counts()
                computed, total = computed + c, total + t
                p, s = psnr_ssim(ref, video)
                psnrs.append(p)
                ssims.append(s)
                bar.update(1)
            stepcache.disable(demo.pipe)
            rows.append({"params": params, "reuse": 1 - computed / total, "psnr": float(np.mean(psnrs)),
                         "psnr_min": float(np.min(psnrs)), "ssim": float(np.mean(ssims))})
        results[method] = rows
    bar.close()
    return results


def choose_presets(rows: list[dict]) -> dict:
    presets = {}
    for name, target in PRESET_TARGETS.items():
        ok = [r for r in rows if r["reuse"] >= target] or [max(rows, key=lambda r: r["reuse"])]
        presets[name] = dict(max(ok, key=lambda r: r["psnr"])["params"])
    return presets


def plot_ratios(profile_data: dict, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from stepcache.profiles import Profile, load_profile
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, style in (("wan2.1-t2v-1.3b", "-"), ("wan2.1-t2v-14b", "--")):
        prof = load_profile(name)
        r = prof.magcache_ratios(prof.method("magcache")["steps"], 0, "none")
        x = np.arange(1, len(r)) / (len(r) - 1)
        ax.plot(x, r[1:], style, color="grey", label=f"{name} (cond, published, {len(r)} steps)")
    demo = Profile(profile_data["name"], profile_data)
    mag = profile_data["magcache"]
    steps = mag["steps"]
    colours = {"cond": "tab:blue", "uncond": "tab:orange"}
    for index, branch in enumerate(mag["branches"]):
        y = np.array(demo.magcache_ratios(steps, index, "none")[1:])
        sd = np.array(mag["spread"]["std"][index::len(mag["branches"])][1:])
        x = np.arange(1, steps) / (steps - 1)
        ax.plot(x, y, "o-", ms=3, color=colours.get(branch), label=f"demo model ({branch}, {steps} steps)")
        ax.fill_between(x, y - sd, y + sd, color=colours.get(branch), alpha=0.15)
    ax.set_xlabel("denoising progress (step / last step)")
    ax.set_ylabel("magnitude ratio ||r_t|| / ||r_t-1||")
    ax.set_title("MagCache magnitude ratios: the demo model vs Wan2.1 (band: std over prompts)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibration_profile(demo: DemoPipeline, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                        name: str, description: str | None = None, progress: bool = False) -> dict:
    """The calibration tool's profile data for the demo model over ``prompts`` x ``seeds`` (nothing written)."""
    from stepcache.calibrate import CalibrationRun, build_profile, measure

    from . import calibration_target
    target, generate, meta = calibration_target(SimpleNamespace(steps=steps, guidance=guidance), demo=demo)
    run = CalibrationRun(prompts, seeds, steps, meta)
    runner, adapter, model = measure(target, run, generate, progress=progress)
    return build_profile(runner, adapter, model, run, name, None, description)


def calibrate(weights=None, out=PROFILE, n: int = 8, steps: int = STEPS, guidance: float = GUIDANCE,
              plot: Path | None = None, do_sweep: bool = True, progress: bool = True) -> dict:
    from stepcache.calibrate import describe_calibration
    from stepcache.calibration_io import write_profile

    demo = DemoPipeline(load(weights))
    prompts = calibration_prompts(n)
    description = ("stepcache's demo model (diffusers WanTransformer3DModel, 6 layers, 8 frames of 32x32), "
                   "calibrated on itself by stepcache.wan21.demo.calibrate_demo")
    data = calibration_profile(demo, prompts, [CALIBRATION_SEED], steps, guidance, PROFILE_NAME, description,
                               progress)
    data["model"]["task"] = "t2v"
    out = Path(out)
    profile = write_profile(out, data)
    report: dict = {"prompts": prompts, "seed": CALIBRATION_SEED}
    if do_sweep:
        sweeps = sweep(demo, out, prompts, CALIBRATION_SEED, steps, guidance, progress, sweeps_for(data, steps))
        report["sweeps"] = sweeps
        for method, rows in sweeps.items():
            presets = choose_presets(rows)
            section = data[method]
            section["tool_presets"] = section.get("presets")
            section["presets"] = presets
            section.pop("preset_notes", None)
            section["presets_source"] = (
                f"stepcache.wan21.demo.calibrate_demo: the best mean PSNR against uncached among the swept settings "
                f"reusing at least {PRESET_TARGETS} of the passes on the calibration prompts (calibration.json)")
            if method == "easycache":
                section.update(presets["medium"])
            else:
                section["defaults"] = {**section.get("defaults", {}), **presets["medium"]}
            chosen = {name: next(r for r in rows if r["params"] == p) for name, p in presets.items()}
            print(f"{method}: " + "; ".join(f"{name} {p['params']} reuse {p['reuse']:.0%} PSNR {p['psnr']:.1f} dB"
                                             for name, p in chosen.items()))
        profile = write_profile(out, data)
    write_json(out.parent / "calibration.json", report)
    print(describe_calibration(profile))
    if plot:
        print(f"plot: {plot_ratios(data, Path(plot))}")
    return data


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stepcache.wan21.demo.calibrate_demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="model file (default: the shipped one)")
    p.add_argument("--out", default=str(PROFILE), help="profile file to write")
    p.add_argument("--n", type=int_at_least(1), default=8, help="calibration prompts (default 8)")
    p.add_argument("--steps", type=int_at_least(2), default=STEPS, help=f"denoising steps (default {STEPS})")
    p.add_argument("--guidance", type=float_at_least(1.0), default=GUIDANCE, help=f"CFG scale (default {GUIDANCE})")
    p.add_argument("--plot", default=str(Path(__file__).parent / "assets" / "magcache_ratios.png"))
    p.add_argument("--no-sweep", action="store_true", help="skip the preset sweep")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch CPU threads (default 1)")
    a = p.parse_args(argv)

    def body():
        check_output_file(a.out, "--out", (".json",))
        if a.plot:
            check_output_file(a.plot, "--plot", (".png",))
        torch.set_num_threads(a.threads)
        calibrate(a.weights, a.out, a.n, a.steps, a.guidance, Path(a.plot) if a.plot else None, not a.no_sweep)
    return run_cli(body, prog="python -m stepcache.wan21.demo.calibrate_demo")


if __name__ == "__main__":
    sys.exit(main())
