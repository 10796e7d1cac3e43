"""A tiny trained video model in the diffusers Wan architecture, shipped with stepcache, and `stepcache demo`.

* :mod:`.scenes` procedural clips, their prompts, and the colour/direction read-back;
* :mod:`.codec` the fixed linear latent (pixel-unshuffle then a fixed PCA projection);
* :mod:`.text` the word-level prompt encoder;
* :mod:`.model` the model config, the weight file and a real ``WanPipeline`` built from it;
* :mod:`.train` the training script; :mod:`.check` the prompt-match check; :mod:`.calibrate_demo` its profile;
* :mod:`.run` the ``stepcache demo`` command.
"""


def calibration_target(args=None, weights=None, demo=None):
    """``(pipeline, generate(prompt, seed), meta)`` for ``stepcache calibrate --model demo``.

    The demo model has a fixed video size (8 frames of 32x32), so ``--height``, ``--width`` and ``--frames`` are
    ignored; ``--steps`` and ``--guidance`` (default 2.5) are used.
    """
    from .model import GUIDANCE, SHIFT, STEPS, DemoPipeline, load
    from .scenes import FRAMES, SIZE
    demo = demo if demo is not None else DemoPipeline(load(weights))
    steps = getattr(args, "steps", None) or STEPS
    guidance = getattr(args, "guidance", None)
    guidance = GUIDANCE if guidance is None else guidance

    def generate(prompt, seed):
        demo.latents([prompt], [seed], steps=steps, guidance=guidance)

    meta = {"resolution": [SIZE, SIZE], "frames": FRAMES, "guidance": guidance,
            "scheduler": type(demo.pipe.scheduler).__name__, "shift": SHIFT, "dtype": "fp32",
            "pipeline": "WanPipeline", "weights": str(demo.model.metadata.get("path")),
            # `stepcache generate` refuses the demo model; `stepcache demo` runs it, at the calibrated step count
            "run_with": f"stepcache demo --profile {{profile}} --steps {steps}"
                        + (f" --weights {weights}" if weights is not None else "")}
    return demo.pipe, generate, meta
