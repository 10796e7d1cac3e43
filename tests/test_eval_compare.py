"""`stepcache compare` end to end: both modes, the output files, the plot, and clear errors on bad input."""
import csv
import json
import re

import pytest
from eval_videos import add_noise, random_lpips_files, smooth_frames, write_video

from stepcache.cli import build_parser, main
from stepcache.eval.errors import CompareError
from stepcache.eval.manifest import Manifest, load_manifest, record_video, timing
from stepcache.eval.video import VideoPair, paired_chunks


@pytest.fixture
def folders(tmp_path):
    """gt/ with two videos, cached/ with a noisy copy of one and an exact copy of the other, and LPIPS files."""
    clips = {"a.mp4": smooth_frames(seed=1), "b.mp4": smooth_frames(seed=2)}
    for name, frames in clips.items():
        write_video(tmp_path / "gt" / name, frames)
    write_video(tmp_path / "cached" / "a.mp4", add_noise(clips["a.mp4"], 8.0))
    write_video(tmp_path / "cached" / "b.mp4", clips["b.mp4"])
    backbone, heads = random_lpips_files(tmp_path / "weights")
    return tmp_path, ["--lpips-weights", str(backbone), "--lpips-heads", str(heads)]


def _run(capsys, *argv):
    code = main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_folder_mode_with_published_flags_writes_json_and_csv(folders, capsys):
    root, lpips_flags = folders
    code, out, err = _run(capsys, "--gt_video_dir", root / "gt", "--generated_video_dir", root / "cached",
                          "--out", root / "report", *lpips_flags)
    assert code == 0, err
    assert "Mean over videos (per-video mean)" in out and "a.mp4" in out
    report = json.loads((root / "report" / "metrics.json").read_text())
    run = report["runs"][0]
    by_name = {v["video"]: v for v in run["videos"]}
    assert by_name["b.mp4"]["psnr_frame_mean"] == by_name["b.mp4"]["psnr_video"] == 100.0
    assert by_name["b.mp4"]["ssim"] == 1.0 and by_name["b.mp4"]["lpips"] == 0.0
    assert 25 < by_name["a.mp4"]["psnr_frame_mean"] < 40 and by_name["a.mp4"]["lpips"] > 0
    assert len(by_name["a.mp4"]["per_frame"]["psnr"]) == 8
    assert run["mean"]["psnr_frame_mean"] == pytest.approx((by_name["a.mp4"]["psnr_frame_mean"] + 100) / 2)
    assert report["lpips"]["status"] == "ok" and report["headline_psnr"] == "psnr_frame_mean"
    rows = list(csv.DictReader((root / "report" / "metrics.csv").open()))
    assert [r["video"] for r in rows] == ["a.mp4", "b.mp4"]
    assert float(rows[0]["ssim"]) == pytest.approx(by_name["a.mp4"]["ssim"])
    summary = list(csv.DictReader((root / "report" / "summary.csv").open()))
    assert len(summary) == 1 and summary[0]["videos"] == "2"
    assert not (root / "report" / "speedup_vs_quality.png").exists()  # no manifest, no plot


def test_pair_mode_with_dash_aliases(folders, capsys):
    root, lpips_flags = folders
    code, out, _ = _run(capsys, "--original-video", root / "gt" / "a.mp4", "--generated-video",
                        root / "cached" / "a.mp4", "--psnr", "video", *lpips_flags)
    assert code == 0
    header = out.splitlines()[0]
    assert header.index("PSNR video") < header.index("PSNR frame-mean")  # headline first
    assert "Mean over videos" not in out


def test_lpips_missing_still_reports_other_metrics(folders, capsys, monkeypatch, tmp_path):
    root, _ = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))
    monkeypatch.delenv("LPIPS_BACKBONE_PATH", raising=False)
    code, out, err = _run(capsys, "--gt-video-dir", root / "gt", "--generated-video-dir", root / "cached",
                          "--out", root / "report")
    assert code == 0
    assert "alexnet-owt-7be5be79.pth" in err and (out + err).count("LPIPS skipped") == 1
    report = json.loads((root / "report" / "metrics.json").read_text())
    assert report["lpips"]["status"] == "skipped" and report["runs"][0]["mean"]["lpips"] is None
    assert report["runs"][0]["mean"]["ssim"] > 0.9


def test_manifests_give_speedups_and_a_plot_for_several_runs(folders, capsys):
    root, lpips_flags = folders
    write_video(root / "fast" / "a.mp4", add_noise(smooth_frames(seed=1), 20.0))
    write_video(root / "fast" / "b.mp4", add_noise(smooth_frames(seed=2), 20.0))
    baseline = Manifest("none")
    for name in ("a.mp4", "b.mp4"):
        baseline.add_video(name, seconds=100.0, computed_passes=50, total_passes=50)
    baseline.save(root / "gt")
    for folder, seconds, computed in (("cached", 50.0, 25), ("fast", 25.0, 12)):
        manifest = Manifest("teacache", params={"l1": 0.1 if folder == "cached" else 0.2})
        for name in ("a.mp4", "b.mp4"):
            manifest.add_video(name, seconds=seconds, computed_passes=computed, total_passes=50)
        manifest.save(root / folder)
    code, out, err = _run(capsys, "--gt_video_dir", root / "gt", "--generated_video_dir", root / "cached",
                          root / "fast", "--out", root / "report", "--averaging", "batch", "--batch-size", "1",
                          *lpips_flags)
    assert code == 0, err
    report = json.loads((root / "report" / "metrics.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["teacache l1=0.1", "teacache l1=0.2"]
    assert [r["timing"]["speedup"] for r in report["runs"]] == [2.0, 4.0]
    assert report["runs"][1]["timing"]["pass_speedup"] == pytest.approx(50 / 12)
    assert report["runs"][0]["mean"]["psnr_frame_mean"] > report["runs"][1]["mean"]["psnr_frame_mean"]
    assert report["averaging"] == {"method": "batch", "batch_size": 1}
    assert "mean of batch means, batch size 1" in out and "4.00x" in out
    plot = root / "report" / "speedup_vs_quality.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timing_uses_each_sides_own_file_name_in_pair_mode():
    reference, generated = Manifest("none"), Manifest("easycache")
    reference.add_video("base.mp4", 90.0)
    generated.add_video("fast.mp4", 30.0)
    assert timing(reference, generated, [("base.mp4", "fast.mp4")])["speedup"] == 3.0
    generated.baseline_seconds = 60.0
    assert timing(None, generated, [("base.mp4", "fast.mp4")])["speedup"] == 2.0
    assert timing(reference, None, [("base.mp4", "fast.mp4")]) == {}


def test_record_video_builds_the_manifest_the_runners_share(tmp_path):
    record_video(tmp_path, "a.mp4", method="magcache", params={"thresh": 0.12}, seconds=40.0, dit_seconds=35.5,
                 computed_passes=21, total_passes=50)
    record_video(tmp_path, "b.mp4", method="magcache", params={"thresh": 0.12}, seconds=42.0)
    manifest = load_manifest(tmp_path)
    assert manifest.display_label == "magcache thresh=0.12"
    assert manifest.videos["a.mp4"].computed_passes == 21 and manifest.videos["b.mp4"].dit_seconds is None
    with pytest.warns(UserWarning, match="own folder"):
        record_video(tmp_path, "c.mp4", method="teacache", params={}, seconds=30.0)
    assert set(load_manifest(tmp_path).videos) == {"a.mp4", "b.mp4", "c.mp4"}


def _assert_refused(capsys, out_dir, *argv):
    code, out, err = _run(capsys, *argv, "--out", out_dir, "--no-lpips")
    assert code == 2
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out_dir.exists(), "nothing may be written for bad input"
    return err


def test_no_common_file_names_lists_the_mismatches(folders, capsys):
    root, _ = folders
    write_video(root / "other" / "c.mp4", smooth_frames(seed=1))
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "gt",
                          "--generated_video_dir", root / "other")
    assert "no common file names" in err
    assert re.search(r"only in .*gt \(2\):\s+a\.mp4\s+b\.mp4", err)
    assert re.search(r"only in .*other \(1\):\s+c\.mp4", err)


def test_partial_overlap_needs_allow_missing(folders, capsys):
    root, _ = folders
    write_video(root / "half" / "a.mp4", smooth_frames(seed=1))
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "gt", "--generated_video_dir",
                          root / "half")
    assert "--allow-missing" in err and "b.mp4" in err
    code, _, _ = _run(capsys, "--gt_video_dir", root / "gt", "--generated_video_dir", root / "half",
                      "--allow-missing", "--no-lpips", "--out", root / "report")
    assert code == 0
    report = json.loads((root / "report" / "metrics.json").read_text())
    assert report["runs"][0]["unmatched"]["only_in_reference"] == ["b.mp4"]


def test_different_frame_counts_and_sizes_say_which(folders, capsys):
    root, _ = folders
    write_video(root / "bad" / "a.mp4", smooth_frames(frames=6, seed=1))
    write_video(root / "bad" / "b.mp4", smooth_frames(height=48, seed=2))
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "gt", "--generated_video_dir",
                          root / "bad")
    assert "2 problem(s)" in err
    assert re.search(r"gt/a\.mp4 vs .*bad/a\.mp4: frame counts differ: 8 vs 6", err)
    assert re.search(r"gt/b\.mp4 vs .*bad/b\.mp4: frame sizes differ: 96x64 vs 96x48", err)


def test_tiny_frames_are_refused(tmp_path, capsys):
    for side in ("x", "y"):
        write_video(tmp_path / side / "v.mp4", smooth_frames(frames=2, height=16, width=24))
    err = _assert_refused(capsys, tmp_path / "report", "--gt_video_dir", tmp_path / "x", "--generated_video_dir",
                          tmp_path / "y")
    assert "frames smaller than 32 px are not supported (24x16, 24x16)" in err


def test_unreadable_file_is_named(folders, capsys):
    root, _ = folders
    (root / "cached" / "b.mp4").write_bytes(b"this is not a video")
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "gt", "--generated_video_dir",
                          root / "cached")
    assert re.search(r"cached/b\.mp4: cannot read video \(.+\)", err)


def test_empty_or_missing_folder(folders, capsys):
    root, _ = folders
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("no videos here")
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "gt", "--generated_video_dir",
                          root / "empty")
    assert "empty: no video files" in err
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "nowhere", "--generated_video_dir",
                          root / "cached")
    assert "nowhere: not a directory" in err


def test_missing_pair_file_and_mixed_modes(folders, capsys):
    root, _ = folders
    err = _assert_refused(capsys, root / "report", "--original_video", root / "gt" / "a.mp4",
                          "--generated_video", root / "nope.mp4")
    assert "nope.mp4: no such file" in err
    err = _assert_refused(capsys, root / "report", "--original_video", root / "gt" / "a.mp4",
                          "--gt_video_dir", root / "gt")
    assert "choose one mode" in err
    err = _assert_refused(capsys, root / "report")
    assert "nothing to compare" in err


def test_bad_manifest_is_refused(folders, capsys):
    root, _ = folders
    (root / "cached" / "manifest.json").write_text('{"method": "x", "videos": {"a.mp4": {"seconds": -1}}}')
    err = _assert_refused(capsys, root / "report", "--gt_video_dir", root / "gt", "--generated_video_dir",
                          root / "cached")
    assert "manifest.json: not a valid timing manifest" in err


def test_decoded_count_mismatch_is_caught_even_past_the_probe(tmp_path):
    pair = VideoPair("v.mp4", write_video(tmp_path / "a.mp4", smooth_frames(frames=8)),
                     write_video(tmp_path / "b.mp4", smooth_frames(frames=5)))
    with pytest.raises(CompareError, match="decoded frame counts differ: 8 vs 5"):
        for _ in paired_chunks(pair, chunk_frames=3):
            pass


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser("compare")
    compare_parser = next(a for a in parser._actions if a.dest == "command").choices["compare"]
    for action in compare_parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
        for flag in action.option_strings:
            assert flag in text
    for flag in ("--gt_video_dir", "--generated_video_dir", "--original_video", "--generated_video"):
        assert flag in text
    assert "alexnet-owt-7be5be79.pth" in text and "capped at 100 dB" in text

