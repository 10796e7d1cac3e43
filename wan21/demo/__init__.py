"""A tiny trained video model in the diffusers Wan architecture, shipped with stepcache, and `stepcache demo`.

* :mod:`.scenes` procedural clips, their prompts, and the colour/direction read-back;
* :mod:`.codec` the fixed linear latent (pixel-unshuffle then a fixed PCA projection);
* :mod:`.text` the word-level prompt encoder;
* :mod:`.model` the model config, the weight file and a real ``WanPipeline`` built from it;
* :mod:`.train` the training script; :mod:`.check` the prompt-match check; :mod:`.calibrate_demo` its profile;
* :mod:`.run` the ``stepcache demo`` command.
"""
