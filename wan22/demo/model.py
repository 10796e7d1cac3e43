"""The two-expert demo: a real diffusers ``WanPipeline`` with ``transformer`` (the shipped demo model, the
high-noise expert) and ``transformer_2`` (its fine-tune on low-noise timesteps), switched at ``boundary_ratio``.

The low-noise expert was trained by the demo's training script from the shipped weights, on timesteps below the
boundary only, with the prompt encoder frozen (both experts read the same prompt embedding):

    python -m stepcache.wan21.demo.train --out DIR --steps 1500 --init demo --t-max 0.875 --freeze-text \\
        --lr 3e-4 --warmup 50 --check 0

``weights/demo_wan_low_noise.safetensors`` is its EMA at the last step (float16, the same format as the demo's).
"""
from __future__ import annotations

from pathlib import Path

from ...wan21.demo.model import GUIDANCE, SHIFT, STEPS, DemoModel, DemoPipeline, load

PACKAGE_DIR = Path(__file__).resolve().parent
LOW_NOISE_WEIGHTS = PACKAGE_DIR / "weights" / "demo_wan_low_noise.safetensors"
# Wan2.2 T2V-A14B's boundary (wan/configs/wan_t2v_A14B.py); at the demo's 30 steps and shift 3 the low-noise
# expert takes over after the first third of the steps.
BOUNDARY = 0.875

__all__ = ["BOUNDARY", "GUIDANCE", "LOW_NOISE_WEIGHTS", "SHIFT", "STEPS", "ExpertsPipeline", "load_experts"]


def load_experts(high=None, low=None) -> tuple[DemoModel, DemoModel]:
    """(high-noise expert, low-noise expert) demo models, from the shipped files unless paths are given."""
    return load(high), load(low if low is not None else LOW_NOISE_WEIGHTS)


class ExpertsPipeline(DemoPipeline):
    """:class:`~stepcache.wan21.demo.model.DemoPipeline` over both experts: ``self.pipe`` is a real ``WanPipeline``
    whose loop runs ``transformer`` while ``t >= boundary * 1000`` and ``transformer_2`` after, as Wan2.2's does."""

    def __init__(self, high: DemoModel | None = None, low: DemoModel | None = None, boundary: float = BOUNDARY,
                 shift: float = SHIFT):
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
        if high is None or low is None:
            high, low = load_experts()
        self.model, self.low = high, low
        self.codec = high.codec
        self.pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=high.transformer,
                                transformer_2=low.transformer, boundary_ratio=boundary,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
        self.pipe.tokenizer, self.pipe.text_encoder = high.tokenizer, high.text_encoder
        self.pipe.set_progress_bar_config(disable=True)

    def switch_step(self, steps: int = STEPS) -> int:
        """The first step of the low-noise expert in a run of ``steps`` steps, as the pipeline's loop decides it."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(steps)
        return int((scheduler.timesteps >= self.pipe.config.boundary_ratio * scheduler.config.num_train_timesteps)
                   .sum())
