"""A two-expert variant of the demo model, shaped like Wan2.2 A14B: the shipped demo model
(:mod:`stepcache.wan21.demo`) as the high-noise expert, a copy fine-tuned on low-noise timesteps as the low-noise
expert, switched at Wan2.2 T2V's boundary. :mod:`.model` builds it as a real diffusers ``WanPipeline`` with
``transformer_2`` and ``boundary_ratio``; :mod:`stepcache.eval.bench_experts` benchmarks the caches on it.
"""
