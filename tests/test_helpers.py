"""The shared test helpers themselves (helpers.py): the block-work counter counts what ran inside the blocks, and
every opt-in upstream test skips, naming the install line, when its checkout or a module it imports is missing."""
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from torch import nn

import helpers
from helpers import INSTALL_LINE, BlockWork, upstream_checkout

TESTS = Path(__file__).resolve().parent


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)) for _ in range(3))
        self.skip = False

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x if self.skip else block(x)
        return x


def test_block_work_counts_linear_calls_inside_the_stacks_per_call():
    toy = Toy()
    work = BlockWork(toy)
    assert work.per_pass == 6
    toy(torch.zeros(1, 4))
    toy.skip = True
    toy(torch.zeros(1, 4))
    assert work.block == [6, 0] and work.total == [7, 1] and work.ran() == "C." and work.passes == 1
    work.remove()
    toy(torch.zeros(1, 4))
    assert work.calls == 6 and len(work.block) == 2
    excluded = BlockWork(toy, exclude=("blocks.0.0",))
    toy.skip = False
    toy(torch.zeros(1, 4))
    assert excluded.per_pass == 5 and excluded.block == [5] and excluded.total == [7]
    with pytest.raises(ValueError, match="no nn.Linear inside"):
        BlockWork(toy, ("double_blocks",))


def test_upstream_checkout_says_what_is_missing(tmp_path, monkeypatch):
    spec = dict(env_name="STEPCACHE_TEST_REPO", marker_file="pkg/model.py", requirements=("json", "bs4"),
                what="a test checkout")
    monkeypatch.delenv("STEPCACHE_TEST_REPO", raising=False)
    with pytest.raises(pytest.skip.Exception, match="set STEPCACHE_TEST_REPO to the root of a test checkout") as skip:
        upstream_checkout(**spec)
    assert INSTALL_LINE in str(skip.value)
    monkeypatch.setenv("STEPCACHE_TEST_REPO", str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match=r"is not a test checkout \(no pkg/model.py\)"):
        upstream_checkout(**spec)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "model.py").write_text("")
    monkeypatch.setitem(sys.modules, "bs4", None)  # an import of bs4 fails
    with pytest.raises(pytest.skip.Exception) as skip:
        upstream_checkout(**spec)
    reason = str(skip.value)
    assert "imports bs4, which is not installed" in reason and reason.endswith(INSTALL_LINE)
    assert 'pip install -e ".[upstream-tests]"' in reason
    assert upstream_checkout(**{**spec, "requirements": ("json",)}) == tmp_path


def _fake_checkout(root: Path) -> dict:
    """A folder with each upstream's marker file and nothing else, named by every variable."""
    env = {}
    for spec in (helpers.HUNYUANVIDEO, helpers.WAN21, helpers.WAN22, helpers.OPENSORA):
        marker = root / spec["marker_file"]
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("")
        env[spec["env_name"]] = str(root)
    return env


def _pytest_without(module: str, env: dict, report: Path, *targets: str) -> list[tuple[str, str | None]]:
    """Runs pytest on ``targets`` (pytest arguments) with ``module`` (or several, comma-separated) unimportable;
    (test file, skip message or None) per test."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in module.split(","))
    code = (f"import sys; {blocked}; import pytest; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '--junitxml', {str(report)!r}, *sys.argv[1:]]))")
    result = subprocess.run([sys.executable, "-c", code, *targets], cwd=TESTS.parent, capture_output=True,
                            text=True, env={**os.environ, **env}, timeout=600)
    # nothing failed (5: every test deselected by -k or skipped with its module, which pytest counts apart)
    assert result.returncode in (0, 5), result.stdout + result.stderr
    cases = []
    for case in ElementTree.parse(report).iter("testcase"):
        skipped = case.find("skipped")  # a module skipped at collection is a case named after the module
        name = (case.get("classname") or case.get("name")).split(".")[1] + ".py"
        cases.append((name, None if skipped is None else f"{skipped.get('message')} {skipped.text}"))
    return cases


OPT_IN = ("test_hunyuan_official.py", "test_wan_official.py", "test_wan_official_parallel.py",
          "test_opensora_fork.py", "test_multigpu_official.py", "test_wan22_harness.py", "test_wan22_official.py",
          "test_wan22_parallel.py")


def test_every_opt_in_test_skips_naming_the_install_line_when_a_module_is_missing(tmp_path):
    """einops, which all three upstream checkouts import, made unimportable: every opt-in test skips (none fails)
    and says to install the extra."""
    cases = _pytest_without("einops", _fake_checkout(tmp_path / "checkout"), tmp_path / "report.xml",
                            *(f"tests/{name}" for name in OPT_IN))
    assert {name for name, skipped in cases if skipped} == set(OPT_IN)
    for name, skipped in cases:
        if skipped:  # einops among the modules named (others may be missing too where the extra is not installed)
            named = re.search(r"imports ([\w, ]+), which is not installed", skipped)
            assert named and "einops" in named.group(1).split(", ") and INSTALL_LINE in skipped, (name, skipped)
    # Only test_hunyuan_official.py has tests that need no checkout (they run).
    assert {name for name, skipped in cases if not skipped} <= {"test_hunyuan_official.py"}


def test_the_fork_pipeline_test_skips_without_beautifulsoup(tmp_path):
    """The fork's OpenSoraPipeline module imports bs4 (its caption cleaning), the transformer does not: without
    bs4 the pipeline test skips with the install line instead of failing in its subprocess."""
    # By name with -k: where the module's own requirements are missing too, the module is skipped as a whole.
    cases = _pytest_without("bs4", _fake_checkout(tmp_path / "checkout"), tmp_path / "report.xml",
                            "tests/test_opensora_fork.py", "-k", "test_generate_set_on_the_forks_own_pipeline")
    assert len(cases) == 1 and cases[0][1] is not None, cases
    missing = [m for m in helpers.OPENSORA["requirements"] if helpers._missing(m)]
    assert (missing[0] if missing else "imports bs4") in cases[0][1] and INSTALL_LINE in cases[0][1], cases
