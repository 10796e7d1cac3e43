"""Overhead benchmark: wall-clock speedup against ideal speedup, per method, on a small random Wan2.1.

    python -m stepcache.eval.bench_overhead [--steps 50] [--repeats 3] [--agreement-rounds 2000]

Ideal speedup is passes / computed passes: what skipping would give if a reused pass cost nothing. Reused passes
still run the embeddings and the output head (TeaCache, MagCache), and every pass pays the policy's bookkeeping,
so wall-clock speedup is below ideal; the target is at least 0.97 x ideal. Beside each method stands the honest
floor: the same pipeline run with fewer steps at the same number of transformer passes, and how far each lands
from the full-step output (relative L2 of the final latents). Random weights say nothing about visual quality;
that comparison is the demo model's job.

All runs are interleaved and repeated in one process so that machine drift hits every method alike; the
median of the repeats is reported.

Under any parallel group every pass ends with one agreement (``stepcache.distributed.agree_on_compute``: a
1-element all-reduce and a host read). Its cost is measured on two gloo ranks on this machine and printed as a
share of a baseline pass. On GPUs the collective is NCCL's, and the host read waits for the pass's queued work,
so there the share is an upper bound on what the agreement adds to the pass's own time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from ..timing import CLOCKS, add_clock_argument

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMALL_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16,
                 out_channels=16, text_dim=32, freq_dim=256, ffn_dim=512, num_layers=8, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", rope_max_seq_len=64)
# The random model's activations change far more per step than a trained model's, so the published thresholds
# mean nothing here: the benchmark calibrates the model first (stepcache calibrate's machinery) and runs each
# method at its calibrated presets, plus MagCache at the published Wan2.1-1.3B table for comparison.
METHODS = [("magcache", "published", dict(profile="wan2.1-t2v-1.3b", thresh=0.12, K=2)),
           ("magcache", "published", dict(profile="wan2.1-t2v-1.3b", thresh=0.12, K=4)),
           ("magcache", "calibrated", dict(preset="medium")),
           ("teacache", "calibrated", dict(preset="medium")),
           ("teacache", "calibrated", dict(preset="fast")),
           ("easycache", "calibrated", dict(preset="medium"))]


def build_pipeline(seed: int = 0):
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(**SMALL_WAN)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def calibrate_small(pipe, embeds, args):
    """A profile measured on this random model (two prompt embeddings, one seed) at the benchmark's size."""
    from ..calibrate import CalibrationRun, build_profile, measure
    from ..profiles import Profile, load_profile
    import torch

    def generate(prompt_seed, seed):
        g = torch.Generator().manual_seed(prompt_seed)
        run_embeds = dict(prompt_embeds=torch.randn(1, 16, 32, generator=g),
                          negative_prompt_embeds=embeds["negative_prompt_embeds"])
        pipe(height=args.size, width=args.size, num_frames=args.frames, num_inference_steps=args.steps,
             guidance_scale=5.0, generator=torch.Generator().manual_seed(seed), output_type="latent", **run_embeds)

    run = CalibrationRun([11, 12], [0], args.steps, {"resolution": [args.size, args.size]})
    runner, adapter, model = measure(pipe, run, generate, progress=False)
    # The published Wan2.1 profile as base: its warm-ups, CFG rules and MagCache presets carry over.
    base = load_profile("wan2.1-t2v-1.3b")
    return Profile("small-random-wan", build_profile(runner, adapter, model, run, "small-random-wan", base))


def _agreement_rank(rank: int, port: int, rounds: int, queue) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    from ..distributed import SequenceGroup, agree_on_compute
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    group, device = SequenceGroup(None, "world"), torch.device("cpu")
    for i in range(50):  # warm-up
        agree_on_compute(group, bool(i % 2), device)
    dist.barrier()
    start = time.perf_counter()
    for i in range(rounds):
        agree_on_compute(group, bool((i + rank) % 2), device)
    seconds = (time.perf_counter() - start) / rounds
    if rank == 0:
        queue.put(seconds)
    dist.barrier()
    dist.destroy_process_group()


def agreement_seconds(rounds: int) -> float:
    """Seconds per agreement (1-element all-reduce + host read) between two gloo ranks over loopback."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_agreement_rank, args=(port, rounds, queue), nprocs=2, start_method="spawn")
    return queue.get()


def main(argv=None) -> int:
    import torch

    import stepcache

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (default 3)")
    parser.add_argument("--frames", type=int, default=33, help="frames (default 33: 9 latent frames)")
    parser.add_argument("--size", type=int, default=128, help="height and width in pixels (default 128)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--agreement-rounds", type=int, default=2000,
                        help="agreements timed between two gloo ranks (0: skip that measurement)")
    add_clock_argument(parser)
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)

    pipe = build_pipeline()
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 16, 32, generator=g),
                  negative_prompt_embeds=torch.randn(1, 16, 32, generator=g))

    def generate(steps):
        return pipe(height=args.size, width=args.size, num_frames=args.frames, num_inference_steps=steps,
                    guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                    **embeds).frames

    def rel_l2(a, b):
        return float((a - b).norm() / b.norm())

    profile = calibrate_small(pipe, embeds, args)
    runs = [("baseline", None, args.steps)]
    for method, source, params in METHODS:
        if source == "calibrated":
            params = {**params, "profile": profile}
        runs.append((method, params, args.steps))
    generate(args.steps)  # warm-up: the first call in a process pays one-off kernel set-up
    times: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    outputs, counts = {}, {}
    for _ in range(args.repeats):
        for i, (method, params, steps) in enumerate(runs):
            if params is not None:
                stepcache.enable(pipe, method, **params)
            start = clock()
            outputs[i] = generate(steps)
            times[i].append(clock() - start)
            if params is not None:
                counts[i] = stepcache.stats(pipe).counts()
                stepcache.disable(pipe)
    base_time = statistics.median(times[0])
    base = outputs[0]
    total = 2 * args.steps
    print(f"small random Wan2.1 ({sum(p.numel() for p in pipe.transformer.parameters()) / 1e6:.1f}M parameters), "
          f"{args.frames}x{args.size}x{args.size}, {args.steps} steps with CFG ({total} passes), "
          f"{args.threads} threads, {args.clock} clock, median of {args.repeats}; baseline {base_time:.2f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    header = (f"{'run':<52} {'passes':>8} {'ideal':>6} {'speed':>6} {'speed/ideal':>11} {'relL2':>7} | "
              f"{'fewer steps, same passes':<24} {'speed':>6} {'relL2':>7}")
    print(header)
    print("-" * len(header))
    for i, (method, params, steps) in enumerate(runs[1:], start=1):
        computed, passes = counts[i]
        ideal = passes / computed
        wall = base_time / statistics.median(times[i])
        shown = {k: v for k, v in params.items() if k != "profile"}
        source = params["profile"] if isinstance(params["profile"], str) else "calibrated"
        label = f"{method} {source} {shown}"
        fewer = max(2, round(args.steps * computed / passes))
        start = clock()
        floor = generate(fewer)
        floor_wall = base_time / (clock() - start)
        print(f"{label:<52} {computed:>3}/{passes:<4} {ideal:>5.2f}x {wall:>5.2f}x {wall / ideal:>11.3f} "
              f"{rel_l2(outputs[i], base):>7.4f} | {f'{fewer} steps':<24} {floor_wall:>5.2f}x "
              f"{rel_l2(floor, base):>7.4f}")
    if args.agreement_rounds > 0:
        per_pass = base_time / total
        agreement = agreement_seconds(args.agreement_rounds)
        print(f"parallel agreement (1-element all-reduce + host read, 2 gloo ranks on this machine, wall clock, "
              f"{args.agreement_rounds} rounds): {agreement * 1e6:.0f} us per pass = "
              f"{100 * agreement / per_pass:.2f}% of a baseline pass ({per_pass * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
