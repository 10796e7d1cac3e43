"""Check stepcache on your GPU: exactness, compilation and memory, on your pipeline.

``python -m stepcache.eval.gpu_check --pipeline DIR_OR_ID [--method magcache] [--device cuda] [--steps 20]``

Four checks, each printed PASS or FAIL with its numbers (exit code 1 when one fails):
1. **threshold 0 is the uncached model**: the same prompt and seed uncached and with ``thresh=0``; the latents
   must be equal bit for bit.
2. **memory**: what the cache held per branch (stepcache's stats) against the size of one block-stack residual
   of this model at this size (TeaCache and MagCache; EasyCache's tensors are latent-sized and only printed), and
   the peak device memory of the cached run against the uncached one.
3. **the cache in host memory** (``cache_device="cpu"``: pinned memory, non-blocking copies): the same decisions
   and the same latents as the cache on the device, and the peak device memory beside check 2's.
4. **compiling adds no recompiles**: the blocks compiled (``compile_repeated_blocks``, inductor) with the method
   enabled, two generations with dynamo's ``error_on_recompile``; the count of compiled graphs is printed.

It runs on the CPU as well (the tests run it on the demo's saved folder); on the CPU the peak device memory is
not read. Design notes: docs/design.md#cache-memory
"""
from __future__ import annotations

import sys
import warnings

from ..cliargs import OneLineParser, int_at_least
from ..errors import InputError, run_cli

PROMPT = "a red square moving right on a dark background"


class CheckError(InputError):
    pass


def _generate(subject, steps: int, guidance: float, meter):
    import torch
    meter.start()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        latents = subject.latents([subject.prompt], [7], steps, guidance)
    seconds, peak = meter.stop()
    return latents.cpu(), peak


def run(args) -> int:
    import torch
    import stepcache
    from stepcache.api import adapter_for
    from stepcache.families import load_object
    from stepcache.generate import apply_pipeline_defaults, pipeline_folder, pipeline_of, resolve_device
    from stepcache.profiles import FOLDER_PROFILE
    from stepcache.timing import meter_for
    from .bench_subject import PipelineSubject
    folder = pipeline_folder(args.pipeline, CheckError, "--pipeline", full=False)
    pipeline_class, _, spec = pipeline_of(folder, CheckError)
    if spec.needs_image:
        raise CheckError(f"{pipeline_class} needs a first frame; check a text-to-video pipeline of the family")
    apply_pipeline_defaults(args, spec)
    device = resolve_device(args.device, CheckError)
    folder = pipeline_folder(args.pipeline, CheckError, "--pipeline")
    subject = PipelineSubject(folder, pipeline_class, spec, args.dtype, device, args.height, args.width, args.frames)
    subject.prompt = args.prompt or (load_object(spec.prompts)()[0] if spec.prompts else PROMPT)
    guidance = spec.guidance if args.guidance is None else args.guidance
    meter = meter_for(device)
    pipe, failures = subject.pipe, []
    own = folder / FOLDER_PROFILE
    profile = args.profile or (str(own) if own.is_file() else None)

    print(f"{pipeline_class} on {device} ({args.dtype}), {args.height}x{args.width}, {args.frames} frames, "
          f"{args.steps} steps, guidance {guidance:g}; method {args.method}", flush=True)
    uncached, uncached_peak = _generate(subject, args.steps, guidance, meter)
    stepcache.enable(pipe, args.method, profile=profile, thresh=0)
    zero, _ = _generate(subject, args.steps, guidance, meter)
    stepcache.disable(pipe)
    same = torch.equal(zero, uncached)
    failures += [] if same else ["threshold 0"]
    print(f"1. threshold 0 against uncached: {'PASS, bit-identical' if same else 'FAIL: the latents differ'} "
          f"(max difference {(zero.float() - uncached.float()).abs().max().item():.3g})", flush=True)

    # on the eager model: what the cache holds, and the peak with it
    residual = {}
    adapter = adapter_for(pipe.transformer)

    def stack_input(module, a, k):
        hidden = adapter.block_io.hidden_in(a, k)
        residual["bytes"] = hidden.numel() * hidden.element_size()
    hook = adapter.blocks(pipe.transformer)[0].register_forward_pre_hook(stack_input, with_kwargs=True)
    stepcache.enable(pipe, args.method, profile=profile)
    cached, cached_peak = _generate(subject, args.steps, guidance, meter)
    stats = stepcache.stats(pipe).to_dict()
    stepcache.disable(pipe)
    hook.remove()
    held = stats["cache_peak_bytes"]
    per_branch = max(held.values()) if held else 0
    # a STACK method holds one residual per branch, TeaCache also its signal (a few KiB, or a residual's size where
    # it is block 0's modulated input); EasyCache latent-sized ones
    from .cache_memory import block_signal_bytes
    one = residual.get("bytes", 0)
    expected = one + (block_signal_bytes(adapter, one) if args.method == "teacache" else 0)
    memory_ok = args.method == "easycache" or expected <= per_branch <= 1.05 * expected + 2 ** 20
    failures += [] if memory_ok else ["memory"]
    peak_text = ("not read on the CPU" if cached_peak is None else
                 f"peak device memory {cached_peak / 2 ** 30:.2f} GiB cached, {uncached_peak / 2 ** 30:.2f} GiB "
                 f"uncached")
    print(f"2. memory: the cache held at most {per_branch / 2 ** 20:.1f} MiB per branch "
          f"({', '.join(f'{b} {v / 2 ** 20:.1f}' for b, v in held.items())}); one block-stack residual is "
          f"{residual.get('bytes', 0) / 2 ** 20:.1f} MiB"
          f"{' (+ the signal, as large)' if expected > one else ''}: {'PASS' if memory_ok else 'FAIL'}; {peak_text}; "
          f"{stats['computed_passes']}/{stats['total_passes']} passes computed", flush=True)

    stepcache.enable(pipe, args.method, profile=profile, cache_device="cpu")
    hosted, hosted_peak = _generate(subject, args.steps, guidance, meter)
    hosted_stats = stepcache.stats(pipe).to_dict()
    stepcache.disable(pipe)
    host_ok = hosted_stats["pattern"] == stats["pattern"] and torch.equal(hosted, cached)
    failures += [] if host_ok else ["host cache"]
    host_peak = ("" if hosted_peak is None else
                 f"; peak device memory {hosted_peak / 2 ** 30:.2f} GiB (cache on the device: "
                 f"{cached_peak / 2 ** 30:.2f} GiB)")
    print(f"3. cache in host memory: {'PASS, the same decisions and latents' if host_ok else 'FAIL'} "
          f"(max difference {(hosted.float() - cached.float()).abs().max().item():.3g}){host_peak}", flush=True)

    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    stepcache.enable(pipe, args.method, profile=profile)
    pipe.transformer.compile_repeated_blocks(backend=args.backend, fullgraph=True)
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                compiled, _ = _generate(subject, args.steps, guidance, meter)
        graphs = counters["stats"]["unique_graphs"]
        print(f"4. compiled ({args.backend}, regional, fullgraph) and cached: PASS, two generations without a "
              f"recompile, {graphs} compiled graph(s); largest difference to eager cached "
              f"{(compiled.float() - cached.float()).abs().max().item():.3g}", flush=True)
    except Exception as exc:   # a recompile, or a compile failure: this check's result, said
        failures.append("compile")
        print(f"4. compiled and cached: FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
    finally:
        stepcache.disable(pipe)
    print("all checks passed" if not failures else f"FAILED: {', '.join(failures)}")
    return 0 if not failures else 1


def main(argv=None) -> int:
    from stepcache.generate import add_size_arguments
    p = OneLineParser(prog="python -m stepcache.eval.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, metavar="DIR_OR_ID",
                   help="a diffusers pipeline stepcache supports: a folder or a Hugging Face Hub id")
    p.add_argument("--method", default="magcache", choices=["teacache", "magcache", "easycache"])
    p.add_argument("--profile", default=None, help="a profile file or name (default: the folder's, else matched)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--prompt", default=None, help="the prompt (default: a short one)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend for check 3 (default inductor)")
    add_size_arguments(p, "denoising steps (default 50, or the pipeline's own)")
    args = p.parse_args(argv)
    return run_cli(lambda: run(args), prog="python -m stepcache.eval.gpu_check")


if __name__ == "__main__":
    sys.exit(main())
