"""The stepcache demo model's latent codec, as a diffusers component (the pipeline's ``vae``).

A fixed linear map, no training: each 4x4 RGB patch of a frame is the mean plus the first principal components
(scaled by their spread) of the demo's training clips. ``decode`` maps a latent (B, 16, T, h, w) to a video
(B, 3, T, 4h, 4w) in [-1, 1], one frame per latent frame, as ``WanPipeline`` expects of a VAE. The latent's last
channels are fixed ramps (a clock the transformer reads positions from), which decoding ignores.

Written into a pipeline folder by ``stepcache demo --save-pipeline DIR``; imports only torch and diffusers.
"""
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from torch.nn import functional as F


class DemoLinearCodec(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, components: int = 13, z_dim: int = 16, patch: int = 4, scale_factor_spatial: int = 4,
                 scale_factor_temporal: int = 1, latents_mean=None, latents_std=None):
        super().__init__()
        width = 3 * patch * patch
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("basis", torch.zeros(width, components))
        self.register_buffer("std", torch.ones(components))

    def decode(self, latents, return_dict=True):
        b, _, t, h, w = latents.shape
        patch = self.config.patch
        z = latents[:, : self.config.components].float().permute(0, 2, 3, 4, 1)  # (B, T, h, w, components)
        p = (z * self.std) @ self.basis.T + self.mean                               # (B, T, h, w, 3*patch*patch)
        x = p.permute(0, 1, 4, 2, 3).reshape(b * t, -1, h, w)
        x = F.pixel_shuffle(x, patch).reshape(b, t, 3, h * patch, w * patch)
        video = x.permute(0, 2, 1, 3, 4).clamp(0, 1) * 2 - 1
        return DecoderOutput(sample=video) if return_dict else (video,)
