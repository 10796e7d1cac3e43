"""stepcache.wan21: Wan2.1 on diffusers (``WanPipeline``, ``WanImageToVideoPipeline``) and on the official
repository (``WanModel``, the drop-in ``*_generate.py`` scripts), and the shipped demo model (:mod:`.demo`)."""
from ..families import Family, Pipeline

DECODE = "stepcache.wan21.diffusers_adapter:decode_latents"

FAMILY = Family(
    name="wan2.1",
    adapters={"WanTransformer3DModel": "stepcache.wan21.diffusers_adapter:WanDiffusersAdapter",
              "WanModel": "stepcache.wan21.official:WanOfficialAdapter"},
    pipelines={
        "WanPipeline": Pipeline("WanTransformer3DModel", 5.0, "CFG scale",
                                load="stepcache.wan21.diffusers_adapter:load_pipeline",
                                decode=DECODE),
        "WanImageToVideoPipeline": Pipeline("WanTransformer3DModel", 5.0, "CFG scale", needs_image=True,
                                            load="stepcache.wan21.diffusers_adapter:load_pipeline", decode=DECODE),
        # The demo model saved as a pipeline folder (stepcache demo --save-pipeline): WanPipeline at its sizes.
        "StepcacheDemoPipeline": Pipeline("WanTransformer3DModel", 2.5, "CFG scale",
                                          load="stepcache.wan21.demo.pipeline_folder:load", ships_code=True,
                                          decode=DECODE, prompts="stepcache.wan21.demo.scenes:bench_prompts",
                                          defaults={"height": 32, "width": 32, "frames": 8, "steps": 30,
                                                    "dtype": "fp32"}),
    },
    calibration_targets={"demo": "stepcache.wan21.demo:calibration_target"},
    commands=[("demo", "stepcache.wan21.demo.run", "run every method on a small trained video model shipped with "
                                                   "stepcache and compare with uncached and fewer-step runs")],
)
