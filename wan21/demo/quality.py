"""PSNR and SSIM of demo videos, with the project's metric functions (:mod:`stepcache.eval.metrics`)."""
from __future__ import annotations

import numpy as np
import torch


def psnr_ssim(reference: torch.Tensor, video: torch.Tensor) -> tuple[float, float]:
    """Frame-mean PSNR (TeaCache/MagCache definition, dB) and SSIM of two uint8 videos (T, H, W, 3)."""
    from stepcache.eval.metrics import frame_squared_errors, psnr_from_mse, ssim_per_frame
    sq = frame_squared_errors(reference, video).double()
    mse = sq / (reference[0].numel() * 255.0 ** 2)
    psnr = float(np.mean([psnr_from_mse(float(m)) for m in mse]))
    ref = reference.permute(0, 3, 1, 2).double() / 255
    gen = video.permute(0, 3, 1, 2).double() / 255
    return psnr, float(ssim_per_frame(ref, gen).mean())
