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


def claim(pipeline_class: str, pipeline_config, transformer_config) -> list[str] | None:
    """For a Wan pipeline configured as only Wan2.2 is (two experts, or per-token timesteps): the shipped profile
    for its task when the transformer has the config that profile was measured on ([] otherwise); else None."""
    if pipeline_class not in ("WanPipeline", "WanImageToVideoPipeline"):
        return None
    experts = pipeline_config.get("boundary_ratio") is not None
    if not experts and not pipeline_config.get("expand_timesteps"):
        return None
    name = PROFILES.get((True, transformer_config.get("in_channels")) if experts else (False, pipeline_class))
    if name is None:
        return []
    wanted = load_profile(name).data.get("model", {}).get("config", {})
    return [name] if all(transformer_config.get(k) == v for k, v in wanted.items()) else []


class Wan22DiffusersAdapter(WanDiffusersAdapter):
    family = FAMILY

    def __init__(self, pipeline: Any = None):
        self.pipeline = pipeline

    @property
    def vae_spatial_scale(self) -> int:
        # TI2V-5B's VAE downsamples by 16, A14B's (Wan2.1's) by 8; the pipeline knows its VAE.
        return int(getattr(self.pipeline, "vae_scale_factor_spatial", 8))

    def detect_profiles(self, model):
        """The shipped profile for this pipeline's task, when the transformer has the config it was measured on."""
        names = claim(type(self.pipeline).__name__, self.pipeline.config, model.config) or []
        return [load_profile(name) for name in names]
