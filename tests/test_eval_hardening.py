"""`stepcache compare` on damaged input: a video whose stream has decoding errors is refused, not scored; the
LPIPS-skipped message is said once."""
from pathlib import Path

import pytest
from eval_videos import smooth_frames

from stepcache.cli import main

FLIPPED_BYTES = 400


def _demo_mp4(path: Path, frames) -> Path:
    """An mp4 as `stepcache demo` writes its videos (H.264, yuv420p), with the demo's own writer."""
    from stepcache.wan21.demo.run import _write_mp4
    return _write_mp4(path, frames)


def _flip_middle(path: Path, count: int = FLIPPED_BYTES) -> Path:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def damaged_pair(tmp_path):
    # H.264 has no checksums: some damage parses as a valid stream and no decoder can see it. These frames and
    # this flip give damage ffmpeg reports (it conceals it and would hand out 16 frames all the same).
    frames = smooth_frames(frames=16, height=128, width=128, seed=1)
    reference = _demo_mp4(tmp_path / "gt" / "clip.mp4", frames)
    damaged = _flip_middle(_demo_mp4(tmp_path / "damaged" / "clip.mp4", frames))
    return tmp_path, reference, damaged


def test_a_stream_with_decoding_errors_is_refused_with_its_name(damaged_pair, capsys):
    root, reference, damaged = damaged_pair
    code = main(["compare", "--original_video", str(reference), "--generated_video", str(damaged), "--no-lpips",
                 "--out", str(root / "report")])
    out, err = capsys.readouterr()
    assert code == 2, out
    assert f"{damaged}: the video stream is damaged: decoding error" in err
    assert "Traceback" not in err and "PSNR" not in out
    assert not (root / "report").exists()


def test_folder_mode_names_the_damaged_file_and_not_the_whole_one(damaged_pair, capsys):
    root, reference, damaged = damaged_pair
    code = main(["compare", "--gt_video_dir", str(reference.parent), "--generated_video_dir", str(damaged.parent),
                 "--no-lpips"])
    err = capsys.readouterr().err
    assert code == 2
    assert "1 problem(s)" in err and str(damaged) in err and f"{reference}:" not in err


def test_the_same_video_undamaged_is_still_scored(damaged_pair, capsys):
    _, reference, _ = damaged_pair
    code = main(["compare", "--original_video", str(reference), "--generated_video", str(reference), "--no-lpips"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "100.00" in out


@pytest.mark.parametrize("how", ["missing weights", "--no-lpips"])
def test_lpips_skipped_is_said_once(damaged_pair, capsys, monkeypatch, tmp_path, how):
    _, reference, _ = damaged_pair
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))
    monkeypatch.delenv("LPIPS_BACKBONE_PATH", raising=False)
    flags = ["--no-lpips"] if how == "--no-lpips" else []
    code = main(["compare", "--original_video", str(reference), "--generated_video", str(reference), *flags])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert (out + err).count("LPIPS skipped") == 1, out + err
    if how == "missing weights":
        assert "alexnet-owt-7be5be79.pth" in err
