"""`stepcache bench`: stepcache against the fewer-steps floor and the peers, on the demo model, in one run.

One process runs, over a fixed set of prompts and seeds, the uncached baseline, the floors (fewer steps; a
fixed one-in-k pattern), stepcache's three methods calibrated in the session and the peers (diffusers' and
cache-dit's caches), each over a sweep, and reports for every run the passes (and real block work), the
wall-clock speedup against baselines timed just before and after it (median over shuffled rounds), and PSNR,
SSIM and LPIPS against the baseline's video. ``results.jsonl`` makes a run resumable; exit codes: 0 complete,
1 the bench failed, 2 bad input, 3 runs missing (``--budget-minutes``), 130 interrupted.

Design notes: docs/bench.md#against-the-peers-stepcache-bench
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
import uuid
import warnings
from pathlib import Path

from ..errors import InputError
from ..outputs import atomic_path, check_output_dir, write_json
from ..generate import add_size_arguments
from ..timing import add_clock_argument, meter_for
from . import bench_plan

FORMAT = "stepcache-bench/1"
BENCH_SEED = 200_000          # noise seeds used by nothing else (demo calibration 50_000, prompt-match check 100_000)
CALIBRATION_SEED = 250_000    # the bench's own calibration runs
UNTRAINED_SEED = 0
UNTRAINED_LABEL = "UNTRAINED (random weights of the demo architecture: plumbing check, says nothing about quality)"
MODES = {"full": dict(prompts=6, seeds=2, repeats=3, calibration_pairs=8),
         "quick": dict(prompts=3, seeds=1, repeats=1, calibration_pairs=2)}
BASELINE_EVERY = 4            # time the baseline again after this many runs within a round
EXIT_INCOMPLETE = 3           # the report is written but runs are missing (budget reached): run the command again
PEER_FAMILIES = ("diffusers", "cache-dit")


class BenchError(InputError):
    pass


# ------------------------------------------------------------------------------------------------ arguments
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.replace("``", "")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--pipeline", default=None, metavar="DIR_OR_ID",
                        help="benchmark a diffusers pipeline stepcache supports (Wan2.1 T2V and I2V, Wan2.2, "
                             "HunyuanVideo, the demo's saved folder: stepcache demo --save-pipeline DIR; I2V takes "
                             "--prompts FILE.json with a first frame per prompt), as a folder or a Hugging Face Hub "
                             "id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers (fetched into its cache), instead of "
                             "--model; "
                             "with --prompts, --device, --dtype, --height, --width, --frames")
    parser.add_argument("--prompts", default=None,
                        help="--pipeline: a .txt (one per line) or .json prompt file, or 'vbench' (the installed "
                             "VBench list); the first prompts are benchmarked, calibration takes from the end "
                             "(default: the pipeline's own, for the demo folder)")
    add_size_arguments(parser, None)
    parser.add_argument("--model", default="demo", choices=["demo", "demo-experts"],
                        help="the model to benchmark (default: demo); demo-experts: the two-expert demo (Wan2.2 "
                             "A14B's shape), where the published shared-state rule, stepcache's experts='separate', "
                             "fewer steps and diffusers' FirstBlockCache are compared at equal passes "
                             "(docs/wan22.md)")
    parser.add_argument("--low-weights", default=None,
                        help="demo-experts: the low-noise expert's file (default: the one shipped in stepcache)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.4, 0.5, 0.6, 0.7],
                        help="demo-experts: shares of the passes at which methods are compared (default 0.4 0.5 0.6 "
                             "0.7)")
    parser.add_argument("--untrained", action="store_true",
                        help="random weights of the demo architecture (no weight file needed); outputs are "
                             "labelled UNTRAINED")
    parser.add_argument("--weights", default=None, help="demo model file (default: the one shipped in stepcache)")
    parser.add_argument("--quick", action="store_true",
                        help="3 prompts x 1 seed, 2-3 points per sweep, 1 timing round (a few minutes)")
    parser.add_argument("--out", default="stepcache-bench", help="output folder (default: ./stepcache-bench)")
    parser.add_argument("--methods", default="all",
                        help="comma-separated method keys or families (baseline, floor, stepcache, diffusers, "
                             "cache-dit); default all (--list shows them)")
    parser.add_argument("--num-prompts", type=int, default=None, help="prompts (default: 6, quick 3)")
    parser.add_argument("--num-seeds", type=int, default=None, help="seeds per prompt (default: 2, quick 1)")
    parser.add_argument("--first-prompt", type=int, default=0,
                        help="start this far into the fixed prompt order (default 0): a different set of prompts "
                             "and seeds, to check a result on videos its settings were not chosen on")
    parser.add_argument("--steps", type=number_list(int, 2, "an integer"), default=None,
                        help="denoising steps of the baseline (default: the demo's 30; with --pipeline the pipeline's "
                             "own, else 50); a comma-separated list runs one bench per operating point")
    parser.add_argument("--guidance", type=number_list(float, 1.0, "a number"), default=None,
                        help="CFG scale (default: the demo's 2.5, or the pipeline's own); a comma-separated list "
                             "runs one bench per operating point (steps x guidance), each in OUT/steps<S>-guidance<G>")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default: 3, quick 1)")
    parser.add_argument("--profile", dest="profile_file", default=None, metavar="FILE",
                        help="a stepcache profile file for the model, instead of calibrating it in this run")
    parser.add_argument("--calibration-pairs", type=int, default=None,
                        help="prompt-seed pairs for the in-session calibrations (default: 8, quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    add_clock_argument(parser)
    parser.add_argument("--lpips-weights", default=None, help="AlexNet backbone file for LPIPS (see compare)")
    parser.add_argument("--lpips-heads", default=None, help="LPIPS head file (see compare)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="stop starting new runs after this long, write the report (INCOMPLETE) and exit "
                             "with code 3; run the same command again to resume")
    parser.add_argument("--docs", default=None, metavar="DIR",
                        help="also write the table and plot to DIR/bench-<date>-<name of --out>.md/.png")
    parser.add_argument("--list", action="store_true", help="list the methods and their sweeps, then exit")


def _mode(args) -> str:
    return "quick" if args.quick else "full"


def _command(args) -> str:
    parts = ["stepcache", "bench"]
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    base = vars(defaults.parse_args([]))
    flags = {a.dest: a.option_strings[0] for a in defaults._actions if a.option_strings}  # --profile: profile_file
    for key, value in vars(args).items():
        if key.startswith("_") or key in ("command", "list") or key not in base or value == base[key]:
            continue
        flag = flags[key]
        parts += [flag] if value is True else [flag, str(value)]
    return " ".join(parts)


def number_list(kind, low, what: str):
    """argparse type: one number or a comma-separated list of distinct numbers, each >= ``low``."""
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what} or a comma-separated list of them") from None
        bad = [v for v in values if not math.isfinite(v) or v < low]
        if not values or bad or len(set(values)) != len(values):
            raise argparse.ArgumentTypeError(f"{text!r}: give distinct values, each {what} >= {low:g}")
        return values
    parse.__name__ = f"{what} list"
    return parse


def operating_points(args) -> list[tuple]:
    """(steps, guidance) pairs the command asks for, None where it leaves one to the default."""
    return [(s, g) for s in (args.steps or [None]) for g in (args.guidance or [None])]


def point_folder(steps, guidance) -> str:
    return f"steps{steps if steps is not None else 'default'}-guidance{f'{guidance:g}' if guidance is not None else 'default'}"


def run_operating_points(args, points: list[tuple]) -> int:
    """One bench per operating point, each in its own folder under --out (each resumable), then
    OUT/operating-points.md with every point's verdict: a ranking holds at its operating point only."""
    import copy
    from ..outputs import write_text
    if args.model == "demo-experts" and not args.pipeline:
        raise BenchError("--steps and --guidance take one value each with --model demo-experts")
    out = check_output_dir(args.out, "--out")
    codes, parts = [], ["# The bench at each operating point", "",
                        "A method's ranking is a fact about one operating point (steps, guidance); each section is "
                        "one bench run (its folder holds the whole report).", ""]
    for steps, guidance in points:
        sub = copy.copy(args)
        sub.steps, sub.guidance = [steps] if steps else None, [guidance] if guidance is not None else None
        sub.out, sub.docs = str(out / point_folder(steps, guidance)), None
        print(f"=== operating point: steps {steps or 'default'}, guidance "
              f"{guidance if guidance is not None else 'default'} -> {sub.out}", flush=True)
        codes.append(run(sub))
        verdict = Path(sub.out) / "verdict.md"
        parts += [f"## {point_folder(steps, guidance)}", "",
                  verdict.read_text() if verdict.exists() else "(no report: the run failed)", ""]
    write_text(out / "operating-points.md", "\n".join(parts))
    print(f"wrote {out / 'operating-points.md'}")
    return 1 if 1 in codes else (EXIT_INCOMPLETE if EXIT_INCOMPLETE in codes else max(codes))


# ------------------------------------------------------------------------------------------- model, prompts
def bench_pairs(num_prompts: int, num_seeds: int, first: int = 0, prompts: list[str] | None = None
                ) -> list[tuple[str, int]]:
    """Prompts in a fixed order (default: the demo's, a fixed shuffle of its vocabulary), and noise seeds no other
    part of stepcache uses; ``first`` skips that many prompts (their seeds move along, so no pair repeats)."""
    from stepcache.wan21.demo.scenes import bench_prompts
    if first < 0:
        raise BenchError(f"--first-prompt {first} must be >= 0")
    prompts = prompts or bench_prompts()
    return [(prompts[i % len(prompts)], BENCH_SEED + 1000 * i + j) for i in range(first, first + num_prompts)
            for j in range(num_seeds)]


def calibration_pairs(n: int, prompts: list[str] | None = None) -> list[tuple[str, int]]:
    """Pairs for the in-session calibrations: prompts from the far end of the same order (so never a benchmark
    prompt while both fit), with their own noise seeds."""
    from stepcache.wan21.demo.scenes import bench_prompts
    prompts = prompts or bench_prompts()
    return [(prompts[-1 - (i % len(prompts))], CALIBRATION_SEED + i) for i in range(n)]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(args) -> dict:
    if args.untrained:
        return {"model": "demo-architecture", "weights": "untrained", "seed": UNTRAINED_SEED}
    from stepcache.wan21.demo.model import WEIGHTS, WeightsMissing
    path = Path(args.weights) if args.weights else WEIGHTS
    if not path.exists():
        raise WeightsMissing(
            f"no demo model weights at {path}; train them with `python -m stepcache.wan21.demo.train --out DIR` "
            f"and copy DIR/demo_wan.safetensors there, or pass --weights FILE (--untrained checks the plumbing "
            f"on random weights)")
    return {"model": "demo", "weights": str(path.resolve()), "sha256": _sha256(path)}


def build_demo(args):
    """(DemoPipeline, description) for the trained demo model, or its architecture with random weights."""
    import torch
    from stepcache.wan21.demo.model import DemoModel, DemoPipeline, build_transformer, load
    if not args.untrained:
        model = load(args.weights)
        info = json.loads(model.metadata.get("info", "{}") or "{}")
        return DemoPipeline(model), {"weights": model.metadata.get("path"), "trained_steps": info.get("trained_steps")}
    from stepcache.wan21.demo import codec as codec_mod
    from stepcache.wan21.demo.scenes import make_batch
    from stepcache.wan21.demo.text import WordEncoder, WordTokenizer
    from stepcache.wan21.demo.train import DEFAULTS
    # the codec as training builds it (with its clock channel when training uses one), on fewer clips
    options = {"clock": DEFAULTS["clock"]} if "clock" in DEFAULTS else {}
    codec = codec_mod.fit(make_batch(256, torch.Generator().manual_seed(UNTRAINED_SEED + 7))[1], **options)
    transformer = build_transformer(seed=UNTRAINED_SEED).eval().requires_grad_(False)
    tokenizer = WordTokenizer()
    torch.manual_seed(UNTRAINED_SEED + 1)
    text = WordEncoder(len(tokenizer)).eval().requires_grad_(False)
    model = DemoModel(transformer, text, tokenizer, codec, {"path": None, "untrained": "true"})
    return DemoPipeline(model), {"weights": None, "untrained_seed": UNTRAINED_SEED, "label": UNTRAINED_LABEL}


# ---------------------------------------------------------------------------------------------- measuring
def block_stack(transformer) -> list:
    """The transformer's blocks in call order, as its adapter knows them."""
    from stepcache.api import adapter_for
    return adapter_for(transformer).blocks(transformer)


def denoisers(pipe) -> list:
    """The models a pipeline denoises with, as stepcache installs on them: its transformer, and a two-expert
    pipeline's second expert."""
    from stepcache.api import targets_of
    return targets_of(pipe.transformer, pipe)[0]


def expert_steps(pipe, steps: int) -> list[int]:
    """How many of ``steps`` each denoiser runs: all of them for one model; for two experts, up to the switch the
    pipeline's loop takes (read off its scheduler, as stepcache does) and the rest."""
    from stepcache.api import targets_of
    models, switch_step = targets_of(pipe.transformer, pipe)
    if switch_step is None:
        return [steps]
    pipe.scheduler.set_timesteps(steps)
    switch = switch_step()
    return [switch, steps - switch]


class BlockWork:
    """Real work inside the block stack: multiply-adds of every ``nn.Linear`` of its blocks (its adapter's) that
    runs, and the transformer calls. Cache hooks replace ``forward`` of blocks or attention modules, so Linear
    layers run only when their block or module really computes (for every method alike: stepcache, diffusers
    hooks and cache-dit all call the original modules when they compute)."""

    def __init__(self, *transformers):
        import torch
        self.handles = []
        for transformer in transformers:   # both experts of a two-expert pipeline
            self.handles.append(transformer.register_forward_pre_hook(self._on_call))
            for block in block_stack(transformer):
                for module in block.modules():
                    if isinstance(module, torch.nn.Linear):
                        self.handles.append(module.register_forward_pre_hook(self._on_linear))
        self.reset()

    def reset(self):
        self.calls = 0
        self.macs = 0
        self.linears = 0

    def _on_call(self, module, args):
        self.calls += 1

    def _on_linear(self, module, args):
        self.linears += 1
        self.macs += int(args[0].numel()) * module.out_features

    def remove(self):
        for h in self.handles:
            h.remove()


def max_peak(peaks: list) -> int | None:
    """The largest peak memory of a run's videos (None where the meter reads none: the CPU)."""
    known = [p for p in peaks if p is not None]
    return max(known) if known else None


def prompt_reader(settings: dict):
    """``reads(prompt, video) -> bool`` when the benchmarked model is the trained demo (itself or its saved pipeline
    folder), whose videos show one object of a colour moving in a direction that can be read back; else None (a
    real model's videos cannot be read that way, and the untrained demo matches nothing)."""
    demo = settings.get("model") == "demo" or settings.get("pipeline_class") == "StepcacheDemoPipeline"
    if not demo:
        return None
    from stepcache.wan21.demo.scenes import parse_prompt, read_back
    return lambda prompt, video: read_back(video).matches(parse_prompt(prompt))


def to_uint8(video):
    return (video * 255).round().to(dtype=__import__("torch").uint8)


def quality(reference, video, lpips_scorer=None) -> dict:
    """PSNR (frame mean, as TeaCache/MagCache; whole video, as EasyCache), SSIM and LPIPS of uint8 (T, H, W, 3)."""
    from stepcache.eval import metrics
    sq = metrics.frame_squared_errors(reference, video)
    values = reference[0].numel() * 255.0 ** 2
    psnr_frames = [metrics.psnr_from_mse(int(e) / values) for e in sq.tolist()]
    ref = reference.permute(0, 3, 1, 2).double() / 255
    gen = video.permute(0, 3, 1, 2).double() / 255
    out = {"psnr": sum(psnr_frames) / len(psnr_frames),
           "psnr_video": metrics.psnr_from_mse(int(sq.sum()) / (values * len(psnr_frames))),
           "psnr_frame_min": min(psnr_frames),
           "ssim": float(metrics.ssim_per_frame(ref, gen).mean()), "lpips": None}
    if lpips_scorer is not None:
        import torch
        with torch.no_grad():
            out["lpips"] = float(lpips_scorer(ref.float() * 2 - 1, gen.float() * 2 - 1).mean())
    return out


class Calibrations:
    """Everything calibrated in the session, made once, kept in ``OUT/calibration/`` so a resumed run uses the
    same tables: stepcache's profile (``stepcache calibrate``'s machinery) and diffusers MagCache's ratios
    (diffusers' own ``calibrate=True`` pass), both on the calibration prompt-seed pairs, which the benchmark's
    pairs do not include."""

    BASE_PROFILE = "wan2.1-t2v-1.3b"   # its warm-ups, CFG rules and MagCache presets carry over

    def __init__(self, demo, folder: Path, steps: int, guidance: float, pairs: int, profile_file: str | None,
                 prompts: list[str] | None = None):
        self.demo, self.folder, self.steps, self.guidance = demo, folder, steps, guidance
        self.n_pairs = pairs
        self.prompts = prompts
        self.profile_file = profile_file
        self._profile = None
        self._mag = None
        self.easycache_warmup = max(1, round(steps * 10 / 50))   # Wan2.1's 10 of 50 steps, scaled

    def pairs(self):
        return calibration_pairs(self.n_pairs, self.prompts)

    def _generate(self, prompt, seed):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.demo.latents([prompt], [seed], steps=self.steps, guidance=self.guidance)

    @property
    def profile(self):
        if self._profile is None:
            self._profile = self._stepcache_profile()
        return self._profile

    @property
    def fixed_profile(self):
        from .bench_peers import flat_ratio_profile
        return flat_ratio_profile(self.profile)

    def _stepcache_profile(self):
        from stepcache.calibration_io import write_profile
        from stepcache.profiles import Profile, load_profile
        if self.profile_file:
            return load_profile(self.profile_file)
        path = self.folder / "stepcache-profile.json"
        if path.exists():
            return load_profile(str(path))
        from stepcache.calibrate import CalibrationRun, build_profile, measure
        pairs = self.pairs()
        print(f"calibrating stepcache on {len(pairs)} calibration prompt-seed pairs ({self.steps} steps)", flush=True)
        base = self._base_profile()
        if base is not None and base.has("easycache"):
            data = json.loads(json.dumps(base.data))
            data["easycache"]["warmup_steps"] = self.easycache_warmup
            base = Profile(base.name, data)
        seeds = dict(pairs)
        meta = (self.demo.calibration_meta() if hasattr(self.demo, "calibration_meta")
                else {"resolution": [32, 32], "frames": 8})
        # one generation per (prompt, seed) pair: each prompt runs once, with its own seed
        run = CalibrationRun([p for p, _ in pairs], [pairs[0][1]], self.steps,
                             {**meta, "guidance": self.guidance, "pairs": [list(p) for p in pairs]})
        runner, adapter, model = measure(self.demo.pipe, run, lambda p, s: self._generate(p, seeds[p]),
                                         progress=False)
        data = build_profile(runner, adapter, model, run, "bench-calibrated", base,
                             description="the benchmarked model, calibrated by stepcache bench")
        return write_profile(path, data)

    def _base_profile(self):
        """Whose warm-ups, CFG rules and published presets the calibrated profile keeps: a pipeline folder's own
        profile, else the shipped profile for its configuration (at its size), else (the demo model)
        Wan2.1-1.3B's."""
        from stepcache.profiles import FOLDER_PROFILE, choose_by_resolution, load_profile
        folder = getattr(self.demo, "folder", None)
        if folder is None:
            return load_profile(self.BASE_PROFILE)
        if (folder / FOLDER_PROFILE).is_file():
            return load_profile(str(folder / FOLDER_PROFILE))
        found = self.demo.shipped_profiles()
        return choose_by_resolution(found, self.demo.height, self.demo.width, "magcache")[0] if found else None

    def mag_ratios(self, expert: int = 0) -> list[float]:
        """diffusers MagCache's table for one denoiser (a two-expert pipeline has one per expert)."""
        if self._mag is None:
            self._mag = self._diffusers_ratios()
        return self._mag["experts"][expert] if "experts" in self._mag else self._mag["ratios"]

    @property
    def mag_ratio_source(self) -> str:
        self.mag_ratios()
        return self._mag["source"]

    def _diffusers_ratios(self) -> dict:
        """diffusers' own ``MagCacheConfig(calibrate=True)`` tables on the calibration pairs (the mean over pairs and
        CFG contexts), one per denoiser, each calibrated over the steps that denoiser runs."""
        import ast
        import contextlib
        import io
        path = self.folder / "diffusers-magcache.json"
        if path.exists():
            return json.loads(path.read_text())
        from diffusers import MagCacheConfig
        models = denoisers(self.demo.pipe)
        own = expert_steps(self.demo.pipe, self.steps)
        pairs = self.pairs()
        print(f"calibrating diffusers MagCache (calibrate=True) on {len(pairs)} pairs", flush=True)
        lists: list[list[list[float]]] = [[] for _ in models]
        for prompt, seed in pairs:
            for model, steps in zip(models, own):
                model.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
            buffer = io.StringIO()
            try:
                with contextlib.redirect_stdout(buffer):
                    self._generate(prompt, seed)
            finally:
                for model in models:
                    model.disable_cache()
            found = [ast.literal_eval(line) for line in buffer.getvalue().splitlines()
                     if line.startswith("[") and not line.startswith("[MagCache")]
            if not found:
                raise BenchError("diffusers MagCache calibration printed no ratios")
            for table in found:   # each expert's table has that expert's length (they differ, checked below)
                lists[own.index(len(table)) if len(table) in own else 0].append(table)
        if len(models) > 1 and (own[0] == own[1] or not all(lists)):
            raise BenchError(f"diffusers' MagCache calibration did not give one table per expert ({own} steps)")
        means = [[float(sum(col) / len(col)) for col in zip(*tables)] for tables in lists]
        data = {"ratios": means[0], "lists": lists[0] if len(models) == 1 else lists,
                "source": f"mean of {sum(map(len, lists))} printed tables: {len(pairs)} calibration runs x "
                          f"{sum(map(len, lists)) // max(len(pairs), 1)} cache contexts"}
        if len(models) > 1:
            data["experts"] = means
            data["source"] += f", one table per expert ({own[0]} and {own[1]} steps)"
        write_json(path, data)
        return data

    def summary(self) -> dict:
        """What was calibrated (in this session or an earlier one of the same folder)."""
        from stepcache.profiles import load_profile
        if self._profile is None and (self.folder / "stepcache-profile.json").exists() and not self.profile_file:
            self._profile = load_profile(str(self.folder / "stepcache-profile.json"))
        if self._mag is None and (self.folder / "diffusers-magcache.json").exists():
            self._mag = json.loads((self.folder / "diffusers-magcache.json").read_text())
        out = {}
        if self._profile is not None:
            prof = self._profile
            out["stepcache_profile"] = {
                "name": prof.name, "path": str(prof.path) if prof.path else None,
                "teacache_presets": prof.data.get("teacache", {}).get("presets"),
                "easycache_presets": prof.data.get("easycache", {}).get("presets"),
                "easycache_warmup_steps": prof.data.get("easycache", {}).get("warmup_steps"),
                "magcache_presets": prof.data.get("magcache", {}).get("presets")}
        if self._mag is not None:
            out["diffusers_magcache"] = {"ratios": self._mag["ratios"], "source": self._mag["source"],
                                         **({"experts": self._mag["experts"]} if "experts" in self._mag else {})}
        return out


# ---------------------------------------------------------------------------------------------- the store
def read_json(path: Path) -> dict:
    """A JSON object the bench wrote into its folder, or BenchError naming the file and what to do."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f": line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise BenchError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}{where}): it was cut short or "
                         f"edited; restore it, or delete the folder {path.parent} to start over, or use another "
                         f"--out folder") from None
    if not isinstance(data, dict):
        raise BenchError(f"{path} holds a JSON {type(data).__name__}, not the bench's record; delete the folder "
                         f"{path.parent} to start over, or use another --out folder")
    return data


class Store:
    """``settings.json`` (what the folder's results mean) and ``results.jsonl`` (one line per finished step).

    A step's line is written with one ``write`` call, so a Ctrl-C (raised between Python calls) never splits it;
    a kill or a power cut can still leave its last line cut, and :meth:`open` drops that line (the step is
    redone) and truncates the file to its last whole line, so the next record never lands on the cut one."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.settings_path = self.folder / "settings.json"
        self.results_path = self.folder / "results.jsonl"

    def open(self, settings: dict) -> None:
        if self.settings_path.exists():
            existing = read_json(self.settings_path)
            # A file's content names it, not where it lies (a copied folder, another checkout).
            if existing.get("sha256") and existing.get("sha256") == settings.get("sha256"):
                existing["weights"] = settings.get("weights")
            mine, theirs = existing.get("stepcache_profile"), settings.get("stepcache_profile")
            if isinstance(mine, dict) and isinstance(theirs, dict) and mine.get("sha256") == theirs.get("sha256"):
                existing["stepcache_profile"] = theirs
            added = [r for r in settings["runs"] if r not in existing.get("runs", [])]
            grows = (added and set(existing.get("runs", [])) <= set(settings["runs"])
                     and {**existing, "runs": settings["runs"]} == settings)
            if not grows and existing != settings:
                keys = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
                raise BenchError(
                    f"{self.folder} holds a benchmark made with other settings (differing: {', '.join(keys)}); "
                    f"use another --out folder, or delete this one to start over")
            self.repair()
            if grows:
                # Same benchmark, more runs (a method or sweep point added later): what was measured stays,
                # the new runs are scored and timed against baselines timed in their own process.
                print(f"adding {len(added)} run(s) to the benchmark in {self.folder}: {', '.join(added)}", flush=True)
                write_json(self.settings_path, settings)
        elif self.results_path.exists():
            raise BenchError(f"{self.folder} has results but no settings.json; use another --out folder")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json(self.settings_path, settings)

    def _lines(self) -> tuple[list[dict], int]:
        """The records, and the length in bytes of the whole lines that hold them. A last line without its newline
        that is not a whole record was cut by a kill: it is left out. Any other line that is not a record is
        refused with its line number: dropping it would silently drop a measurement."""
        if not self.results_path.exists():
            return [], 0
        data = self.results_path.read_bytes()
        records, end = [], 0
        for number, raw in enumerate(data.splitlines(keepends=True), start=1):
            complete = raw.endswith(b"\n")
            if not raw.strip():
                end += len(raw) if complete else 0
                continue
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if not complete and not isinstance(record, dict):
                break
            if not isinstance(record, dict):
                raise BenchError(
                    f"{self.results_path}, line {number}: not a whole record ({raw[:60]!r}...): a cut line that a "
                    f"later record was written onto (earlier versions of the bench did that), or an edit; delete "
                    f"that line (its steps are then redone) or use another --out folder")
            records.append(record)
            end += len(raw)
        return records, end

    def repair(self) -> None:
        """Cut the file back to its last whole line, saying what was dropped, and end it with a newline."""
        if not self.results_path.exists():
            return
        _, end = self._lines()
        size = self.results_path.stat().st_size
        with open(self.results_path, "r+b") as f:
            if end < size:
                f.seek(end)
                dropped = f.read()
                print(f"{self.results_path}: dropped a cut last line ({len(dropped)} bytes, "
                      f"{dropped[:40]!r}...: a run was stopped while writing it); that step is redone", flush=True)
                f.truncate(end)
            elif end:
                f.seek(end - 1)
                if f.read(1) != b"\n":   # a whole last record without its newline
                    f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> list[dict]:
        return self._lines()[0]

    def append(self, record: dict) -> None:
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.results_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            if os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
                line = b"\n" + line   # never continue a line that someone else left open
            written = os.write(fd, line)   # one call: a Ctrl-C lands before or after it, never inside
            while written < len(line):
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------- the bench
def load_reference(path: Path) -> dict:
    """The baseline's latents saved in the folder, read as plain tensors only: a folder can come from anywhere,
    and a pickle in it would run code on loading (the default of torch.load before torch 2.6)."""
    import torch
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything but tensors and containers, RuntimeError for a bad zip
        raise BenchError(f"{path}: not a file of plain tensors, so it is not loaded ({str(exc).splitlines()[0]}); "
                         f"delete it and run the same command again to redo the baseline") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("latents"), torch.Tensor):
        raise BenchError(f"{path}: holds no baseline latents; delete it and run the same command again to redo the "
                         f"baseline")
    return saved


class Run:
    def __init__(self, method, params: dict):
        from .bench_peers import run_id
        self.method, self.params = method, params
        self.id = run_id(method.key, params)


def plan_runs(methods, quick: bool, steps: int) -> list[Run]:
    runs = []
    for m in methods:
        runs += [Run(m, p) for p in m.grid(quick, steps)]
    return runs


def select_methods(spec: str, quick: bool, two_experts: bool = False):
    """The methods ``--methods`` names (keys or families); the expert-rule variants only on a two-expert
    pipeline."""
    from .bench_peers import all_methods
    methods = [m for m in all_methods() if two_experts or not m.two_experts_only]
    if spec == "all":
        chosen = [m for m in methods if not (quick and m.full_only)]
    else:
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
        known = {m.key for m in methods} | {m.family for m in methods}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise BenchError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        # a family brings its exploratory variants in full mode only; a key brings its method always
        chosen = [m for m in methods if m.key in wanted or (m.family in wanted and not (quick and m.full_only))]
    if not any(m.key == "baseline" for m in chosen):
        chosen.insert(0, methods[0])
    return chosen


class Bench:
    def __init__(self, args, store: Store, settings: dict, runs: list[Run], demo, model_info: dict):
        import torch
        from .bench_peers import Context
        self.args, self.store, self.settings, self.runs = args, store, settings, runs
        self.demo = demo
        self.model_info = model_info
        self.steps, self.guidance = settings["steps"], settings["guidance"]
        self.pairs = [tuple(p) for p in settings["pairs"]]
        self.calibrations = Calibrations(demo, store.folder / "calibration", self.steps, self.guidance,
                                         settings["calibration_pairs"], args.profile_file, settings.get("prompts"))
        self.ctx = Context(demo, self.steps, self.calibrations)
        self.pipe_class = type(demo.pipe) if demo is not None else None
        self.meter = meter_for(settings.get("device", "cpu"), settings["clock"])
        self.session = uuid.uuid4().hex[:8]
        self.started = time.perf_counter()
        self.stopped = False
        self.torch = torch
        self.lpips = None
        self.lpips_info = {"status": "skipped", "reason": "not set up"}
        self.reads_prompt = prompt_reader(settings)

    def scored(self, prompt, reference, video) -> dict:
        out = quality(reference, video, self.lpips)
        if self.reads_prompt is not None:
            out["match"] = self.reads_prompt(prompt, video)
        return out

    # --- small helpers -------------------------------------------------------------------------------------
    def over_budget(self) -> bool:
        budget = self.args.budget_minutes
        if budget is not None and time.perf_counter() - self.started > budget * 60:
            if not self.stopped:
                print(f"budget of {budget} min reached: stopping; run the same command again to resume", flush=True)
            self.stopped = True
        return self.stopped

    def latents(self, prompt, seed, steps):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.demo.latents([prompt], [seed], steps=steps, guidance=self.guidance)

    def check_clean(self) -> None:
        """Nothing of the last run may stay on the model: a leftover hook would change every later run."""
        from .bench_peers import tidy
        pipe = self.demo.pipe
        problems = []
        for transformer in denoisers(pipe):
            tidy(transformer)
            if getattr(transformer, "_stepcache", None) is not None:
                problems.append("stepcache still enabled")
            if getattr(transformer, "_cache_config", None) is not None:
                problems.append("a diffusers cache is still enabled")
            for name, module in transformer.named_modules():
                if "_diffusers_hook" in module.__dict__ or "forward" in module.__dict__:
                    problems.append(f"hooks or a replaced forward left on {name or 'the transformer'}")
                    break
        if type(pipe) is not self.pipe_class:
            problems.append(f"pipeline class replaced by {type(pipe)}")
        if problems:
            raise BenchError("a run left state on the model: " + "; ".join(problems))

    def setup_lpips(self) -> None:
        from .lpips import load_lpips
        setup = load_lpips("alex", weights=self.args.lpips_weights, heads=self.args.lpips_heads)
        self.lpips, self.lpips_info = setup.scorer, setup.description

    # --- the reference ---------------------------------------------------------------------------------------
    def reference(self, records) -> None:
        path = self.store.folder / "reference.pt"
        have = any(r.get("kind") == "quality" and r.get("run") == "baseline[]" for r in records)
        if have and path.exists():
            self.ref_latents = load_reference(path)["latents"]
        else:
            print(f"baseline: {len(self.pairs)} videos, {self.steps} steps", flush=True)
            counter = BlockWork(*denoisers(self.demo.pipe))
            latents, per_video = [], []
            try:
                for prompt, seed in self.pairs:
                    counter.reset()
                    latents.append(self.latents(prompt, seed, self.steps).cpu())
                    per_video.append({"prompt": prompt, "seed": seed, "calls": counter.calls, "macs": counter.macs,
                                      "linears": counter.linears})
            finally:
                counter.remove()
            self.ref_latents = self.torch.cat(latents)
            if self.reads_prompt is not None:
                for entry, video in zip(per_video, self.demo.decode(self.ref_latents)):
                    entry["match"] = self.reads_prompt(entry["prompt"], to_uint8(video))
            with atomic_path(path) as part:
                self.torch.save({"latents": self.ref_latents, "pairs": self.pairs}, part)
            self.store.append({"kind": "quality", "run": "baseline[]", "method": "baseline", "params": {},
                               "status": "ok", "steps": self.steps,
                               "config": {"num_inference_steps": self.steps, "guidance_scale": self.guidance},
                               "per_video": per_video, "session": self.session})
        self.ref_videos = [to_uint8(v) for v in self.demo.decode(self.ref_latents)]
        base = [r for r in self.store.records() if r.get("kind") == "quality" and r["run"] == "baseline[]"][-1]
        self.base_work = [v["macs"] for v in base["per_video"]]

    # --- one run, counted and scored ---------------------------------------------------------------------------
    def quality_run(self, run: Run, index: int, total: int) -> dict:
        method, ctx = run.method, self.ctx
        record = {"kind": "quality", "run": run.id, "method": method.key, "params": run.params,
                  "session": self.session, "version": method.version()}
        # Calibrations and configurations are the bench's own work: a failure there stops the bench instead of
        # being stored as the method's result. Only a peer's own failure on this model is a result.
        record["config"] = method.config(ctx, run.params)
        record["steps"] = method.steps(ctx, run.params)
        print(f"[{index}/{total}] {run.id}  config: {json.dumps(record['config'], default=str)}", flush=True)
        counter = None
        try:
            counter = BlockWork(*ctx.denoisers)
            per_video = []
            method.install(ctx, run.params)
            for (prompt, seed), ref, base in zip(self.pairs, self.ref_videos, self.base_work):
                counter.reset()
                latent = self.latents(prompt, seed, record["steps"])
                extra = method.after_video(ctx)
                video = to_uint8(self.demo.decode(latent))[0]
                per_video.append({"prompt": prompt, "seed": seed, "calls": counter.calls, "macs": counter.macs,
                                  "compute_fraction": counter.macs / base,
                                  **self.scored(prompt, ref, video), **extra})
            record.update(status="ok", per_video=per_video)
        except Exception as exc:  # a peer that crashes on this model: recorded as raised, never hidden
            if method.family not in PEER_FAMILIES:
                raise
            message = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
            record.update(status="error", reason=message)
            print(f"[{index}/{total}] {run.id}  could not run: {message}", flush=True)
        finally:
            try:
                method.remove(ctx)
            finally:
                if counter is not None:
                    counter.remove()
        self.check_clean()
        if record["status"] == "ok":
            pv = record["per_video"]
            frac = sum(v["macs"] for v in pv) / sum(self.base_work)
            print(f"[{index}/{total}] {run.id}  compute {frac:.3f} of the baseline (ideal {1 / frac:.2f}x), "
                  f"PSNR {sum(v['psnr'] for v in pv) / len(pv):.2f} dB", flush=True)
        return record

    # --- timing ------------------------------------------------------------------------------------------------
    def time_run(self, run: Run | None) -> tuple[list[float], list, bool | None]:
        """Seconds and peak device memory (bytes; None on the CPU) of each video, and for the baseline whether it
        reproduced the reference exactly."""
        method = run.method if run is not None else None
        steps = method.steps(self.ctx, run.params) if method else self.steps
        times, peaks, identical = [], [], True if method is None else None
        if method:
            method.install(self.ctx, run.params)
        try:
            for i, (prompt, seed) in enumerate(self.pairs):
                self.meter.start()
                latent = self.latents(prompt, seed, steps)
                seconds, peak = self.meter.stop()
                times.append(seconds)
                peaks.append(peak)
                if method is None:
                    identical = identical and bool(self.torch.equal(latent[0].cpu(), self.ref_latents[i]))
        finally:
            if method:
                method.remove(self.ctx)
        self.check_clean()
        return times, peaks, identical

    def time_baseline(self, round_index: int) -> None:
        times, peaks, identical = self.time_run(None)
        if not identical:
            print("WARNING: the baseline no longer reproduces the reference exactly (another thread count, or a "
                  "run left state behind)", flush=True)
        self.store.append({"kind": "baseline_timing", "round": round_index, "session": self.session,
                           "seconds": sum(times), "per_video": times, "peak_memory": max_peak(peaks),
                           "identical": identical})

    # --- the whole thing ----------------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Warm the model up (the first calls in a process pay one-off kernel set-up) and return the seconds one
        uncached video takes, from the last warm-up call."""
        prompt, seed = self.pairs[0]
        steps = min(self.steps, bench_plan.WARM_UP_STEPS)
        seconds = 0.0
        for _ in range(bench_plan.WARM_UP_CALLS):
            self.meter.start()
            self.latents(prompt, seed, steps)
            seconds = self.meter.stop()[0]
        return seconds * self.steps / steps

    def plan(self, todo: list[Run], seconds_per_video: float, scored_untimed: int) -> bench_plan.Plan:
        """The unscored runs that fit what is left of --budget-minutes (all of them without one), said."""
        calibrated = any((self.store.folder / "calibration").glob("*"))
        fixed = (bench_plan.calibration_cost(self.settings["calibration_pairs"], calibrated)
                 + len(self.pairs) * self.settings["repeats"] * scored_untimed)
        budget = self.args.budget_minutes
        left = None if budget is None else budget * 60 - (time.perf_counter() - self.started)
        plan = bench_plan.fit(todo, self.steps, len(self.pairs), self.settings["repeats"], BASELINE_EVERY, fixed,
                              seconds_per_video, left)
        print(plan.describe(seconds_per_video), flush=True)
        if plan.left_out:
            print(f"budget of {budget:g} min: left out {len(plan.left_out)} of {len(todo)} runs, each method keeping "
                  f"settings spread over its sweep ({bench_plan.left_out_text(plan.left_out)}); run the same "
                  f"command again, with more minutes, to add them", flush=True)
        return plan

    def non_block_share(self) -> None:
        """What a pass costs with every block bypassed, over a full pass: on a model this small the embeddings,
        rope, output head and the pipeline's own work are a real share, and a method that still runs them on a
        reused pass cannot reach its ideal speedup. Once per session, interleaved, median of 3."""
        from stepcache.api import adapter_for
        prompt, seed = self.pairs[0]
        models = denoisers(self.demo.pipe)
        blocks = [b for model in models for b in block_stack(model)]
        io = adapter_for(models[0]).block_io   # what a skipped block returns (HunyuanVideo's: both streams)

        def bypass(*args, **kwargs):
            return io.passthrough(args, kwargs)

        full, rest = [], []
        for _ in range(3):
            self.meter.start()
            self.latents(prompt, seed, self.steps)
            full.append(self.meter.stop()[0])
            saved = [b.__dict__.get("forward") for b in blocks]
            for b in blocks:
                b.forward = bypass
            try:
                self.meter.start()
                self.latents(prompt, seed, self.steps)
                rest.append(self.meter.stop()[0])
            finally:
                for b, f in zip(blocks, saved):
                    if f is None:
                        del b.forward
                    else:
                        b.forward = f
        share = statistics.median(rest) / statistics.median(full)
        print(f"non-block share of a pass on this model: {share:.3f} (a pass with every block bypassed "
              f"{statistics.median(rest) * 1e3:.0f} ms against {statistics.median(full) * 1e3:.0f} ms per video)",
              flush=True)
        self.store.append({"kind": "non_block", "session": self.session, "share": share, "full": full,
                           "bypassed": rest})

    def run(self) -> None:
        records = self.store.records()
        self.setup_lpips()
        seconds_per_video = self.warm_up()
        self.reference(records)
        done = {r["run"] for r in self.store.records() if r.get("kind") == "quality"}
        unavailable = {}
        todo = []
        for run in self.runs:
            reason = run.method.unavailable()
            if reason:
                unavailable[run.method.key] = reason
            elif run.id not in done and run.method.key != "baseline":
                todo.append(run)
        for key, reason in unavailable.items():
            print(f"skipped {key}: {reason}", flush=True)
        if len(done) > 1:
            print(f"resuming: {len(done) - 1} run(s) already scored, {len(todo)} to go", flush=True)
        timed_runs = {r["run"] for r in records if r.get("kind") == "timing"}
        scored_untimed = sum(1 for r in records if r.get("kind") == "quality" and r.get("status") == "ok"
                             and r["run"] != "baseline[]" and r["run"] not in timed_runs)
        todo = self.plan(todo, seconds_per_video, scored_untimed).runs
        for i, run in enumerate(todo, start=1):
            if self.over_budget():
                return
            self.store.append(self.quality_run(run, i, len(todo)))
        ok = {r["run"] for r in self.store.records() if r.get("kind") == "quality" and r.get("status") == "ok"}
        timed = {(r["run"], r["round"]) for r in self.store.records() if r.get("kind") == "timing"}
        timeable = [run for run in self.runs if run.id in ok and run.method.key != "baseline"]
        measured_share = False
        for round_index in range(self.settings["repeats"]):
            pending = [run for run in timeable if (run.id, round_index) not in timed]
            if not pending:
                continue
            if not measured_share:
                self.non_block_share()
                measured_share = True
            random.Random(round_index).shuffle(pending)
            print(f"timing round {round_index + 1}/{self.settings['repeats']}: {len(pending)} runs, interleaved "
                  f"with the baseline", flush=True)
            self.time_baseline(round_index)
            for i, run in enumerate(pending, start=1):
                if self.over_budget():
                    self.time_baseline(round_index)
                    return
                times, peaks, _ = self.time_run(run)
                self.store.append({"kind": "timing", "run": run.id, "round": round_index, "session": self.session,
                                   "seconds": sum(times), "per_video": times, "peak_memory": max_peak(peaks)})
                if i % BASELINE_EVERY == 0 and i < len(pending):
                    self.time_baseline(round_index)
            self.time_baseline(round_index)


# ---------------------------------------------------------------------------------------------- command
def unfinished(records: list[dict], runs: list[Run], settings: dict) -> list[str]:
    """What is left to run, one entry per run: a run without its score, or a scored run without a timing round."""
    scored = {r["run"]: r.get("status") for r in records if r.get("kind") == "quality"}
    timed = {(r["run"], r["round"]) for r in records if r.get("kind") == "timing"}
    out = []
    for run in runs:
        if run.id not in scored:
            if run.method.key == "baseline" or not run.method.unavailable():
                out.append(f"{run.id} (not scored)")
        elif scored[run.id] == "ok" and run.method.key != "baseline":
            rounds = [i + 1 for i in range(settings["repeats"]) if (run.id, i) not in timed]
            if rounds:
                out.append(f"{run.id} (timing round{'s' if len(rounds) > 1 else ''} "
                           f"{', '.join(map(str, rounds))} missing)")
    return out


def remaining(records: list[dict], runs: list[Run], settings: dict) -> bool:
    """Whether anything is left to run."""
    return bool(unfinished(records, runs, settings))


def incomplete_message(missing: list[str], shown: int = 5) -> str:
    """One line: how many runs are unfinished, which (the first few), and what to do."""
    names = ", ".join(missing[:shown]) + (f" and {len(missing) - shown} more" if len(missing) > shown else "")
    return (f"INCOMPLETE: {len(missing)} run(s) unfinished: {names}; the report covers what is measured; run the "
            f"same command again to finish")


def settings_for(args, identity: dict, runs: list[Run], pipeline: dict | None = None) -> dict:
    """What a bench folder was made with (a resumed run must match it). ``pipeline``: for --pipeline, its
    prompts, default guidance and the size, device and dtype it runs at."""
    import diffusers
    import torch
    mode = MODES[_mode(args)]
    steps = args.steps or 30
    from stepcache.wan21.demo.model import GUIDANCE
    pipeline = pipeline or {}
    default_guidance = pipeline.pop("guidance", GUIDANCE)
    prompts = pipeline.get("prompts")
    return {
        "format": FORMAT, "mode": _mode(args), **identity, **pipeline,
        "steps": steps, "guidance": default_guidance if args.guidance is None else args.guidance,
        "pairs": [list(p) for p in bench_pairs(args.num_prompts or mode["prompts"], args.num_seeds or mode["seeds"],
                                               args.first_prompt, prompts)],
        "repeats": args.repeats or mode["repeats"], "threads": args.threads, "clock": args.clock,
        "calibration_pairs": args.calibration_pairs or mode["calibration_pairs"],
        "stepcache_profile": ({"file": str(Path(args.profile_file).resolve()),
                               "sha256": _sha256(Path(args.profile_file))} if args.profile_file
                              else "calibrated in this run"),
        "runs": [r.id for r in runs],
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
    }


def check_pipeline(args) -> dict:
    """Everything about --pipeline that can be checked before a model loads: the folder, the flags that belong to
    --model, the prompts, the sizes (the pipeline's own where not given) and the device."""
    from stepcache.generate import (apply_pipeline_defaults, pipeline_folder, pipeline_of, resolve_device,
                                    shipped_profiles)
    from .bench_subject import check_prompt_budget, pipeline_identity, subject_images, subject_prompts
    folder = pipeline_folder(args.pipeline, BenchError, "--pipeline", full=False)
    for flag, given in (("--model", args.model != "demo"), ("--untrained", args.untrained),
                        ("--weights", args.weights is not None), ("--low-weights", args.low_weights is not None)):
        if given:
            raise BenchError(f"{flag} is for the shipped demo models; with --pipeline the folder is the model")
    pipeline_class, family_spec, spec = pipeline_of(folder, BenchError)
    apply_pipeline_defaults(args, spec, BenchError)
    mode = MODES[_mode(args)]
    prompts = subject_prompts(args, spec)
    count = args.num_prompts or mode["prompts"]
    # diffusers MagCache calibrates on the calibration prompts even when --profile spares stepcache's calibration
    check_prompt_budget(prompts, args.first_prompt + count, f"--first-prompt {args.first_prompt} + --num-prompts "
                        f"{count}", args.calibration_pairs or mode["calibration_pairs"], "the bench")
    images = subject_images(args, pipeline_class, spec, prompts)
    device = resolve_device(args.device, BenchError)
    family = shipped_profiles(folder, pipeline_class, family_spec.name, spec.transformer)[0]
    settings = {"guidance": spec.guidance, "prompts": prompts, "device": device, "dtype": args.dtype,
                "height": args.height, "width": args.width, "frames": args.frames, "family": family}
    if images is not None:
        settings["images"] = images
    index = json.loads((folder / "model_index.json").read_text())
    return {"folder": folder, "pipeline_class": pipeline_class, "spec": spec,
            "two_experts": index.get("transformer_2") not in (None, [None, None]),
            "identity": pipeline_identity(folder, pipeline_class, args.pipeline), "settings": settings}


def build_subject(args, checked: dict):
    """(PipelineSubject, description) of a checked --pipeline folder."""
    from stepcache.generate import pipeline_folder
    from .bench_subject import PipelineSubject, folder_summary
    s = checked["settings"]
    folder = pipeline_folder(args.pipeline, BenchError, "--pipeline")   # a Hub pipeline's weights arrive now
    subject = PipelineSubject(folder, checked["pipeline_class"], checked["spec"], s["dtype"],
                              s["device"], s["height"], s["width"], s["frames"], images=s.get("images"))
    return subject, {**folder_summary(folder), "pipeline_class": checked["pipeline_class"],
                     "device": s["device"], "dtype": s["dtype"]}


def list_methods(args) -> int:
    quick = bool(args.quick)
    for m in select_methods(args.methods, quick):
        grid = m.grid(quick, args.steps or 30)
        tags = [tag for tag, on in (("exploratory", m.exploratory), ("full mode only", m.full_only)) if on]
        flag = f" [{', '.join(tags)}]" if tags else ""
        reason = m.unavailable()
        print(f"{m.key:<32} {m.label}{flag}" + (f"  (unavailable: {reason})" if reason else ""))
        print(f"{'':<32} sweep: {', '.join(json.dumps(p) for p in grid)}")
        if m.note:
            print(f"{'':<32} {m.note}")
    mode = MODES[_mode(args)]
    steps = args.steps or 30
    runs = [r for r in plan_runs(select_methods(args.methods, quick), quick, steps) if not r.method.unavailable()]
    videos = (args.num_prompts or mode["prompts"]) * (args.num_seeds or mode["seeds"])
    cost = bench_plan.whole_plan_cost(runs, steps, videos, args.repeats or mode["repeats"], BASELINE_EVERY,
                                      args.calibration_pairs or mode["calibration_pairs"])
    print(f"\nthis plan ({len(runs)} runs that can run here, {videos} videos each, {steps} steps): at most "
          f"{cost:.0f} uncached videos' worth of work; multiply by the seconds one uncached {steps}-step video "
          f"takes on your device for the time (the bench prints its own estimate once it has timed one)")
    return 0


def run(args: argparse.Namespace) -> int:
    if not args.pipeline or Path(args.pipeline).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # nothing to fetch: no peer may reach for the network
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    points = operating_points(args)
    if len(points) > 1:
        return run_operating_points(args, points)
    args.steps, args.guidance = points[0]
    if args.list:
        return list_methods(args)
    if args.model == "demo-experts" and not args.pipeline:
        from .bench_experts import run as run_experts
        return run_experts(args)
    # bad paths fail here, in a second, before the weights are hashed or a model is built
    check_output_dir(args.out, "--out")
    if args.docs:
        check_output_dir(args.docs, "--docs")
    from stepcache.wan21.demo.model import WeightsMissing
    from . import bench_report
    try:
        subject = check_pipeline(args) if args.pipeline else None
        identity = subject["identity"] if subject else model_identity(args)
        methods = select_methods(args.methods, bool(args.quick), bool(subject and subject["two_experts"]))
        runs = plan_runs(methods, bool(args.quick), args.steps or 30)
        settings = settings_for(args, identity, runs, subject["settings"] if subject else None)
        store = Store(Path(args.out))
        store.open(settings)
    except WeightsMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    import torch
    torch.set_num_threads(args.threads)
    label = UNTRAINED_LABEL if args.untrained else ""
    if label:
        print(f"*** {label} ***", flush=True)
    started = time.perf_counter()
    info_path = store.folder / "model.json"
    if not remaining(store.records(), runs, settings) and info_path.exists():
        print("every run is finished: rebuilding the report", flush=True)
        bench = Bench(args, store, settings, runs, None, read_json(info_path))
        bench.setup_lpips()
    else:
        demo, model_info = build_subject(args, subject) if subject else build_demo(args)
        write_json(info_path, model_info)
        bench = Bench(args, store, settings, runs, demo, model_info)
        try:
            bench.run()
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    missing = unfinished(store.records(), runs, settings)
    report = bench_report.build_report(
        settings=settings, records=store.records(), runs=runs, label=label, command=_command(args),
        model_info=bench.model_info, calibration=bench.calibrations.summary(), lpips=bench.lpips_info,
        seconds=time.perf_counter() - started, complete=not missing, unfinished=missing)
    written = bench_report.write_outputs(report, store.folder, docs=args.docs)
    print(bench_report.format_console(report))
    for path in written:
        print(f"wrote {path}")
    if missing:
        # not a success: a script that loops `stepcache bench --budget-minutes N` until it exits 0 gets there
        print(f"stepcache bench: {incomplete_message(missing)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    return 0


def main(argv=None) -> int:
    """``python -m stepcache.eval.bench``: the same as ``stepcache bench``."""
    from ..cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
