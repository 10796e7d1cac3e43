"""PSNR, SSIM and per-video scoring on videos the tests write themselves (lossless, so numbers are exact)."""
import math

import numpy as np
import pytest
import torch
from eval_videos import add_noise, random_lpips_files, smooth_frames, write_video
from scipy import ndimage

from stepcache.eval import metrics
from stepcache.eval.lpips import load_lpips
from stepcache.eval.scoring import average, average_scores, score_pair
from stepcache.eval.video import VideoPair


def _pair(tmp_path, reference, generated) -> VideoPair:
    return VideoPair("v.mp4", write_video(tmp_path / "ref" / "v.mp4", reference),
                     write_video(tmp_path / "gen" / "v.mp4", generated))


def test_identical_videos_give_cap_ssim_one_lpips_zero(tmp_path):
    frames = smooth_frames()
    backbone, heads = random_lpips_files(tmp_path / "w")
    lpips = load_lpips("alex", backbone, heads)
    assert lpips.available
    scores = score_pair(_pair(tmp_path, frames, frames), lpips.scorer, chunk_frames=3)
    assert scores.frames == len(frames)
    assert scores.psnr_frame_mean == metrics.PSNR_CAP_DB == 100.0
    assert scores.psnr_video == 100.0
    assert scores.ssim == 1.0
    assert scores.lpips == 0.0


def test_known_offset_gives_hand_computed_psnr(tmp_path):
    frames = smooth_frames().clip(0, 250)
    scores = score_pair(_pair(tmp_path, frames, frames + 4))
    # Every value off by 4/255: MSE = (4/255)^2, so PSNR = 20 log10(255/4) = 36.0896 dB by either definition.
    expected = 20 * math.log10(255 / 4)
    assert scores.psnr_frame_mean == pytest.approx(expected, abs=1e-9)
    assert scores.psnr_video == pytest.approx(expected, abs=1e-9)
    assert expected == pytest.approx(36.0896, abs=1e-4)


def test_gaussian_noise_psnr_matches_array_computation(tmp_path):
    frames = smooth_frames()
    noisy = add_noise(frames, sigma=6.0)
    scores = score_pair(_pair(tmp_path, frames, noisy), chunk_frames=3)
    err = (frames.astype(np.float64) - noisy.astype(np.float64)) / 255
    per_frame = [10 * math.log10(1 / np.mean(e ** 2)) for e in err]
    assert scores.psnr_frames == pytest.approx(per_frame, abs=1e-9)
    assert scores.psnr_frame_mean == pytest.approx(np.mean(per_frame), abs=1e-9)
    assert scores.psnr_video == pytest.approx(10 * math.log10(1 / np.mean(err ** 2)), abs=1e-9)
    # sigma 6 of 255 before rounding and clipping: close to 20 log10(255/6) = 32.57 dB.
    assert scores.psnr_frame_mean == pytest.approx(20 * math.log10(255 / 6), abs=0.3)


def test_the_two_psnr_definitions_differ_when_error_varies_between_frames(tmp_path):
    frames = smooth_frames().clip(0, 239)
    generated = frames.copy()
    generated[:4] += 2    # half the frames off by 2/255, the other half by 16/255
    generated[4:] += 16
    scores = score_pair(_pair(tmp_path, frames, generated))
    frame_mean = (20 * math.log10(255 / 2) + 20 * math.log10(255 / 16)) / 2          # 33.08 dB
    video = 10 * math.log10(1 / (((2 / 255) ** 2 + (16 / 255) ** 2) / 2))              # 26.99 dB
    assert scores.psnr_frame_mean == pytest.approx(frame_mean, abs=1e-9)
    assert scores.psnr_video == pytest.approx(video, abs=1e-9)
    # The mean of logs exceeds the log of the mean: the per-frame definition flatters uneven errors.
    assert scores.psnr_frame_mean - scores.psnr_video > 6


def test_psnr_cap_applies_below_the_published_mse_floor():
    assert metrics.psnr_from_mse(0.0) == 100.0
    assert metrics.psnr_from_mse(9e-11) == 100.0
    assert metrics.psnr_from_mse(1e-4) == pytest.approx(40.0)


def _ssim_published_float64(a: np.ndarray, b: np.ndarray) -> float:
    """The published cv2 algorithm in float64 numpy/scipy: filter2D (reflect-101 border) then a 5 px crop."""
    x = np.arange(11) - 5
    g = np.exp(-(x ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    window = np.outer(g, g)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    values = []
    for ch in range(a.shape[-1]):
        img1, img2 = a[..., ch].astype(np.float64) / 255, b[..., ch].astype(np.float64) / 255
        filt = lambda img: ndimage.correlate(img, window, mode="mirror")[5:-5, 5:-5]  # mirror == BORDER_REFLECT_101
        mu1, mu2 = filt(img1), filt(img2)
        s1, s2, s12 = filt(img1 ** 2) - mu1 ** 2, filt(img2 ** 2) - mu2 ** 2, filt(img1 * img2) - mu1 * mu2
        ssim_map = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
        values.append(ssim_map.mean())
    return float(np.mean(values))


@pytest.mark.parametrize("sigma", [3.0, 25.0])
def test_ssim_matches_independent_float64_implementation(sigma):
    frames = smooth_frames(frames=3)
    noisy = add_noise(frames, sigma)
    to_tensor = lambda f: torch.from_numpy(f).permute(0, 3, 1, 2).float() / 255
    ours = metrics.ssim_per_frame(to_tensor(frames), to_tensor(noisy))
    reference = [_ssim_published_float64(a, b) for a, b in zip(frames, noisy)]
    assert ours.tolist() == pytest.approx(reference, abs=2e-6)


def test_chunk_size_does_not_change_any_number(tmp_path):
    frames = smooth_frames()
    pair = _pair(tmp_path, frames, add_noise(frames, 10.0))
    lpips = load_lpips("alex", *random_lpips_files(tmp_path / "w")).scorer
    one, many = score_pair(pair, lpips, chunk_frames=1), score_pair(pair, lpips, chunk_frames=5)
    assert one.psnr_frames == many.psnr_frames
    assert one.squared_error_total == many.squared_error_total
    assert one.ssim_frames == pytest.approx(many.ssim_frames, abs=1e-7)
    assert one.lpips_frames == pytest.approx(many.lpips_frames, abs=1e-7)


def test_video_mean_and_published_mean_of_batch_means():
    values = [1.0, 2.0, 3.0]
    assert average(values, "video") == 2.0
    assert average(values, "batch", batch_size=2) == (1.5 + 3.0) / 2   # the lone last video weighs half
    assert average(values, "batch", batch_size=16) == 2.0
    assert average([1.0, None], "video") is None


def test_average_scores_reports_every_metric(tmp_path):
    frames = smooth_frames(frames=4)
    scores = score_pair(_pair(tmp_path, frames, add_noise(frames, 8.0)))
    means = average_scores([scores])
    assert set(means) == {"psnr_frame_mean", "psnr_video", "ssim", "lpips", "psnr_frame_min"}
    assert means["lpips"] is None and means["psnr_frame_min"] == min(scores.psnr_frames)
