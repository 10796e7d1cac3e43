"""The README's set-up commands are the ones CI runs, and every documented command exists."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in _bash_blocks()[1], "the second README command must be the one CI runs"


def test_first_command_runs_the_main_job(tmp_path):
    """The first command ends in `stepcache demo`, run here as written (in a scratch folder): it writes the
    report, and at the medium preset every method reuses a quarter of the passes and keeps 25 dB."""
    import json
    from stepcache.wan21.demo import model as demo_model
    if not demo_model.WEIGHTS.exists():
        pytest.skip(f"no shipped demo weights at {demo_model.WEIGHTS}")
    setup = _bash_blocks()[0].strip()
    main_job = setup.split("&& ")[-1].replace(".venv/bin/", "")
    assert main_job.split()[:2] == ["stepcache", "demo"]
    result = subprocess.run([sys.executable, "-m", "stepcache.cli", *main_job.split()[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "stepcache-demo" / "report.json").read_text())
    for method, by_preset in report["methods"].items():
        assert set(by_preset) == {"slow", "medium", "fast"}, method
        for preset, entry in by_preset.items():
            for key in ("computed_passes", "total_passes", "wall_speedup", "ideal_speedup", "psnr", "ssim"):
                assert key in entry and key in entry["fewer_steps"], (method, preset, key)
    for method, check in report["medium_check"]["methods"].items():
        assert check["reused_fraction"] >= 0.25 and check["psnr"] > 25, (method, check)
    assert report["medium_check"]["ok"] and "check (at medium" in result.stdout


def _documented_stepcache_commands():
    """Every `stepcache ...` command line in the README's bash blocks, continuation lines joined."""
    commands = []
    for block in _bash_blocks():
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            for part in line.split("&&"):
                words = part.strip().replace(".venv/bin/", "").split()
                if words[:1] == ["stepcache"] and len(words) > 1 and not words[1].startswith("-"):
                    commands.append(words[1:])
    return commands


def test_every_documented_stepcache_command_parses():
    import shlex

    from stepcache.cli import build_parser
    commands = _documented_stepcache_commands()
    assert len(commands) >= 10
    for words in commands:
        words = [w for w in shlex.split(" ".join(words)) if w not in ("--help", "-h")]
        build_parser(words[0]).parse_args(words)  # argparse exits (a test error) on an unknown flag or value
