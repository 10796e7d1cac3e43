"""The README's set-up commands are the ones CI runs, and every documented command exists."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line and not line.startswith(("#", "set ", "cd ", "rm "))]
    assert len(ci_lines) == 1
    assert ci_lines[0] in _bash_blocks()[1], "the second README command must be the one CI runs"


def test_first_command_runs_the_main_job():
    setup = _bash_blocks()[0].strip()
    main_job = setup.split("&& ")[-1].replace(".venv/bin/", "")
    assert main_job.startswith("stepcache ")
    result = subprocess.run([sys.executable, "-m", "stepcache.cli", *main_job.split()[1:]],
                            capture_output=True, text=True, check=True)
    assert "computed 19/50 passes" in result.stdout
