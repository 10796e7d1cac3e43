"""`stepcache bench` on damaged folders, bad input, Ctrl-C and noisy timings.

* results.jsonl: a last line cut by a kill is dropped (and said), the file is cut back to its last whole line
  before anything is appended, and a damaged line elsewhere is refused with its number;
* a report with runs missing exits 3 and names them; bad --out and a cut settings.json exit 2 in one line;
* reference.pt is read as plain tensors only;
* Ctrl-C exits 130 with one line, and the report files are replaced whole or not at all;
* the verdict never places a run above its ideal speedup, and a ranking within the timing spread is said to be
  one.
"""
import gzip
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "benchmarks" / "raw" / "bench-2026-11-22-full"
SETTINGS = {"format": "stepcache-bench/1", "runs": ["baseline[]"], "steps": 6}


def _store(folder):
    from stepcache.eval.bench import Store
    store = Store(folder)
    store.open(SETTINGS)
    return store


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------- results.jsonl
def test_a_cut_last_line_is_dropped_said_and_the_next_record_starts_on_its_own_line(tmp_path, capsys):
    _store(tmp_path)
    whole = [{"kind": "quality", "run": "baseline[]"}, {"kind": "timing", "run": "a", "round": 0}]
    cut = '{"kind": "timing", "run": "b", "rou'
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in whole) + cut)
    store = _store(tmp_path)   # a resumed run opens the folder again
    assert "dropped a cut last line" in capsys.readouterr().out
    assert results.read_text() == "".join(json.dumps(r) + "\n" for r in whole)
    redone = {"kind": "timing", "run": "b", "round": 0}
    store.append(redone)
    assert store.records() == whole + [redone]
    assert _records(results) == whole + [redone]   # every line a whole record


def test_a_whole_last_record_without_its_newline_is_kept(tmp_path):
    _store(tmp_path)
    results = tmp_path / "results.jsonl"
    results.write_text('{"kind": "quality", "run": "baseline[]"}')
    store = _store(tmp_path)
    store.append({"kind": "timing", "run": "a", "round": 0})
    assert [r["kind"] for r in _records(results)] == ["quality", "timing"]


def test_a_damaged_line_before_the_last_is_refused_with_its_number(tmp_path):
    from stepcache.eval.bench import BenchError
    _store(tmp_path)
    (tmp_path / "results.jsonl").write_text('{"kind": "quality"}\nnot json\n{"kind": "timing"}\n')
    with pytest.raises(BenchError, match=r"results\.jsonl, line 2: not a whole record"):
        _store(tmp_path)


# ------------------------------------------------------------------------------------------- the command
UNTRAINED = ["--quick", "--untrained", "--num-prompts", "1", "--steps", "6", "--methods", "floor-steps"]


def bench(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "stepcache.cli", "bench", *map(str, args)], capture_output=True,
                          text=True, timeout=600, cwd=REPO, **kwargs)


def test_an_incomplete_report_exits_3_and_names_what_is_missing_then_a_cut_line_is_redone(tmp_path):
    out = tmp_path / "bench"
    stopped = bench(*UNTRAINED, "--budget-minutes", "0", "--out", out)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("stepcache bench: INCOMPLETE: ") and "floor-steps[steps=" in last and "(not scored)" in last
    assert "**INCOMPLETE**" in (out / "table.md").read_text() and "floor-steps[steps=" in (out / "table.md").read_text()
    # the budget was planned for before any run started: what it leaves out is said up front
    assert "plan: 0 run(s) to finish" in stopped.stdout and "budget of 0 min: left out" in stopped.stdout
    # a kill while the next record was being written: its line is cut
    with open(out / "results.jsonl", "a") as f:
        f.write('{"kind": "quality", "run": "floor-steps[steps=3]", "method": "floor-st')
    finished = bench(*UNTRAINED, "--out", out)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "dropped a cut last line" in finished.stdout and "INCOMPLETE" not in finished.stdout + finished.stderr
    records = _records(out / "results.jsonl")
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and not report["unfinished"]
    scored = {r["run"] for r in records if r["kind"] == "quality"}
    assert scored == set(json.loads((out / "settings.json").read_text())["runs"])


def test_out_naming_a_file_is_refused_in_one_line(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    result = bench(*UNTRAINED, "--out", target)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"stepcache bench: error: --out {str(target)!r} is a file; give a folder"]
    assert target.read_text() == "keep me"


def test_a_cut_settings_file_is_refused_in_one_line_naming_it(tmp_path):
    folder = tmp_path / "bench"
    folder.mkdir()
    (folder / "settings.json").write_text('{"format": "stepcache-bench/1", "mode": "qu')
    result = bench(*UNTRAINED, "--out", folder)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"stepcache bench: error: {folder / 'settings.json'} is not "
                                                   f"valid JSON"), result.stderr
    assert "delete the folder" in lines[0]
    assert sorted(p.name for p in folder.iterdir()) == ["settings.json"]


# ------------------------------------------------------------------------------------------- reference.pt
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_reference_is_read_as_plain_tensors_even_where_torch_load_defaults_to_pickles(tmp_path, monkeypatch):
    import torch

    from stepcache.eval.bench import BenchError, load_reference
    marker = tmp_path / "code-ran"
    path = tmp_path / "reference.pt"
    torch.save({"latents": torch.zeros(1), "payload": _RunsCode(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")   # torch < 2.6: torch.load unpickles anything
    with pytest.raises(BenchError, match="not a file of plain tensors"):
        load_reference(path)
    assert not marker.exists()
    torch.save({"latents": torch.ones(2), "pairs": [("a prompt", 1)]}, path)
    assert torch.equal(load_reference(path)["latents"], torch.ones(2))


# ------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_exits_130_in_one_line_and_leaves_only_whole_lines(tmp_path):
    out = tmp_path / "bench"
    args = ["--quick", "--untrained", "--num-prompts", "3", "--steps", "20", "--methods", "floor-steps"]
    process = subprocess.Popen([sys.executable, "-m", "stepcache.cli", "bench", *args, "--out", str(out)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "results.jsonl").exists() and (out / "results.jsonl").stat().st_size) and time.time() < deadline:
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "stepcache bench: interrupted; no partial output was kept"
    lines = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert lines and all(line.endswith("\n") and json.loads(line) for line in lines)
    assert not [p.name for p in out.rglob("*") if ".part" in p.name]


@pytest.fixture(scope="module")
def committed_copy(tmp_path_factory):
    """The committed full bench folder, unpacked as the README says, and its report rebuilt."""
    copy = tmp_path_factory.mktemp("committed") / "bench-full"
    shutil.copytree(COMMITTED, copy)
    with gzip.open(copy / "results.jsonl.gz", "rb") as packed:
        (copy / "results.jsonl").write_bytes(packed.read())
    (copy / "results.jsonl.gz").unlink()
    return copy


def test_the_committed_bench_folder_rebuilds_its_report(committed_copy, capsys):
    from stepcache.cli import main
    before = (committed_copy / "results.jsonl").read_bytes()
    code = main(["bench", "--out", str(committed_copy)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "every run is finished: rebuilding the report" in out
    assert (committed_copy / "results.jsonl").read_bytes() == before
    report = json.loads((committed_copy / "report.json").read_text())
    assert report["complete"] and len(report["rows"]) == len(report["settings"]["runs"]) == 210
    for row in report["rows"]:   # no run is placed above what its block work allows
        if row["status"] == "ok" and row.get("wall_placed") is not None:
            assert row["wall_placed"] <= row["ideal_speedup"] + 1e-12


def test_ctrl_c_while_writing_the_report_keeps_the_previous_one_whole(committed_copy, capsys, monkeypatch):
    import matplotlib.figure

    from stepcache.cli import main
    assert main(["bench", "--out", str(committed_copy)]) == 0
    names = ("report.json", "table.md", "verdict.md", "plot.png")
    before = {name: (committed_copy / name).read_bytes() for name in names}
    capsys.readouterr()

    def interrupted_savefig(self, fname, *args, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half a plot")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", interrupted_savefig)
    time.sleep(1.1)   # the report's date (seconds) differs, so a rewritten report.json would show
    assert main(["bench", "--out", str(committed_copy)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["stepcache bench: interrupted; no partial output was kept"]
    assert {name: (committed_copy / name).read_bytes() for name in names} == before
    assert not [p.name for p in committed_copy.iterdir() if ".part" in p.name]


# ------------------------------------------------------------------------------------------- the verdict
def _row(method, family, ideal, walls, psnr):
    from statistics import median
    return {"id": f"{method}[{ideal}]", "method": method, "label": method, "family": family, "status": "ok",
            "exploratory": False, "ideal_speedup": ideal, "wall_speedup": median(walls), "wall_speedups": walls,
            "psnr": psnr, "setting": f"ideal {ideal}"}


def test_no_run_is_placed_faster_than_its_ideal_speedup():
    from stepcache.eval.bench_report import verdict, verdict_text
    # the quick bench on a busy machine: wall-clock 3.05x for a run whose block work allows 1.76x
    rows = [_row("sc", "stepcache", 1.76, [3.05], 40.0), _row("floor", "floor", 3.0, [3.02], 30.0)]
    at = verdict(rows, "wall")["at"]
    assert at["3.0"]["winner"] == "floor" and at["3.0"]["values"]["sc"] is None
    assert at["2.0"]["values"]["sc"] is None
    assert at["3.0"]["runs"]["floor"]["speedup"] == pytest.approx(3.0)   # 3.02 measured, placed at its 3.0
    text = verdict_text(rows, verdict(rows, "wall"), {})
    assert "measured 3.02x, above ideal" in text[2]


def test_a_ranking_within_the_timing_spread_ranks_nothing():
    from stepcache.eval.bench_report import verdict, verdict_text
    # stepcache is at 2.53x at the median of three rounds, but one round gave 2.43x: below 2.5x the floor wins
    rows = [_row("sc", "stepcache", 2.8, [2.43, 2.53, 2.56], 39.9), _row("floor", "floor", 3.0, [2.6, 2.7, 2.8], 37.8),
            _row("floor", "floor", 2.2, [2.1, 2.15, 2.2], 38.0)]
    v = verdict(rows, "wall")
    e = v["at"]["2.5"]
    assert e["winner"] == "sc" and e["within_spread"] and not e["goal_met"]
    assert e["at_slowest_round"]["winner"] == "floor"
    text = verdict_text(rows, v, {})[1]
    assert "rounds 2.43-2.56x" in text and "WITHIN THE TIMING SPREAD" in text and "not settled" in text
    assert 2.5 in [x for x, e in ((float(x), e) for x, e in v["at"].items()) if not e["goal_met"]]
    # at 3x nothing is placed, at 2x the answer is the same at the slowest rounds: settled
    assert v["at"]["2.0"]["goal_met"] and not v["at"]["2.0"]["within_spread"]


# ------------------------------------------------------------------------------------------- .gitignore
@pytest.mark.parametrize("module", ["stepcache.eval.bench", "stepcache.wan21.demo.run"])
def test_the_default_output_folder_is_ignored_by_git(module):
    import argparse
    import importlib
    parser = argparse.ArgumentParser()
    importlib.import_module(module).add_arguments(parser)
    default = parser.parse_args([]).out
    patterns = [line.strip() for line in (REPO / ".gitignore").read_text().splitlines()]
    assert f"{default}/" in patterns or f"/{default}/" in patterns, default
