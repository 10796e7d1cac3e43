"""Scores of one video pair, computed chunk by chunk, and the two ways to average them over a folder.

Averaging over videos (choose with --averaging):
  * "video": the plain mean of the per-video numbers; every video weighs the same.
  * "batch": the published `common_metrics/eval.py` "mean of batch means". Videos (sorted by file name) are cut
    into batches of `batch_size`; a batch's mean is the mean of its videos' numbers (equal to the published
    frame-index-then-frame averaging, since all videos of a batch have the same frame count there); the result is
    the mean of the batch means, so the videos of a smaller last batch weigh more than the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from . import metrics
from .video import VideoPair, paired_chunks

METRIC_KEYS = ("psnr_frame_mean", "psnr_video", "ssim", "lpips")


@dataclass
class VideoScores:
    name: str
    width: int
    height: int
    psnr_frames: list[float] = field(default_factory=list)
    ssim_frames: list[float] = field(default_factory=list)
    lpips_frames: list[float] | None = field(default_factory=list)
    squared_error_total: int = 0  # in units of (1/255)^2, summed over every pixel and channel of the video

    @property
    def frames(self) -> int:
        return len(self.psnr_frames)

    @property
    def psnr_frame_mean(self) -> float:
        return float(np.mean(self.psnr_frames))

    @property
    def psnr_video(self) -> float:
        values = self.frames * self.height * self.width * 3
        return metrics.psnr_from_mse(self.squared_error_total / (values * 255.0 ** 2))

    @property
    def ssim(self) -> float:
        return float(np.mean(self.ssim_frames))

    @property
    def lpips(self) -> float | None:
        return float(np.mean(self.lpips_frames)) if self.lpips_frames else None

    def summary(self) -> dict:
        return {"video": self.name, "frames": self.frames, "width": self.width, "height": self.height,
                **{key: getattr(self, key) for key in METRIC_KEYS},
                "psnr_frame_min": float(np.min(self.psnr_frames))}

    def per_frame(self) -> dict:
        return {"psnr": self.psnr_frames, "ssim": self.ssim_frames, "lpips": self.lpips_frames}


def score_pair(pair: VideoPair, lpips_scorer=None, chunk_frames: int = 8, device="cpu") -> VideoScores:
    """PSNR (both definitions), SSIM and, given a scorer, LPIPS of one pair, holding one chunk of frames at a time."""
    scores: VideoScores | None = None
    for reference, generated in paired_chunks(pair, chunk_frames):
        ref_u8 = torch.from_numpy(reference).to(device)
        gen_u8 = torch.from_numpy(generated).to(device)
        if scores is None:
            scores = VideoScores(pair.name, width=reference.shape[2], height=reference.shape[1],
                                 lpips_frames=[] if lpips_scorer is not None else None)
        errors = metrics.frame_squared_errors(ref_u8, gen_u8).tolist()
        values_per_frame = reference[0].size * 255.0 ** 2
        scores.squared_error_total += sum(errors)
        scores.psnr_frames += [metrics.psnr_from_mse(e / values_per_frame) for e in errors]

        ref = ref_u8.permute(0, 3, 1, 2).float().div_(255)
        gen = gen_u8.permute(0, 3, 1, 2).float().div_(255)
        scores.ssim_frames += metrics.ssim_per_frame(ref, gen).tolist()
        if lpips_scorer is not None:
            scores.lpips_frames += lpips_scorer(ref * 2 - 1, gen * 2 - 1).tolist()
    assert scores is not None, "probe() guarantees at least one frame"
    return scores


def average(values: list[float | None], averaging: str = "video", batch_size: int = 16) -> float | None:
    """Mean over videos by the chosen definition (see the module docstring); None if any value is missing."""
    if not values or any(v is None for v in values):
        return None
    if averaging == "video":
        return float(np.mean(values))
    if averaging == "batch":
        batches = [values[i:i + batch_size] for i in range(0, len(values), batch_size)]
        return float(np.mean([np.mean(b) for b in batches]))
    raise ValueError(f"unknown averaging {averaging!r}")


def average_scores(videos: list[VideoScores], averaging: str = "video", batch_size: int = 16) -> dict:
    """The folder-level number of every metric, by the chosen averaging."""
    means = {key: average([getattr(v, key) for v in videos], averaging, batch_size) for key in METRIC_KEYS}
    means["psnr_frame_min"] = min((float(np.min(v.psnr_frames)) for v in videos), default=math.nan)
    return means
