"""The demo's fixed latent codec: a "linear VAE" with no training.

``encode``: pixel-unshuffle each frame by ``FACTOR`` (4x4x3 = 48 values per latent pixel), subtract the patch
mean and project on the first ``CHANNELS`` principal components of such patches, then divide by each
component's standard deviation, giving a Wan-like 16-channel latent at 1/4 of the resolution with roughly unit
variance. ``decode`` is the exact transpose (the projection is orthonormal), then pixel-shuffle; it loses only
what the 32 discarded components held (about 35 dB PSNR on the demo clips).

With a **clock** (``fit(..., clock=True)``, what the shipped model uses) the last latent channel is not a
principal component but a fixed ramp over the frames (-2 at the first frame to +2 at the last), the same at
every pixel; decoding ignores it. The diffusers Wan transformer has only relative (rotary) positions, so
without it nothing in a noisy latent says which frame comes first, and a model learns "moves horizontally"
but not "moves right" (a 5,600-step run without the clock read back the right axis almost always and the
right sign half the time). Wan2.1's own VAE is not time-homogeneous either: its first latent frame encodes
one frame, the others four.

The basis is fitted once, by :func:`fit`, on clips from :mod:`.scenes` drawn from a fixed seed, and then
stored with the model weights; it is never refitted when a model is loaded.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

FACTOR = 4
CHANNELS = 16


CLOCK_AMPLITUDE = 2.0


def clock_ramp(frames: int) -> torch.Tensor:
    return torch.linspace(-CLOCK_AMPLITUDE, CLOCK_AMPLITUDE, frames)


class LinearCodec:
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, std: torch.Tensor,
                 clock: torch.Tensor | None = None):
        self.mean = mean.float()     # (48,)
        self.basis = basis.float()   # (48, components), orthonormal columns
        self.std = std.float()       # (components,)
        self.clock = None if clock is None else clock.float()  # (frames,) or None

    @property
    def channels(self) -> int:
        return self.basis.shape[1] + (self.clock is not None)

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {"codec.mean": self.mean, "codec.basis": self.basis, "codec.std": self.std}
        if self.clock is not None:
            sd["codec.clock"] = self.clock
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "LinearCodec":
        return cls(sd["codec.mean"], sd["codec.basis"], sd["codec.std"], sd.get("codec.clock"))

    @staticmethod
    def patches(video: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> (B, T, H/4, W/4, 48)"""
        b, c, t, h, w = video.shape
        x = video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = F.pixel_unshuffle(x, FACTOR)                                  # (B*T, 48, h, w)
        return x.reshape(b, t, *x.shape[1:]).permute(0, 1, 3, 4, 2)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """RGB (B, 3, T, H, W) in [0, 1] -> latent (B, CHANNELS, T, H/4, W/4), about unit variance."""
        p = self.patches(video.float())
        z = (p - self.mean) @ self.basis / self.std
        z = z.permute(0, 4, 1, 2, 3)
        if self.clock is not None:
            b, _, t, h, w = z.shape
            z = torch.cat([z, self.clock.view(1, 1, t, 1, 1).expand(b, 1, t, h, w)], 1)
        return z.contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, CHANNELS, T, h, w) -> RGB (B, 3, T, 4h, 4w) clamped to [0, 1]."""
        b, _, t, h, w = latent.shape
        z = latent[:, : self.basis.shape[1]].float().permute(0, 2, 3, 4, 1)  # (B, T, h, w, C); no clock
        p = (z * self.std) @ self.basis.T + self.mean                      # (B, T, h, w, 48)
        x = p.permute(0, 1, 4, 2, 3).reshape(b * t, -1, h, w)
        x = F.pixel_shuffle(x, FACTOR).reshape(b, t, 3, h * FACTOR, w * FACTOR)
        return x.permute(0, 2, 1, 3, 4).clamp(0, 1)


def fit(clips: torch.Tensor, channels: int = CHANNELS, clock: bool = False) -> LinearCodec:
    """PCA of the 4x4x3 patches of ``clips`` (B, 3, T, H, W); float64 for a reproducible basis. The sign of
    each component is fixed so that its largest-magnitude entry is positive. With ``clock`` the latent has
    ``channels - 1`` components and the clock channel."""
    components = channels - 1 if clock else channels
    p = LinearCodec.patches(clips.double()).reshape(-1, 3 * FACTOR * FACTOR)
    mean = p.mean(0)
    cov = (p - mean).T @ (p - mean) / p.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:components]
    basis = evecs[:, order]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * signs
    std = evals[order].clamp_min(1e-8).sqrt()
    return LinearCodec(mean.float(), basis.float(), std.float(), clock_ramp(clips.shape[2]) if clock else None)
