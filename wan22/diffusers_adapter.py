"""diffusers Wan2.2: the Wan2.1 transformer adapter (the same ``WanTransformer3DModel``), with the Wan2.2
profiles chosen from the pipeline, which alone tells the tasks apart.

A14B's two experts each have the config of Wan2.1's 14B transformer for their task, and TI2V-5B is one model for
text-to-video and image-to-video with a table for each, so a config cannot name the profile; the pipeline can:
``boundary_ratio`` (two experts) with 16 or 36 input channels is T2V-A14B or I2V-A14B, ``expand_timesteps`` is
TI2V-5B, run by ``WanPipeline`` (text) or ``WanImageToVideoPipeline`` (image).
"""
from __future__ import annotations

from typing import Any

from ..profiles import load_profile
from ..wan21.diffusers_adapter import WanDiffusersAdapter

FAMILY = "wan2.2"
# (two experts?, the transformer's in_channels or the pipeline class) -> the shipped profile.
PROFILES = {
    (True, 16): "wan2.2-t2v-a14b",
    (True, 36): "wan2.2-i2v-a14b",
    (False, "WanPipeline"): "wan2.2-ti2v-5b",
    (False, "WanImageToVideoPipeline"): "wan2.2-ti2v-5b-i2v",
}


def claim(pipeline: Any, model: Any) -> Wan22DiffusersAdapter | None:
    """The Wan2.2 adapter for a Wan pipeline configured as only Wan2.2 is (two experts, or per-token timesteps)."""
    if type(pipeline).__name__ not in ("WanPipeline", "WanImageToVideoPipeline"):
        return None
    config = getattr(pipeline, "config", None) or {}
    if config.get("boundary_ratio") is None and not config.get("expand_timesteps"):
        return None
    return Wan22DiffusersAdapter(pipeline)


class Wan22DiffusersAdapter(WanDiffusersAdapter):
    family = FAMILY

    def __init__(self, pipeline: Any = None):
        self.pipeline = pipeline

    @property
    def vae_spatial_scale(self) -> int:
        # TI2V-5B's VAE downsamples by 16, A14B's (Wan2.1's) by 8; the pipeline knows its VAE.
        return int(getattr(self.pipeline, "vae_scale_factor_spatial", 8))

    def profile_name(self, model) -> str | None:
        config = self.pipeline.config
        if config.get("boundary_ratio") is not None:
            return PROFILES.get((True, model.config.get("in_channels")))
        return PROFILES.get((False, type(self.pipeline).__name__))

    def detect_profiles(self, model):
        """The shipped profile for this pipeline's task, when the transformer has the config it was measured on."""
        name = self.profile_name(model)
        if name is None:
            return []
        profile = load_profile(name)
        wanted = profile.data.get("model", {}).get("config", {})
        return [profile] if all(model.config.get(k) == v for k, v in wanted.items()) else []
