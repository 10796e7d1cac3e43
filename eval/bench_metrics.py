"""Throughput of `stepcache compare` on one synthetic video pair (default 49 frames of 480x832, Wan2.1's size).

    python -m stepcache.eval.bench_metrics [--frames 49] [--height 480] [--width 832] [--chunk-frames 8]

Prints seconds per video and peak memory for three stages: decoding only, decoding + PSNR + SSIM, and
everything including LPIPS. Each stage runs in a fresh Python process, so each peak (ru_maxrss) is that
stage's own and not left over from an earlier one. The pair is H.264 (imageio's default writer, like generated
videos) of a moving pattern and a noisy, slightly shifted copy. LPIPS runs on the real AlexNet backbone if
`load_lpips` finds it, otherwise on random weights of the same shape (same cost, meaningless values).
Not part of the test suite: timings depend on the machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("decode", "psnr+ssim", "psnr+ssim+lpips")


def make_pair(folder: Path, frames: int, height: int, width: int) -> tuple[Path, Path]:
    import imageio
    import numpy as np

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = folder / "reference.mp4", folder / "generated.mp4"
    writers = [imageio.v2.get_writer(str(p), format="ffmpeg", fps=16, ffmpeg_log_level="error") for p in paths]
    for t in range(frames):
        frame = np.stack([128 + 100 * np.sin((x + 4 * t) / 23), 128 + 100 * np.cos((y - 3 * t) / 17),
                          128 + 100 * np.sin((x + y + 5 * t) / 31)], axis=-1)
        writers[0].append_data(frame.clip(0, 255).astype(np.uint8))
        shifted = np.roll(frame, 1, axis=1) + rng.normal(0, 4, frame.shape)
        writers[1].append_data(shifted.clip(0, 255).astype(np.uint8))
    for writer in writers:
        writer.close()
    return paths


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def run_stage(stage: str, reference: str, generated: str, chunk_frames: int) -> dict:
    """One stage in this process; returns seconds and memory figures."""
    import torch

    from .lpips import load_lpips
    from .scoring import score_pair
    from .video import VideoPair, paired_chunks

    pair = VideoPair("bench", Path(reference), Path(generated))
    scorer, lpips_weights = None, None
    if stage == "psnr+ssim+lpips":
        setup = load_lpips("alex")
        if setup.available:
            scorer, lpips_weights = setup.scorer, "found"
        else:
            from .lpips import LPIPS, TAP_CHANNELS, backbone_features

            heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS["alex"])}
            scorer, lpips_weights = LPIPS("alex", backbone_features("alex").state_dict(), heads), "random"
    before = _rss_mb()
    start = time.perf_counter()
    if stage == "decode":
        frames = sum(len(a) for a, _ in paired_chunks(pair, chunk_frames))
    else:
        frames = score_pair(pair, scorer, chunk_frames).frames
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    return {"stage": stage, "frames": frames, "seconds": seconds, "rss_before_mb": before, "peak_rss_mb": peak,
            "threads": torch.get_num_threads(), "lpips_weights": lpips_weights}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepcache.eval.bench_metrics",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=49, help="frames per video (default: 49)")
    parser.add_argument("--height", type=int, default=480, help="frame height (default: 480)")
    parser.add_argument("--width", type=int, default=832, help="frame width (default: 832)")
    parser.add_argument("--chunk-frames", type=int, default=8, help="frames per chunk, as in compare (default: 8)")
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage and exit
    parser.add_argument("--pair", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.stage:
        print(json.dumps(run_stage(args.stage, *args.pair, args.chunk_frames)))
        return 0

    with tempfile.TemporaryDirectory(prefix="stepcache-bench-") as tmp:
        print(f"writing a {args.frames}x{args.height}x{args.width} pair ...", flush=True)
        reference, generated = make_pair(Path(tmp), args.frames, args.height, args.width)
        results = []
        for stage in STAGES:
            cmd = [sys.executable, "-m", "stepcache.eval.bench_metrics", "--stage", stage, "--pair",
                   str(reference), str(generated), "--chunk-frames", str(args.chunk_frames)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr, file=sys.stderr)
                return 1
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\n{args.frames} frames of {args.width}x{args.height}, chunks of {args.chunk_frames} frames, "
          f"{results[0]['threads']} torch threads")
    print(f"{'stage':<18}{'s/video':>9}{'frames/s':>10}{'peak RSS MB':>13}{'RSS before MB':>15}")
    for r in results:
        print(f"{r['stage']:<18}{r['seconds']:>9.2f}{r['frames'] / r['seconds']:>10.1f}"
              f"{r['peak_rss_mb']:>13.0f}{r['rss_before_mb']:>15.0f}")
    if results[-1]["lpips_weights"] == "random":
        print("(LPIPS ran on random AlexNet weights: no backbone file found; the cost is the same)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
