"""stepcache.wan22: Wan2.2 (T2V-A14B and I2V-A14B, two experts; TI2V-5B, one model) on diffusers (``WanPipeline``
and ``WanImageToVideoPipeline`` with ``transformer_2`` and ``boundary_ratio``, or ``expand_timesteps``) and on the
official repository (Wan-Video/Wan2.2, the drop-in ``*_generate.py`` scripts).

Wan2.2 shares its model classes with Wan2.1 (diffusers' ``WanTransformer3DModel``, upstream's ``WanModel``), so
this family registers no class of its own: it claims the Wan pipelines that only Wan2.2 configures (a
``boundary_ratio`` or ``expand_timesteps``), and its drop-ins name their adapter themselves.
"""
from ..families import Family

FAMILY = Family(
    name="wan2.2",
    claim_pipeline="stepcache.wan22.diffusers_adapter:claim",
    claimed_adapter="stepcache.wan22.diffusers_adapter:Wan22DiffusersAdapter",
)
