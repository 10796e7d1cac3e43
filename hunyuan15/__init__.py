"""stepcache.hunyuan15: HunyuanVideo 1.5 (Tencent-Hunyuan/HunyuanVideo-1.5), text- and image-to-video.

A family of its own, beside ``stepcache.hunyuan`` (HunyuanVideo 1.0), because the model is another one: one stack of
54 dual-stream blocks and no single-stream ones, a 32-channel latent at 16x spatial compression, two text streams
and SigLIP image tokens, and classifier-free guidance run as two calls per step in diffusers. What the two share is
the block's call convention (hidden states and text states in, both out) and block 0's modulated input, taken from
``stepcache.hunyuan.diffusers_adapter``.

* ``diffusers_adapter``: diffusers' ``HunyuanVideo15Transformer3DModel`` under ``HunyuanVideo15Pipeline`` and
  ``HunyuanVideo15ImageToVideoPipeline`` (``stepcache.enable(pipe, ...)``, ``stepcache generate``);
* ``official_adapter``: upstream's ``HunyuanVideo_1_5_DiffusionTransformer``;
* ``official``: the one implementation behind the drop-in scripts ``magcache_generate.py``,
  ``teacache_generate.py`` and ``easycache_generate.py`` for an upstream checkout.
"""
from ..families import Family, Pipeline

GUIDANCE_HELP = ("classifier-free guidance, set on the pipeline's guider (6.0 as published; 1.0 for the distilled "
                 "checkpoints, which run one pass per step)")

FAMILY = Family(
    name="hunyuanvideo1.5",
    adapters={"HunyuanVideo15Transformer3DModel":
              "stepcache.hunyuan15.diffusers_adapter:HunyuanVideo15DiffusersAdapter",
              "HunyuanVideo_1_5_DiffusionTransformer": "stepcache.hunyuan15.official_adapter:HYVideo15Adapter"},
    pipelines={
        "HunyuanVideo15Pipeline": Pipeline(
            "HunyuanVideo15Transformer3DModel", 6.0, GUIDANCE_HELP, guider=True,
            defaults={"height": 480, "width": 848, "frames": 121, "steps": 50},
            decode="stepcache.hunyuan.diffusers_adapter:decode_latents"),
        "HunyuanVideo15ImageToVideoPipeline": Pipeline(
            "HunyuanVideo15Transformer3DModel", 6.0, GUIDANCE_HELP, guider=True, needs_image=True,
            size_from_image=True, defaults={"frames": 121, "steps": 50},
            decode="stepcache.hunyuan.diffusers_adapter:decode_latents"),
    },
)
