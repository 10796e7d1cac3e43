"""Video input for `stepcache compare`: finding and pairing files, probing them, and decoding in lockstep chunks.

Decoding streams through imageio's ffmpeg reader (`iter_data`): a 129-frame 720p video is 357 MB of uint8 RGB,
and a reference plus a generated copy of it, as floats, would not fit comfortably, so no function here ever holds
more than one chunk of frames per video.
"""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import CompareError

# Containers that the generation runners and the published tools write; anything else in a folder (manifest.json,
# logs, prompt lists) is not a video and is ignored when pairing.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm")
# SSIM's window is 11 px, and AlexNet (LPIPS) needs 31 px to reach its last tap through two stride-2 poolings.
MIN_SIDE = 32


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    frames: int
    width: int
    height: int

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class VideoPair:
    name: str
    reference: Path
    generated: Path


def list_videos(folder: str | os.PathLike) -> dict[str, Path]:
    """Video files directly inside `folder`, by file name (sorted, so batch averaging is reproducible)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareError(f"{folder}: not a directory")
    videos = {p.name: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS}
    if not videos:
        raise CompareError(f"{folder}: no video files (looked for {', '.join(VIDEO_EXTENSIONS)})")
    return videos


def pair_folders(reference_dir, generated_dir, allow_missing: bool = False) -> tuple[list[VideoPair], dict]:
    """Pair videos by identical file name, as the published `common_metrics/eval.py` does.

    Returns the pairs and the unmatched names ({"only_in_reference": [...], "only_in_generated": [...]}).
    Any unmatched name is an error unless `allow_missing`, because a mean over a silent subset is not comparable
    with another run's mean; no common name at all is always an error.
    """
    reference, generated = list_videos(reference_dir), list_videos(generated_dir)
    common = sorted(reference.keys() & generated.keys())
    unmatched = {
        "only_in_reference": sorted(reference.keys() - generated.keys()),
        "only_in_generated": sorted(generated.keys() - reference.keys()),
    }
    has_unmatched = bool(unmatched["only_in_reference"] or unmatched["only_in_generated"])
    if not common or (has_unmatched and not allow_missing):
        lines = [f"no common file names between {reference_dir} and {generated_dir}" if not common else
                 f"file names differ between {reference_dir} and {generated_dir} "
                 f"({len(common)} in common; pass --allow-missing to compare only those)"]
        lines += _describe_names(f"only in {reference_dir}", unmatched["only_in_reference"])
        lines += _describe_names(f"only in {generated_dir}", unmatched["only_in_generated"])
        raise CompareError("\n".join(lines))
    return [VideoPair(n, reference[n], generated[n]) for n in common], unmatched


def _describe_names(title: str, names: list[str], limit: int = 20) -> list[str]:
    if not names:
        return []
    shown = [f"    {n}" for n in names[:limit]]
    if len(names) > limit:
        shown.append(f"    ... and {len(names) - limit} more")
    return [f"  {title} ({len(names)}):"] + shown


def probe(path: str | os.PathLike) -> VideoInfo:
    """Frame count and size of a video, and whether its stream decodes without errors.

    The whole video stream is decoded once (into ffmpeg's null output, which is cheap next to scoring): a damaged
    stream still yields frames, because the decoder conceals the broken macroblocks, and would be scored as if it
    were the video, so any error ffmpeg reports while decoding refuses the file, before anything is scored
    (``-xerror`` also turns a frame the decoder marks corrupt, only a warning otherwise, into an error). Damage
    that still parses as valid H.264 cannot be seen by any decoder (the stream has no checksums) and is not
    caught. `paired_chunks` re-checks the count it decodes itself.
    """
    path = Path(path)
    if not path.is_file():
        raise CompareError(f"{path}: no such file")
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-xerror", "-i", str(path), "-map", "0:v:0",
           "-f", "null", "-progress", "pipe:1", "-nostats", "-"]
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    counts = [line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("frame=")]
    if not counts:
        raise CompareError(f"{path}: cannot read video ({_ffmpeg_reason(done.stderr)})")
    errors = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    if errors or done.returncode != 0:
        first = _without_address(errors[0]) if errors else f"ffmpeg exit code {done.returncode}"
        raise CompareError(f"{path}: the video stream is damaged: decoding error {first!r}; its frames would be "
                           f"scored with the damage concealed, so it is refused: regenerate or re-encode the video")
    frames = int(counts[-1])
    width, height = _frame_size(path)
    if frames <= 0:
        raise CompareError(f"{path}: video has no frames")
    return VideoInfo(path, frames, width, height)


def _without_address(line: str) -> str:
    """ffmpeg's message without its '[h264 @ 0x55d...]' prefixes, which mean nothing to a user."""
    return re.sub(r"^(\[[^\]]*\]\s*)+", "", line)


def _ffmpeg_reason(stderr: str) -> str:
    # ffmpeg's last error line is the summary ("Invalid data found when processing input"); the ones above it
    # carry stream addresses that mean nothing to a user.
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1].split(": ", 1)[-1] if lines else "ffmpeg found no video stream"


def _open_reader(path: Path):
    import imageio

    try:
        return imageio.v2.get_reader(str(path), format="ffmpeg")
    except Exception as exc:  # imageio raises OSError, RuntimeError or ValueError depending on the failure
        raise CompareError(f"{path}: cannot read video ({str(exc).splitlines()[0]})") from None


def _frame_size(path: Path) -> tuple[int, int]:
    reader = _open_reader(path)
    try:
        width, height = reader.get_meta_data()["size"]
    finally:
        reader.close()
    return int(width), int(height)


def check_pair(reference: VideoInfo, generated: VideoInfo) -> None:
    """Refuse pairs that cannot be compared frame by frame; the published tools would crash or silently truncate."""
    problems = []
    if (reference.width, reference.height) != (generated.width, generated.height):
        problems.append(f"frame sizes differ: {reference.size} vs {generated.size}")
    if reference.frames != generated.frames:
        problems.append(f"frame counts differ: {reference.frames} vs {generated.frames}")
    if min(reference.width, reference.height, generated.width, generated.height) < MIN_SIDE:
        problems.append(f"frames smaller than {MIN_SIDE} px are not supported ({reference.size}, {generated.size})")
    if problems:
        raise CompareError(f"{reference.path} vs {generated.path}: " + "; ".join(problems))


def iter_chunks(path: Path, chunk_frames: int) -> Iterator[np.ndarray]:
    """Decoded frames of one video as uint8 arrays of shape (k, H, W, 3), k <= chunk_frames."""
    reader = _open_reader(path)
    try:
        buffer = []
        frames = reader.iter_data()
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                break
            except Exception as exc:  # a corrupt stream fails mid-way, inside ffmpeg's pipe reader
                raise CompareError(f"{path}: decoding failed after {len(buffer)} frames of this chunk "
                                   f"({str(exc).splitlines()[0]})") from None
            buffer.append(frame)
            if len(buffer) == chunk_frames:
                yield np.stack(buffer)
                buffer = []
        if buffer:
            yield np.stack(buffer)
    finally:
        reader.close()


def paired_chunks(pair: VideoPair, chunk_frames: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Both videos of a pair decoded in lockstep, chunk by chunk; raises CompareError when they diverge."""
    reference, generated = iter_chunks(pair.reference, chunk_frames), iter_chunks(pair.generated, chunk_frames)
    decoded = 0
    while True:
        a, b = next(reference, None), next(generated, None)
        if a is None and b is None:
            return
        if a is None or b is None or a.shape != b.shape:
            count_a = decoded + (0 if a is None else len(a)) + sum(len(c) for c in reference)
            count_b = decoded + (0 if b is None else len(b)) + sum(len(c) for c in generated)
            shape_a = "" if a is None else f"{a.shape[2]}x{a.shape[1]}"
            shape_b = "" if b is None else f"{b.shape[2]}x{b.shape[1]}"
            what = (f"decoded frame counts differ: {count_a} vs {count_b}" if count_a != count_b
                    else f"decoded frame sizes differ: {shape_a} vs {shape_b}")
            raise CompareError(f"{pair.reference} vs {pair.generated}: {what}")
        decoded += len(a)
        yield a, b
