"""Helpers shared by tests/test_eval_*.py: small videos and fake LPIPS weight files made on the spot.

Not a conftest.py on purpose: the other test files of the project do not need these, so they are imported
explicitly (`from eval_videos import ...`; pytest puts tests/ on sys.path for rootdir-less test folders).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FRAMES, HEIGHT, WIDTH = 8, 64, 96


def smooth_frames(frames: int = FRAMES, height: int = HEIGHT, width: int = WIDTH, seed: int = 0) -> np.ndarray:
    """A moving colour gradient with texture: (T, H, W, 3) uint8, different in every frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    texture = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for t in range(frames):
        base = np.stack([128 + 100 * np.sin((x + 3 * t) / 9), 128 + 100 * np.cos((y - 2 * t) / 7),
                         (x + y + 5 * t) % 256], axis=-1)
        out[t] = np.clip(base + texture, 0, 255).astype(np.uint8)
    return out


def write_video(path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write losslessly (libx264rgb, crf 0: decoded frames equal `frames` bit for bit), so exact numbers hold."""
    import imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio.v2.get_writer(str(path), format="ffmpeg", fps=fps, codec="libx264rgb", pixelformat="rgb24",
                                   ffmpeg_params=["-crf", "0"], macro_block_size=1, ffmpeg_log_level="error")
    for frame in frames:
        writer.append_data(frame)
    writer.close()
    return path


def add_noise(frames: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(frames.astype(np.float64) + rng.normal(0, sigma, frames.shape), 0, 255).round().astype(np.uint8)


def random_lpips_files(folder, net: str = "alex", seed: int = 0) -> tuple[Path, Path]:
    """A random backbone in torchvision's checkpoint layout and random heads in lpips' layout.

    Random weights exercise every code path (loading, taps, heads, reduction) with no download; the numbers are
    not real LPIPS values, which is all the tests need.
    """
    from stepcache.eval.lpips import BACKBONE_FILES, TAP_CHANNELS, backbone_features

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    backbone = folder / BACKBONE_FILES[net]
    torch.save({f"features.{k}": v for k, v in backbone_features(net).state_dict().items()}, backbone)
    heads = folder / f"{net}_heads.pth"
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(TAP_CHANNELS[net])}, heads)
    return backbone, heads
