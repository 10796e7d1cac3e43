"""Hardening of `stepcache demo` and the demo model tools (issue 15): bad input, passes counted from what ran,
the output folder replaced whole, Ctrl-C, timing spread and noise, failed-check reasons, the side-by-side
video, the training checkpoint loader and the calibrate hint. Runs on the shipped weights with few steps."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stepcache.wan21.demo import model as demo_model
from stepcache.wan21.demo import run as demo_run
from stepcache.wan21.demo import scenes

needs_weights = pytest.mark.skipif(not (demo_model.WEIGHTS.exists() and demo_model.PROFILE.exists()),
                                   reason=f"no shipped demo weights and profile at {demo_model.WEIGHTS.parent}")
QUICK = ["--num-prompts", "1", "--repeats", "1", "--no-progress"]
PROMPT = "a red disc moving right on a dark background"


def demo(capsys, *argv):
    """`stepcache demo ARGV` in this process: (exit code, stdout, stderr)."""
    from stepcache.cli import main
    code = main(["demo", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("argv, says", [
    (["--steps", "0"], "--steps 0"),
    (["--steps", "-3"], "--steps -3"),
    (["--num-prompts", "0"], "--num-prompts 0"),
    (["--num-prompts", "4"], "only 3 prompts"),
    (["--threads", "0"], "--threads 0"),
    (["--repeats", "0"], "--repeats 0"),
    (["--guidance", "0.5"], "--guidance 0.5"),
    (["--presets", "turbo"], "'turbo' for teacache in wan2.1-demo-tiny.json; choose from slow, medium, fast"),
    (["--presets", ","], "--presets ',' names nothing"),
    (["--methods", "fastcache"], "choose from teacache, magcache, easycache"),
    (["--prompts", "a purple blob"], "must name a colour"),
    (["--weights", "no-such-file.safetensors"], "no demo model file there"),
    (["--profile", "no-such-profile.json"], "no profile file there"),
])
def test_bad_input_is_one_line_and_exit_2_before_any_model_work(argv, says, capsys, tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(demo_model, "load", no_model)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code, out, err = demo(capsys, *argv, "--out", tmp_path / "out")
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("stepcache demo: error: ") and says in err, err
    assert "Traceback" not in err and time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()


def test_out_naming_a_file_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(demo_model, "load", lambda *a, **k: pytest.fail("model loaded"))
    target = tmp_path / "report.txt"
    target.write_text("mine")
    code, _, err = demo(capsys, "--out", target)
    assert code == 2 and "is a file; give a folder" in err and err.count("\n") == 1
    assert target.read_text() == "mine"


def test_help_describes_the_backgrounds_the_code_draws(capsys):
    from stepcache.cli import main
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    names = f"{scenes.BACKGROUNDS[0]}, {scenes.BACKGROUNDS[1]} or {scenes.BACKGROUNDS[2]}"
    description, options = text.split("options:")
    assert f"{names} background" in description and f"{names} background" in options
    assert "grey background" not in text
    assert all(c in options for c in scenes.COLOUR_NAMES) and all(d in options for d in scenes.DIRECTION_NAMES)


# --------------------------------------------------------------------------------------------- passes, CFG
@needs_weights
@pytest.mark.parametrize("guidance, per_step", [("1.0", 1), ("2.5", 2)])
def test_passes_are_counted_from_what_ran(guidance, per_step, capsys, tmp_path):
    steps = 8
    code, out, _ = demo(capsys, "--guidance", guidance, "--steps", steps, "--presets", "medium,fast",
                        "--no-videos", *QUICK, "--out", tmp_path / "d")
    assert code in (0, 1)
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    uncached = report["uncached"]["total_passes"]
    assert uncached == per_step * steps and f"for {uncached} passes ({per_step} per step" in out
    for by_preset in report["methods"].values():
        for e in by_preset.values():
            assert e["total_passes"] == uncached
            assert e["ideal_speedup"] == pytest.approx(uncached / e["computed_passes"])
            twin = e["fewer_steps"]
            assert twin["steps"] == max(1, round(e["computed_passes"] / per_step))
            assert twin["total_passes"] == twin["computed_passes"] == per_step * twin["steps"]


# ------------------------------------------------------------------------------ one run's output, written once
@needs_weights
def test_out_folder_holds_exactly_one_runs_output(capsys, tmp_path):
    out = tmp_path / "demo"
    stale = out / "videos" / "0-old-prompt" / "steps-99.mp4"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    (out / "report.json").write_text('{"old": true}')
    steps = 6  # EasyCache's medium warm-up (6 steps) covers the run: its twin has as many steps as uncached
    code, _, _ = demo(capsys, "--steps", steps, "--methods", "easycache,magcache", "--presets", "medium",
                      *QUICK, "--out", out)
    assert code in (0, 1)
    report = json.loads((out / "report.json").read_text())
    assert "old" not in report
    referenced = {"report.json", "side_by_side.mp4", "patterns.png"}
    for entry in [report["methods"][m]["medium"] for m in report["methods"]]:
        for e in (entry, entry["fewer_steps"]):
            referenced |= {p["video"] for p in e["per_prompt"]}
    assert tree(out) == referenced
    assert not [p for p in tmp_path.iterdir() if p.name != "demo"]  # no temporary folder left beside it
    # a fewer-steps twin with the uncached run's step count is that run: one file, reported as the same run
    same = [e["fewer_steps"] for by in report["methods"].values() for e in by.values()
            if e["fewer_steps"]["steps"] == steps]
    assert same and all(t["same_run_as"] == "uncached" for t in same)
    assert all(p["video"].endswith("/uncached.mp4") for t in same for p in t["per_prompt"])
    assert not any(name.endswith(f"steps-{steps}.mp4") for name in tree(out))


@needs_weights
def test_interrupt_while_writing_keeps_the_earlier_run_and_exits_130(capsys, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.json").write_text('{"earlier": true}')
    written = []

    def interrupted(path, frames):
        written.append(path)
        if len(written) == 3:
            raise KeyboardInterrupt
        return real(path, frames)

    real = demo_run._write_mp4
    monkeypatch.setattr(demo_run, "_write_mp4", interrupted)
    code, _, err = demo(capsys, "--steps", 4, "--methods", "magcache", "--presets", "medium", *QUICK, "--out", out)
    assert code == 130 and err.strip().splitlines() == ["stepcache demo: interrupted; no partial output was kept"]
    assert tree(out) == {"report.json"} and json.loads((out / "report.json").read_text()) == {"earlier": True}
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def _interrupt(cmd: list[str], cwd: Path, started: str) -> subprocess.CompletedProcess:
    """Run ``cmd``, send it SIGINT once ``started`` shows on its stderr, and wait for it."""
    err_path = cwd / "stderr.txt"
    with err_path.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=err, text=True)
        deadline = time.monotonic() + 240
        while started not in err_path.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err_path.read_text())


@needs_weights
@pytest.mark.parametrize("command, started, product", [
    (["demo", "--steps", "30", "--num-prompts", "1", "--out", "demo"], "stepcache demo:", "demo"),
    # enough pairs that the run is still calibrating when the interrupt comes, however fast the machine is
    (["calibrate", "--model", "demo", "--prompt", PROMPT, "--seeds", *map(str, range(12)), "--steps", "50",
      "--out", "p.json"], "calibrating:", "p.json"),
])
def test_ctrl_c_is_one_line_exit_130_and_leaves_nothing(command, started, product, tmp_path):
    result = _interrupt([sys.executable, "-m", "stepcache.cli", *command], tmp_path, started)
    assert result.returncode == 130, result.stderr[-2000:]
    assert result.stderr.rstrip().endswith(f"stepcache {command[0]}: interrupted; no partial output was kept")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stderr.txt"], product


# ---------------------------------------------------------------------------------------------------- timing
@needs_weights
def test_cpu_clock_spread_and_noise_are_reported(capsys, tmp_path):
    code, out, _ = demo(capsys, "--clock", "cpu", "--repeats", "2", "--steps", 6, "--methods", "magcache",
                        "--presets", "medium", "--num-prompts", "1", "--no-progress", "--no-videos",
                        "--out", tmp_path / "d")
    assert code in (0, 1)
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["settings"]["clock"] == "cpu"
    repeats = report["uncached"]["seconds_per_repeat"]
    assert len(repeats) == 2 and report["uncached"]["seconds"] <= min(repeats)
    assert f"repeats {min(repeats):.2f}-{max(repeats):.2f} s" in out
    assert "timing: CPU time of this process, fastest of 2 repeats" in out and "differed by up to" in out
    # a wall speedup above the ideal one is called noise, never printed as a speed
    entry = report["methods"]["magcache"]["medium"]
    entry["wall_speedup"], entry["wall_is_noise"] = entry["ideal_speedup"] * 1.5, True
    table = demo_run.format_table(report)
    row = next(line for line in table.splitlines() if line.startswith("magcache"))
    assert f"{entry['wall_speedup']:.2f}x" not in row and " noise " in row
    assert f"up to {entry['wall_speedup']:.2f}x against {entry['ideal_speedup']:.2f}x" in table
    assert "timing noise" in table


# ----------------------------------------------------------------------------------------------- the check
@needs_weights
def test_failed_check_says_why_and_exits_1(capsys, tmp_path):
    # at 6 steps EasyCache's medium warm-up (6 steps) covers the whole run: it reuses nothing
    code, out, err = demo(capsys, "--steps", 6, "--methods", "easycache", "--presets", "medium", "--no-videos",
                          *QUICK, "--out", tmp_path / "d")
    assert code == 1
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["medium_check"]["ok"] is False
    assert "check (at medium: reuse >= 25% of passes and PSNR > 25.0 dB against uncached): FAILED" in out
    assert ("  easycache at medium: reused 0% of the passes (0 of 12; the rule needs >= 25%): it reused nothing, "
            "because its warm-up covers the whole run; computed passes by reason: warmup ") in out
    assert "NothingCachedWarning" not in err and "reused no pass in this generation" in err  # the runner's warning
    assert "the check failed (exit status 1)" in err


@needs_weights
def test_check_not_run_without_the_medium_preset_is_not_a_failure(capsys, tmp_path):
    code, out, _ = demo(capsys, "--steps", 4, "--methods", "magcache", "--presets", "fast", "--no-videos",
                        *QUICK, "--out", tmp_path / "d")
    assert code == 0 and "check (at medium" in out and "not run (it needs the medium preset)" in out


# ------------------------------------------------------------------------------------------ side by side
@needs_weights
def test_side_by_side_has_a_difference_row_and_labels(capsys, tmp_path):
    import imageio
    out = tmp_path / "d"
    code, _, _ = demo(capsys, "--steps", 8, "--methods", "magcache", "--presets", "medium", *QUICK, "--out", out)
    assert code in (0, 1)
    frames = [f for f in imageio.get_reader(str(out / "side_by_side.mp4"))]
    panel = 32 * demo_run.PANEL
    cell = panel + demo_run.GAP
    assert frames[0].shape[1] >= 3 * cell  # uncached, magcache medium, its fewer-steps twin
    frame = frames[4].astype(float)
    # rows of one prompt: caption (1 line), labels (2 lines), videos, caption of the differences, differences
    line1, line2 = (demo_run._text_strip(["x"] * n, 8).shape[0] for n in (1, 2))
    top = line1 + line2
    bottom = top + panel + line1
    videos, diffs = frame[top: top + panel], frame[bottom: bottom + panel]
    assert frame.shape[0] >= bottom + panel
    assert 20 < videos[8:-8, 8:panel - 8].mean() < 200  # the uncached video: a grey background, not a caption
    assert diffs[8:-8, 8:panel - 8].mean() < 8  # its difference from itself is black
    report = json.loads((out / "report.json").read_text())
    if report["methods"]["magcache"]["medium"]["psnr"] < 60:
        assert diffs[:, cell: cell + panel].max() > 40  # the cached video's difference shows
    labels = frame[line1: top, cell: cell + panel]
    assert (labels < 100).any() and (labels > 200).any()  # black text on white above the cached panel


# -------------------------------------------------------------------------------------- training checkpoint
class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_training_resume_refuses_a_checkpoint_that_would_run_code(tmp_path, capsys):
    from stepcache.errors import InputError
    from stepcache.wan21.demo import train as demo_train
    marker = tmp_path / "code-ran"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"step": 1, "hparams": dict(demo_train.DEFAULTS), "payload": RunsCode(marker)},
               run_dir / demo_train.CHECKPOINT)
    try:
        with pytest.raises(InputError, match="refusing to load"):
            demo_train.train(run_dir, resume=True, progress=False)
    finally:
        assert not marker.exists(), "loading the checkpoint ran the code in it"
    code = demo_train.main(["--out", str(run_dir), "--resume", "--no-progress", "--check", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "refusing to load" in err and not marker.exists()


# ------------------------------------------------------------------------------------------ calibrate hint
@needs_weights
def test_calibrate_on_the_demo_prints_a_command_that_runs_it(capsys, tmp_path, monkeypatch):
    from stepcache.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", "--model", "demo", "--prompt", PROMPT, "--seeds", "0", "--steps", "8",
                 "--out", "p.json"]) == 0
    out = capsys.readouterr().out
    hint = next(line for line in out.splitlines() if line.startswith("use it with: "))
    command = shlex.split(hint[len("use it with: "):].split("   or   ")[0])
    assert command[:2] == ["stepcache", "demo"] and "--profile" in command
    code = main(command[1:] + ["--methods", "magcache", "--presets", "medium", "--no-videos", *QUICK,
                               "--out", "d"])
    assert code in (0, 1), capsys.readouterr().err  # it ran (1: the check failed on this 1-prompt profile)
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert report["settings"]["steps"] == 8 and report["model"]["profile"] == "p.json"
