"""stepcache.hunyuan: HunyuanVideo T2V.

* ``diffusers_adapter``: diffusers' ``HunyuanVideoTransformer3DModel`` (``stepcache.enable(pipe, ...)``) and
  ``load_pipeline`` for a local diffusers-format folder;
* ``official_adapter``: upstream Tencent/HunyuanVideo's ``HYVideoDiffusionTransformer``;
* ``official``: the one implementation behind the drop-in scripts ``magcache_sample_video.py``,
  ``teacache_sample_video.py`` and ``easycache_sample_video.py`` for an upstream checkout;
* ``sparse_videogen``: the drop-ins ``hyvideo_svg_easycache.py`` (EasyCache4HunyuanVideo's script of that name),
  ``hyvideo_svg_magcache.py`` and ``hyvideo_svg_teacache.py``: a cache over Sparse VideoGen's attention, in SVG's
  copy of the model; ``svg_reference``, SVG's CUDA kernels replaced by PyTorch equivalents (the CPU tests);
* ``resolution``: which published MagCache table a video size uses (``--magcache-calibration`` measures a new
  one, through :mod:`stepcache.calibration_io`).
"""
from ..families import Family, Pipeline

FAMILY = Family(
    name="hunyuanvideo",
    adapters={"HunyuanVideoTransformer3DModel": "stepcache.hunyuan.diffusers_adapter:HunyuanVideoDiffusersAdapter",
              "HYVideoDiffusionTransformer": "stepcache.hunyuan.official_adapter:HYVideoAdapter"},
    pipelines={"HunyuanVideoPipeline": Pipeline(
        "HunyuanVideoTransformer3DModel", 6.0, "embedded guidance", true_cfg=True,
        load="stepcache.hunyuan.diffusers_adapter:load_pipeline",
        decode="stepcache.hunyuan.diffusers_adapter:decode_latents")},
)
