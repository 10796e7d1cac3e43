"""stepcache.eval: compare cached videos with uncached ones (PSNR, SSIM, LPIPS).

Modules:
  compare       the `stepcache compare` command (folder mode and pair mode)
  video         streaming video decoding, folder pairing and input checks
  metrics       PSNR (two definitions) and SSIM on frame tensors
  lpips         a torchvision-free LPIPS and the search for its weight files
  scoring       per-video scores computed chunk by chunk, and their averaging
  manifest      the timing manifest written by the generation runners
  report        terminal table, JSON, CSV and the speedup-vs-quality plot
  prompts       VBench prompt list loader (from the installed `vbench` package or a user file)
  bench_metrics throughput benchmark (`python -m stepcache.eval.bench_metrics`)

This package's __init__ stays import-light on purpose: `stepcache compare --help` must not pay for torch.
"""
from .errors import CompareError

__all__ = ["CompareError"]
