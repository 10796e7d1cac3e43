"""What every diffusers video transformer adapter shares: the call and return conventions of diffusers'
``*Transformer3DModel`` forwards (``hidden_states`` first, a ``Transformer2DModelOutput`` or a tuple out, a VAE
that downsamples height and width by 8). A model's adapter subclasses this and adds what is its own."""
from __future__ import annotations

from typing import Any

import torch

from .profiles import match_profiles


def call_arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    """A forward argument given positionally at ``index`` or by keyword ``name``."""
    return args[index] if len(args) > index else kwargs.get(name, default)


class DiffusersTransformerAdapter:
    family: str
    vae_spatial_scale = 8
    return_dict_index: int  # the position of ``return_dict`` in the model's forward signature
    config_keys: tuple[str, ...] = ()  # the config entries that identify the model, for messages

    def latent_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor:
        # Image-to-video variants append condition channels after the latent; the output has none of them.
        return call_arg(args, kwargs, 0, "hidden_states")[:, : model.config.out_channels]

    can_split_batch = True  # every batch-first tensor argument belongs to one video

    def videos_in_batch(self, latent: torch.Tensor) -> int:
        return latent.shape[0]

    def split_batch(self, args: tuple, kwargs: dict, videos: int) -> list[tuple[tuple, dict]]:
        """The call's arguments for each video alone: every tensor with the batch as its first dimension."""
        def part(value, i):
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == videos:
                return value[i: i + 1]
            return value
        return [(tuple(part(a, i) for a in args), {k: part(v, i) for k, v in kwargs.items()})
                for i in range(videos)]

    def timestep_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor | None:
        return call_arg(args, kwargs, 1, "timestep")

    def pixel_size(self, model, args: tuple, kwargs: dict) -> tuple[int, int]:
        latent = call_arg(args, kwargs, 0, "hidden_states")
        return latent.shape[-2] * self.vae_spatial_scale, latent.shape[-1] * self.vae_spatial_scale

    def output_latent(self, output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output.sample

    def build_output(self, model, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if not call_arg(args, kwargs, self.return_dict_index, "return_dict", True):
            return (latent,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=latent)

    def describe_config(self, model) -> dict[str, Any]:
        return {k: model.config.get(k) for k in self.config_keys}

    def detect_profiles(self, model):
        return match_profiles(self.family, dict(model.config), type(model).__name__)
