"""diffusers ``WanTransformer3DModel`` (Wan2.1 T2V and I2V): where its blocks are and where each signal lives.

The TeaCache signal is taken from the same tensors as the reference (TeaCache4Wan2.1/teacache_generate.py): the timestep
embedding ``temb`` (upstream ``e``), or with ``use_ret_steps`` its projection ``timestep_proj`` (upstream
``e0``); both are outputs of ``condition_embedder``. EasyCache works in the 16-channel latent space: for I2V
the image-condition channels the pipeline concatenates after the latent are not part of ``x``.

Under diffusers' context parallelism (Wan's own ``_cp_plan``: ``blocks.0``'s input split on the sequence, ``rope``
split, ``proj_out`` gathered) every decision is rank-invariant: ``temb`` is computed from the timestep on every
rank, and EasyCache reads the model's input and output, which are whole on every rank (the split happens at the
first block, the gather at ``proj_out``). So no measurement is reduced and no collective is added; the block
stack (wrapped beneath diffusers' split hook) stores each rank's own shard of the residual.
"""
from __future__ import annotations

from ..diffusers_io import DiffusersTransformerAdapter
from ..compiling import kept_output, outside_graph
from ..patching import first_arg_io, install_stack


def decode_latents(pipe, latents):
    """``WanPipeline``'s own decoding of ``output_type="latent"`` latents (its ``__call__``'s last lines: the VAE's
    latent mean and spread, ``vae.decode``, the video processor), as float RGB (B, T, H, W, 3) in [0, 1]."""
    import torch
    from diffusers.utils.torch_utils import get_module_execution_device
    vae = pipe.vae
    latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    with torch.inference_mode():
        video = vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt").permute(0, 1, 3, 4, 2).float()


def load_pipeline(folder, dtype, device):
    """A Wan pipeline from a local diffusers folder, its VAE in float32 whatever the transformer's dtype (as
    diffusers' Wan docs say it is meant to run)."""
    import json
    from pathlib import Path

    import diffusers
    import torch
    pipeline_type = getattr(diffusers, json.loads((Path(folder) / "model_index.json").read_text())["_class_name"])
    vae = diffusers.AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32,
                                                     local_files_only=True)
    return pipeline_type.from_pretrained(folder, vae=vae, dtype=dtype, local_files_only=True).to(device)


# The TeaCache signals Wan computes, in the order condition_embedder returns them.
SIGNALS = ("temb", "timestep_proj")


class WanDiffusersAdapter(DiffusersTransformerAdapter):
    family = "wan2.1"
    return_dict_index = 4
    config_keys = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "image_dim")
    default_signal = "temb"  # the activation a signal-reading method (TeaCache) reads by default
    block_io = first_arg_io("hidden_states")
    sequence_sharded = frozenset()  # temb and the model's input/output are whole on every rank (see above)

    @staticmethod
    def blocks(model) -> list:
        """The block stack, in call order."""
        return list(model.blocks)

    def install(self, patch, model, runner_of, wants_signal: bool, signal_name) -> None:
        install_stack(patch, runner_of, self.blocks(model), self.block_io)
        if not wants_signal:
            return

        @outside_graph
        def capture(module, inputs, outputs):
            runner = runner_of()
            if runner is not None and runner.current is not None:
                name = signal_name()
                if name not in SIGNALS:
                    raise ValueError(f"the Wan adapter computes the signals {', '.join(SIGNALS)}, but the profile's "
                                     f"variant asks for {name!r}")
                runner.current.signal_tensor = kept_output(outputs[SIGNALS.index(name)])

        patch.hook(model.condition_embedder.register_forward_hook(capture))
