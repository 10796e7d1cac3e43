"""Does caching add up with torch.compile? Time the demo model eager and compiled, each uncached and cached.

``python -m stepcache.eval.bench_compile [--method magcache] [--compile regional|whole] [--repeats 5]``

Four configurations, each generating the same video: eager uncached (T0), eager cached (Te), compiled uncached
(Tc), compiled cached (Tcc). Caching composes with compiling when the compiled-and-cached speed is the compiled
speed times caching's own speedup: the ratio ``(Tc / Tcc) / (T0 / Te)`` is 1.0 then, below 1.0 when compiling and
caching get in each other's way. Every configuration is timed ``--repeats`` times, interleaved, after a warm-up
(which includes the compilation); the report gives the median and the range, and the ratio's range from the
extremes, so that a gap smaller than the spread is read as none.

Design notes: docs/design.md#torchcompile
"""
from __future__ import annotations

import statistics
import sys
import time
import warnings

from ..cliargs import OneLineParser, int_at_least
from ..errors import run_cli

PROMPT = "a red square moving right on a dark background"


def build(method: str | None, compile_mode: str | None, backend: str):
    import stepcache
    from stepcache.wan21.demo.model import PROFILE, DemoPipeline, load
    demo = DemoPipeline(load())
    if method:
        stepcache.enable(demo.pipe, method, profile=str(PROFILE))
    if compile_mode == "whole":
        demo.pipe.transformer.compile(backend=backend)
    elif compile_mode == "regional":
        demo.pipe.transformer.compile_repeated_blocks(backend=backend, fullgraph=True)
    return demo


def run(args) -> dict:
    import torch
    torch.set_num_threads(args.threads)
    configs = {"eager": (None, None), "eager+cache": (args.method, None),
               "compiled": (None, args.compile), "compiled+cache": (args.method, args.compile)}
    built = {}
    for name, (method, mode) in configs.items():
        demo = build(method, mode, args.backend)
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            demo.latents([PROMPT], [1], steps=args.steps)    # warm-up, and the compilation
        print(f"{name}: warm-up {time.perf_counter() - started:.1f} s", flush=True)
        built[name] = demo
    times = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, demo in built.items():
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                demo.latents([PROMPT], [1], steps=args.steps)
            times[name].append(time.perf_counter() - started)
    median = {k: statistics.median(v) for k, v in times.items()}
    ratio = (median["compiled"] / median["compiled+cache"]) / (median["eager"] / median["eager+cache"])
    low = (min(times["compiled"]) / max(times["compiled+cache"])) / (max(times["eager"]) / min(times["eager+cache"]))
    high = (max(times["compiled"]) / min(times["compiled+cache"])) / (min(times["eager"]) / max(times["eager+cache"]))
    return {"times": times, "median": median, "ratio": ratio, "ratio_range": [low, high],
            "caching_speedup": median["eager"] / median["eager+cache"],
            "compile_speedup": median["eager"] / median["compiled"],
            "compiled_cached_speedup": median["eager"] / median["compiled+cache"]}


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m stepcache.eval.bench_compile", description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="magcache", choices=["teacache", "magcache", "easycache"])
    p.add_argument("--compile", default="regional", choices=["regional", "whole"],
                   help="regional: compile_repeated_blocks(fullgraph=True); whole: transformer.compile()")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--steps", type=int_at_least(2), default=30)
    p.add_argument("--repeats", type=int_at_least(1), default=5)
    p.add_argument("--threads", type=int_at_least(1), default=1)
    args = p.parse_args(argv)

    def body():
        result = run(args)
        print(f"\n{args.method}, {args.compile} compile ({args.backend}), {args.steps} steps, {args.threads} "
              f"thread(s), {args.repeats} rounds (median, range in seconds):")
        for name, values in result["times"].items():
            print(f"  {name:<15} {result['median'][name]:.3f} s ({min(values):.3f}-{max(values):.3f})")
        print(f"caching alone {result['caching_speedup']:.2f}x, compiling alone {result['compile_speedup']:.2f}x, "
              f"both {result['compiled_cached_speedup']:.2f}x")
        low, high = result["ratio_range"]
        print(f"compiled-and-cached speed / (compiled speed x caching speedup) = {result['ratio']:.3f} "
              f"(range {low:.3f}-{high:.3f})")
    return run_cli(body, prog="python -m stepcache.eval.bench_compile")


if __name__ == "__main__":
    sys.exit(main())
