"""Calibrate the demo model's profile: ``python -m stepcache.wan21.demo.calibrate_demo [--weights F] [--out P]``.

Measured on the trained model, uncached, through the real ``WanPipeline``, on calibration prompt-seed pairs
that neither the demo nor the prompt-match check uses:

* **MagCache** ratios with the project's calibration tool (:class:`stepcache.calibration_io.ResidualRatioRecorder`:
  per CFG branch and step, the mean over tokens of ``||r_t|| / ||r_{t-1}||`` with ``r = h_L - h0`` the
  block-stack residual), averaged over the calibration videos, written with
  :func:`stepcache.calibration_io.magcache_profile_data` in the reference layout (padding 1.0, cond/uncond
  interleaved) at the demo's step count.
* **TeaCache** polynomial: ``numpy.polyfit`` of degree 4 of the relative L1 change of the transformer output
  against the relative L1 change of its signal, the timestep embedding ``temb`` (what the Wan adapter feeds the
  policy), between successive passes of a branch, pooled over branches, videos and three step counts (the
  signal depends on the step only, so several step counts spread it). The generic calibration tool has no
  TeaCache fit yet; when it has, this fit should move there.
* **EasyCache**: the published Wan2.1 rule with a warm-up scaled to the demo's step count.
* **Presets** ``slow``, ``medium`` and ``fast`` per method: the best-PSNR setting (against the uncached video)
  among those that reuse at least 20 %, 35 % and 50 % of the passes on the calibration pairs.

It writes the profile (default: ``weights/wan2.1-demo-tiny.json`` in this package), ``calibration.json``
with every measured curve and sweep beside it, and a plot of the magnitude ratios beside the published Wan2.1
ones.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from .model import GUIDANCE, PROFILE, STEPS, DemoPipeline, load
from .quality import psnr_ssim
from .scenes import ALL_SCENES

CALIBRATION_SEED = 50_000
PROFILE_NAME = "wan2.1-demo-tiny"
PRESET_TARGETS = {"slow": 0.20, "medium": 0.35, "fast": 0.50}
TEACACHE_STEP_COUNTS = (15, 30, 50)
SWEEPS = {
    "magcache": [dict(thresh=t, K=k, retention_ratio=0.2) for k in (2, 3, 4)
                 for t in (0.01, 0.02, 0.03, 0.04, 0.06, 0.08, 0.12, 0.16, 0.24)],
    "teacache": [dict(thresh=t) for t in (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)],
    "easycache": [dict(thresh=t, warmup_steps=w) for w in (3, 6)
                  for t in (0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4)],
}


def calibration_pairs(n: int) -> list[tuple[str, int]]:
    order = torch.randperm(len(ALL_SCENES), generator=torch.Generator().manual_seed(CALIBRATION_SEED)).tolist()
    return [(ALL_SCENES[order[i % len(order)]].prompt, CALIBRATION_SEED + i) for i in range(n)]


@contextlib.contextmanager
def branch_names(transformer):
    """Name each transformer call after the ``cache_context`` the pipeline wraps it in ("cond"/"uncond")."""
    current = {"name": "cond"}
    original = transformer.cache_context

    @contextlib.contextmanager
    def cache_context(name, **kwargs):
        current["name"] = name
        with original(name, **kwargs):
            yield

    transformer.cache_context = cache_context
    try:
        yield lambda *_: current["name"]
    finally:
        del transformer.cache_context


def measure_magcache(demo: DemoPipeline, pairs, steps: int, guidance: float) -> dict:
    """Per branch and step: mean over videos of the recorder's ratio, std and cosine distance."""
    from stepcache.calibration_io import RatioRecord, ResidualRatioRecorder
    from stepcache.patching import first_arg_io
    model = demo.pipe.transformer
    per_video: dict[str, list[list]] = {}
    with branch_names(model) as branch_of:
        recorder = ResidualRatioRecorder(model, model.blocks, first_arg_io("hidden_states"), branch_of).install()
        try:
            for prompt, seed in pairs:
                recorder.start_generation()
                demo.latents([prompt], [seed], steps=steps, guidance=guidance)
                for branch in recorder.order:
                    per_video.setdefault(branch, []).append(recorder.ratios(branch))
        finally:
            recorder.remove()
    averaged = {}
    for branch, videos in per_video.items():
        averaged[branch] = [RatioRecord(recs[0].step, float(np.mean([r.ratio for r in recs])),
                                        float(np.mean([r.std for r in recs])),
                                        float(np.mean([r.cos_distance for r in recs])))
                            for recs in zip(*videos)]
    spread = {b: [float(np.std([r.ratio for r in recs])) for recs in zip(*v)] for b, v in per_video.items()}
    return {"records": averaged, "across_videos_std": spread, "branches": list(per_video)}


def measure_teacache(demo: DemoPipeline, pairs, step_counts, guidance: float) -> dict:
    """(signal change, output change) pairs between successive passes of each branch."""
    model = demo.pipe.transformer
    xs, ys, steps_of = [], [], []
    state: dict[str, dict] = {}
    temb: dict[str, torch.Tensor] = {}

    def on_embed(module, args, outputs):
        temb["now"] = outputs[0].detach().float()

    def rel_l1(a, b):
        return float((a - b).abs().mean() / b.abs().mean())

    with branch_names(model) as branch_of:
        def on_output(module, args, kwargs, output):
            out = (output[0] if isinstance(output, tuple) else output.sample).detach().float()
            s = state.setdefault(branch_of(), {})
            if "temb" in s:
                xs.append(rel_l1(temb["now"], s["temb"]))
                ys.append(rel_l1(out, s["out"]))
                steps_of.append(s["count"])
            s.update(temb=temb["now"], out=out, count=s.get("count", 0) + 1)

        handles = [model.condition_embedder.register_forward_hook(on_embed),
                   model.register_forward_hook(on_output, with_kwargs=True)]
        try:
            for steps in step_counts:
                for prompt, seed in pairs:
                    state.clear()
                    demo.latents([prompt], [seed], steps=steps, guidance=guidance)
        finally:
            for h in handles:
                h.remove()
    coefficients = np.polyfit(np.array(xs), np.array(ys), 4)
    return {"x": xs, "y": ys, "coefficients": [float(c) for c in coefficients]}


def sweep(demo: DemoPipeline, profile_path, pairs, steps: int, guidance: float, references) -> dict:
    import stepcache
    results = {}
    for method, grid in SWEEPS.items():
        rows = []
        for params in grid:
            stepcache.enable(demo.pipe, method, profile=str(profile_path), **params)
            computed = total = 0
            psnrs, ssims = [], []
            for (prompt, seed), ref in zip(pairs, references):
                video = demo([prompt], [seed], steps=steps, guidance=guidance)[0]
                c, t = stepcache.stats(demo.pipe).counts()
                computed, total = computed + c, total + t
                p, s = psnr_ssim(ref, video)
                psnrs.append(p)
                ssims.append(s)
            stepcache.disable(demo.pipe)
            rows.append({"params": params, "reuse": 1 - computed / total, "psnr": float(np.mean(psnrs)),
                         "psnr_min": float(np.min(psnrs)), "ssim": float(np.mean(ssims))})
        results[method] = rows
    return results


def choose_presets(rows: list[dict]) -> dict:
    presets = {}
    for name, target in PRESET_TARGETS.items():
        ok = [r for r in rows if r["reuse"] >= target]
        if not ok:
            ok = [max(rows, key=lambda r: r["reuse"])]
        presets[name] = dict(max(ok, key=lambda r: r["psnr"])["params"])
    return presets


def plot_ratios(mag: dict, steps: int, path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from stepcache.profiles import load_profile
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for name, style in (("wan2.1-t2v-1.3b", "-"), ("wan2.1-t2v-14b", "--")):
        prof = load_profile(name)
        for b, branch in enumerate(prof.magcache_branches()[:1]):
            r = prof.magcache_ratios(prof.method("magcache")["steps"], b, "none")
            x = np.arange(1, len(r)) / (len(r) - 1)
            ax.plot(x, r[1:], style, color="grey", label=f"{name} ({branch}, published, {len(r)} steps)")
    colours = {"cond": "tab:blue", "uncond": "tab:orange"}
    for branch, recs in mag["records"].items():
        x = np.array([r.step for r in recs]) / (steps - 1)
        y = np.array([r.ratio for r in recs])
        sd = np.array(mag["across_videos_std"][branch])
        ax.plot(x, y, "o-", ms=3, color=colours.get(branch), label=f"demo model ({branch}, {steps} steps)")
        ax.fill_between(x, y - sd, y + sd, color=colours.get(branch), alpha=0.15)
    ax.set_xlabel("denoising progress (step / last step)")
    ax.set_ylabel("magnitude ratio ||r_t|| / ||r_t-1||")
    ax.set_title("MagCache magnitude ratios: tiny demo model vs Wan2.1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def calibrate(weights=None, out=PROFILE, n: int = 8, steps: int = STEPS, guidance: float = GUIDANCE,
              plot: Path | None = None, do_sweep: bool = True) -> dict:
    from stepcache.calibration_io import calibrated_source, magcache_profile_data, write_profile
    model = load(weights)
    demo = DemoPipeline(model)
    pairs = calibration_pairs(n)
    print(f"calibrating on {n} prompt-seed pairs, {steps} steps, CFG {guidance}")
    mag = measure_magcache(demo, pairs, steps, guidance)
    tea = measure_teacache(demo, pairs[: max(2, n // 2)], TEACACHE_STEP_COUNTS, guidance)
    config = model.transformer.config
    description = ("stepcache's tiny trained demo model (diffusers WanTransformer3DModel, 6 layers, 32x32x8 "
                   "videos), calibrated on itself")
    model_entry = {"family": "wan2.1", "task": "t2v", "resolution": [32, 32],
                   "config": {"num_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
                              "in_channels": config.in_channels},
                   "classes": ["WanTransformer3DModel"]}
    measured_on = {"model": str(model.metadata.get("path")), "pairs": [list(p) for p in pairs], "steps": steps,
                   "guidance": guidance}
    easy_warmup = max(1, round(steps * 10 / 50))   # Wan2.1: 10 of 50 steps
    data = magcache_profile_data(
        name=PROFILE_NAME, description=description, model=model_entry, recorder_or_ratios=mag["records"],
        branches=mag["branches"], steps=steps, source=calibrated_source(where="stepcache.wan21.demo.calibrate_demo"),
        measured_on=measured_on, defaults={"thresh": 0.06, "K": 2, "retention_ratio": 0.2})
    data["teacache"] = {
        "variants": {"default": {"signal": "temb", "coefficients": tea["coefficients"], "warmup_steps": 1,
                                 "force_last": True,
                                 "source": "numpy.polyfit(deg=4) of rel-L1 output change vs rel-L1 temb change, "
                                           f"steps {list(TEACACHE_STEP_COUNTS)}, stepcache.wan21.demo.calibrate_demo"}},
        "defaults": {"thresh": 0.1, "variant": "default"},
    }
    data["easycache"] = {"thresh": 0.05, "warmup_steps": easy_warmup, "force_last": True, "decide_on": "cond",
                         "source": f"published Wan2.1 rule; warm-up {easy_warmup} of {steps} steps (10 of 50 scaled)"}
    out = Path(out)
    write_profile(out, data)
    report = {"magcache": {b: [r.__dict__ for r in recs] for b, recs in mag["records"].items()},
              "magcache_across_videos_std": mag["across_videos_std"], "teacache": tea}
    if do_sweep:
        references = [demo([p], [s], steps=steps, guidance=guidance)[0] for p, s in pairs]
        sweeps = sweep(demo, out, pairs, steps, guidance, references)
        report["sweeps"] = sweeps
        for method, rows in sweeps.items():
            presets = choose_presets(rows)
            data[method]["presets"] = presets
            data[method]["presets_source"] = (
                f"best mean PSNR vs uncached among settings reusing >= {PRESET_TARGETS} of passes on the "
                f"{n} calibration pairs (calibration.json)")
            if method == "easycache":
                data[method].update({k: v for k, v in presets["medium"].items()})
            else:
                data[method]["defaults"] = {**data[method]["defaults"], **presets["medium"]}
            print(f"{method}: " + "; ".join(
                f"{name} {p} -> reuse {next(r for r in rows if r['params'] == p)['reuse']:.0%}, "
                f"PSNR {next(r for r in rows if r['params'] == p)['psnr']:.1f}" for name, p in presets.items()))
        write_profile(out, data)
    (out.parent / "calibration.json").write_text(json.dumps(report, indent=1))
    ratios = {b: " ".join(f"{r.ratio:.3f}" for r in recs) for b, recs in mag["records"].items()}
    for b, text in ratios.items():
        print(f"magnitude ratios ({b}): {text}")
    print(f"teacache coefficients: {tea['coefficients']}")
    if plot:
        print(f"plot: {plot_ratios(mag, steps, Path(plot))}")
    print(f"profile written to {out}")
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepcache.wan21.demo.calibrate_demo",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="model file (default: the shipped one)")
    p.add_argument("--out", default=str(PROFILE), help="profile file to write")
    p.add_argument("--n", type=int, default=8, help="calibration prompt-seed pairs (default 8)")
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--plot", default=str(Path(__file__).parent / "assets" / "magcache_ratios.png"))
    p.add_argument("--no-sweep", action="store_true", help="skip the preset sweep")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    calibrate(a.weights, a.out, a.n, a.steps, a.guidance, Path(a.plot) if a.plot else None, not a.no_sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
