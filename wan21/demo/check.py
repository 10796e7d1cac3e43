"""Is the demo model trained? Generate held-out prompt-seed pairs and read colour and direction back.

``python -m stepcache.wan21.demo.check [--weights FILE] [--n 240]`` generates ``n`` videos through the real
``WanPipeline`` (:class:`.model.DemoPipeline`, default steps and guidance), one per prompt-seed pair, and
reads each back with :func:`.scenes.read_back`. A video matches when its object has the prompt's colour and
moves in the prompt's direction. The pairs cycle through all 144 prompts; their noise seeds (from
``HELD_OUT_SEED``) are used nowhere else: not by training (which draws its own noise), calibration or the demo.
"""
from __future__ import annotations

import sys
from collections import Counter

import torch

from ...cliargs import OneLineParser, float_at_least, int_at_least
from ...errors import run_cli
from ...outputs import check_output_file, write_json
from .scenes import ALL_SCENES, Scene, read_back

HELD_OUT_SEED = 100_000


def held_out_pairs(n: int) -> list[tuple[Scene, int]]:
    """``n`` (scene, seed) pairs: every prompt once per 144 pairs, in a fixed shuffled order."""
    order = torch.randperm(len(ALL_SCENES), generator=torch.Generator().manual_seed(HELD_OUT_SEED)).tolist()
    return [(ALL_SCENES[order[i % len(order)]], HELD_OUT_SEED + i) for i in range(n)]


def prompt_match(weights=None, n: int = 240, steps: int | None = None, guidance: float | None = None,
                 batch: int = 24, progress: bool = True, verbose: bool = True) -> dict:
    from .model import GUIDANCE, STEPS, DemoPipeline, load
    steps = steps or STEPS
    guidance = GUIDANCE if guidance is None else guidance
    demo = DemoPipeline(load(weights))
    pairs = held_out_pairs(n)
    results = []
    from tqdm import tqdm
    bar = tqdm(total=n, desc="prompt-match check", unit="video", disable=not progress)
    for i in range(0, n, batch):
        chunk = pairs[i: i + batch]
        videos = demo([s.prompt for s, _ in chunk], [seed for _, seed in chunk], steps=steps, guidance=guidance)
        for (scene, seed), video in zip(chunk, videos):
            rb = read_back(video)
            results.append({"prompt": scene.prompt, "seed": seed, "colour": rb.colour, "direction": rb.direction,
                            "valid": rb.valid, "reason": rb.reason, "match": rb.matches(scene),
                            "colour_ok": rb.colour == scene.colour,
                            "direction_ok": rb.valid and rb.direction == scene.direction})
        bar.update(len(chunk))
    bar.close()
    total = len(results)
    summary = {
        "pairs": total, "steps": steps, "guidance": guidance, "weights": demo.model.metadata.get("path"),
        "match": sum(r["match"] for r in results) / total,
        "colour": sum(r["colour_ok"] for r in results) / total,
        "direction": sum(r["direction_ok"] for r in results) / total,
        "invalid": sum(not r["valid"] for r in results) / total,
        "failures": Counter(r["reason"].split(" (")[0] or "wrong colour/direction"
                            for r in results if not r["match"]).most_common(),
        "results": results,
    }
    if verbose:
        print(f"prompt match on {total} held-out prompt-seed pairs ({steps} steps, CFG {guidance}): "
              f"{100 * summary['match']:.1f}% (colour {100 * summary['colour']:.1f}%, direction "
              f"{100 * summary['direction']:.1f}%, no single moving object {100 * summary['invalid']:.1f}%)")
    return summary


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stepcache.wan21.demo.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="model file (default: the one shipped in the package)")
    p.add_argument("--n", type=int_at_least(1), default=240, help="held-out prompt-seed pairs (default 240)")
    p.add_argument("--steps", type=int_at_least(2), default=None, help="denoising steps (default: the demo's)")
    p.add_argument("--guidance", type=float_at_least(1.0), default=None, help="CFG scale (default: the demo's)")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the per-video results here")
    a = p.parse_args(argv)

    def body():
        if a.json:
            check_output_file(a.json, "--json", (".json",))
        if a.threads:
            torch.set_num_threads(a.threads)
        summary = prompt_match(a.weights, a.n, a.steps, a.guidance)
        if a.json:
            write_json(a.json, summary)
    return run_cli(body, prog="python -m stepcache.wan21.demo.check")


if __name__ == "__main__":
    sys.exit(main())
