"""PSNR and SSIM on batches of frames, with the published definitions (TeaCache/MagCache `common_metrics`).

Frames are RGB with values in [0, 1] (uint8 / 255), so the data range is 1 everywhere.

PSNR. Two definitions circulate, and they give different numbers whenever the error varies between frames:
  * psnr_frame_mean (TeaCache, MagCache): PSNR of each frame's MSE (over C x H x W), then the mean over frames.
  * psnr_video (EasyCache `tools/video_metrics.py`): PSNR of one MSE over every pixel of the whole video.
Both are capped at PSNR_CAP_DB when the MSE is below MSE_FLOOR, as the published per-frame code does; EasyCache's
code has no cap and returns inf for identical videos, which cannot be averaged.

SSIM. Per frame and per channel, then the mean over channels and frames: Gaussian window 11 x 11 with sigma 1.5
(cv2.getGaussianKernel), C1 = 0.01^2, C2 = 0.03^2. The published code filters with cv2.filter2D and then crops 5
pixels on every side, which keeps exactly the positions whose window lies inside the frame, so a "valid"
convolution here is the same computation and no border mode matters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PSNR_CAP_DB = 100.0
MSE_FLOOR = 1e-10

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
SSIM_C2 = 0.03 ** 2


def psnr_from_mse(mse: float) -> float:
    """10 * log10(1 / mse) for data range 1, capped at PSNR_CAP_DB."""
    return PSNR_CAP_DB if mse < MSE_FLOOR else 10.0 * math.log10(1.0 / mse)


def frame_squared_errors(reference: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """Sum of squared errors of each frame, in units of (1/255)^2, from uint8 frames (N, H, W, C).

    Integer arithmetic keeps it exact, so a test can check PSNR against a hand computation to the last digit and
    the two PSNR definitions can be derived from the same sums without rounding drift.
    """
    diff = reference.to(torch.int32) - generated.to(torch.int32)
    return (diff * diff).flatten(1).sum(1, dtype=torch.int64)


def gaussian_kernel_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA, dtype=torch.float64) -> torch.Tensor:
    """cv2.getGaussianKernel(size, sigma): exp(-(i - centre)^2 / (2 sigma^2)), normalised to sum 1."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
    return (kernel / kernel.sum()).to(dtype)


def ssim_per_frame(reference: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """SSIM of each frame; inputs are float tensors (N, C, H, W) in [0, 1], both at least 11 x 11."""
    n, c, h, w = reference.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {w}x{h}")
    # One grouped, separable convolution filters all five moments of all channels at once. Channels-last layout
    # makes that grouped convolution about 3x faster on CPU (oneDNN); frames decoded as (N, H, W, C) and permuted
    # are already in it, so this usually copies nothing.
    moments = torch.cat([reference, generated, reference * reference, generated * generated, reference * generated], 1)
    moments = moments.contiguous(memory_format=torch.channels_last)
    kernel = gaussian_kernel_1d(dtype=reference.dtype).to(reference.device)
    groups = moments.shape[1]
    filtered = F.conv2d(moments, kernel.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    filtered = F.conv2d(filtered, kernel.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu_x, mu_y, xx, yy, xy = filtered.split(c, dim=1)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    ssim_map = ((2 * mu_xy + SSIM_C1) * (2 * (xy - mu_xy) + SSIM_C2)) / (
        (mu_xx + mu_yy + SSIM_C1) * ((xx - mu_xx) + (yy - mu_yy) + SSIM_C2))
    # Every channel's map has the same size, so the mean of per-channel means is the mean over (C, H, W).
    return ssim_map.mean(dim=(1, 2, 3))
