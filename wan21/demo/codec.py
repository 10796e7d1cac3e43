"""The demo's fixed latent codec: a "linear VAE" with no training.

``encode`` pixel-unshuffles each frame, projects the patches on their first ``CHANNELS`` principal components
and scales them to unit variance, giving a Wan-like 16-channel latent at 1/4 of the resolution; ``decode`` is
the exact transpose. With a ``clock``, the last channels are fixed ramps over the frames (``"t"``) and also
across width and height (``"txy"``, the shipped model's), which decoding ignores: the transformer has only
relative positions, and without them a model learns "moves horizontally" but not "moves right". The basis is
fitted once by :func:`fit`, stored with the weights, and never refitted.

Design notes: docs/demo.md#the-latent-codec
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

FACTOR = 4
CHANNELS = 16


CLOCK_AMPLITUDE = 2.0
CLOCK_MODES = ("t", "txy")


def clock_ramp(frames: int) -> torch.Tensor:
    return torch.linspace(-CLOCK_AMPLITUDE, CLOCK_AMPLITUDE, frames)


def clock_channels(mode: str, frames: int, height: int, width: int) -> torch.Tensor:
    """The fixed clock channels (K, frames, height, width) of ``mode`` ("t" or "txy")."""
    if mode not in CLOCK_MODES:
        raise ValueError(f"clock={mode!r} is not one of {CLOCK_MODES}")
    shape = (frames, height, width)
    ramps = [clock_ramp(frames).view(-1, 1, 1).expand(shape)]
    if mode == "txy":
        ramps += [clock_ramp(width).view(1, 1, -1).expand(shape), clock_ramp(height).view(1, -1, 1).expand(shape)]
    return torch.stack(ramps).contiguous()


class LinearCodec:
    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, std: torch.Tensor,
                 clock: torch.Tensor | None = None):
        self.mean = mean.float()     # (48,)
        self.basis = basis.float()   # (48, components), orthonormal columns
        self.std = std.float()       # (components,)
        if clock is not None and clock.dim() == 1:  # files from before "txy": one ramp over the frames
            clock = clock.view(1, -1, 1, 1)
        self.clock = None if clock is None else clock.float()  # (K, frames, h or 1, w or 1) or None

    @property
    def channels(self) -> int:
        return self.basis.shape[1] + (0 if self.clock is None else self.clock.shape[0])

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
            z = torch.cat([z, self.clock.expand(-1, t, h, w).unsqueeze(0).expand(b, -1, -1, -1, -1)], 1)
        return z.contiguous()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent (B, CHANNELS, T, h, w) -> RGB (B, 3, T, 4h, 4w) clamped to [0, 1]."""
        b, _, t, h, w = latent.shape
        z = latent[:, : self.basis.shape[1]].float().permute(0, 2, 3, 4, 1)  # (B, T, h, w, C); no clock
        p = (z * self.std) @ self.basis.T + self.mean                      # (B, T, h, w, 48)
        x = p.permute(0, 1, 4, 2, 3).reshape(b * t, -1, h, w)
        x = F.pixel_shuffle(x, FACTOR).reshape(b, t, 3, h * FACTOR, w * FACTOR)
        return x.permute(0, 2, 1, 3, 4).clamp(0, 1)


def fit(clips: torch.Tensor, channels: int = CHANNELS, clock: bool | str = False) -> LinearCodec:
    """PCA of the 4x4x3 patches of ``clips`` (B, 3, T, H, W); float64 for a reproducible basis. The sign of
    each component is fixed so that its largest-magnitude entry is positive. With ``clock`` ("t", or True for
    it, as older runs stored it; or "txy") the latent has that many fewer components and the clock channels."""
    mode = "t" if clock is True else (clock or None)
    b, _, t, h, w = clips.shape
    clock_tensor = None if mode is None else clock_channels(mode, t, h // FACTOR, w // FACTOR)
    components = channels - (0 if clock_tensor is None else clock_tensor.shape[0])
    p = LinearCodec.patches(clips.double()).reshape(-1, 3 * FACTOR * FACTOR)
    mean = p.mean(0)
    cov = (p - mean).T @ (p - mean) / p.shape[0]
    evals, evecs = torch.linalg.eigh(cov)
    order = torch.argsort(evals, descending=True)[:components]
    basis = evecs[:, order]
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * signs
    std = evals[order].clamp_min(1e-8).sqrt()
    if mode == "t":  # stored as one ramp, as the files of runs made before "txy" hold it
        clock_tensor = clock_ramp(t)
    return LinearCodec(mean.float(), basis.float(), std.float(), clock_tensor)
