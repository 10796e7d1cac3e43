"""The README's set-up commands are the ones CI runs, every command in the README and in docs/*.md parses with
the real parser (the drop-in scripts' with upstream's own parser too, when a checkout is set), and every relative
link in those pages resolves."""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
# The hand-written pages. docs/benchmarks/ and docs/calibration/ hold generated reports, linked from these pages.
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_BYTES = 15_000


def _bash_blocks(text: str = README) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


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


def test_readme_is_short():
    size = len((ROOT / "README.md").read_bytes())
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; move detail to a page under docs/"


# ------------------------------------------------------------------------------------------ documented commands
def _command_lines(block: str) -> list[list[str]]:
    """The shell commands of one bash block as word lists: continuation lines joined, comments, a leading `$ `
    prompt and `VAR=value` prefixes dropped, `&&` chains split, and variables set earlier in the block
    expanded (`GEN="python -m ..."` then `$GEN --method none`). Output lines shown after a `$ ` prompt are not
    commands and are skipped."""
    text = re.sub(r"\\\n\s*", " ", block)
    variables: dict[str, list[str]] = {}
    prompted = any(line.startswith("$ ") for line in text.splitlines())
    commands = []
    for line in text.splitlines():
        if prompted and not line.startswith("$ "):
            continue
        words = shlex.split(line.removeprefix("$ "), comments=True)
        parts, current = [], []
        for word in words:
            if word == "&&":
                parts.append(current)
                current = []
            else:
                current.append(word)
        parts.append(current)
        for part in parts:
            if len(part) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", part[0]):  # GEN="python -m ..."
                name, value = part[0].split("=", 1)
                variables[name] = shlex.split(value)
                continue
            while part and re.fullmatch(r"[A-Za-z_]\w*=.*", part[0]):  # WAN21_REPO=/path python -m pytest
                part = part[1:]
            if part and part[0].startswith("$") and part[0][1:] in variables:
                part = variables[part[0][1:]] + part[1:]
            part = [w.replace(".venv/bin/", "") for w in part if w not in ("--help", "-h")]
            if part:
                commands.append(part)
    return commands


def _documented_commands() -> list[tuple[str, list[str]]]:
    """(page, words) of every shell command in the bash blocks of the README and of docs/*.md."""
    return [(_page_id(page), words) for page in PAGES for block in _bash_blocks(page.read_text())
            for words in _command_lines(block)]


def _documented_stepcache_commands() -> list[tuple[str, list[str]]]:
    """Every `stepcache SUBCOMMAND ...` (page, words after `stepcache`)."""
    return [(page, words[1:]) for page, words in _documented_commands()
            if words[:1] == ["stepcache"] and len(words) > 1 and not words[1].startswith("-")]


def test_every_documented_stepcache_command_parses():
    from stepcache.cli import build_parser
    commands = _documented_stepcache_commands()
    assert len(commands) >= 10
    assert any(page == "README.md" for page, _ in commands)
    for page, words in commands:
        try:
            build_parser(words[0]).parse_args(words)
        except SystemExit:  # argparse printed the unknown flag or value
            pytest.fail(f"{page}: `stepcache {' '.join(words)}` does not parse")


# Scripts the pages may run, by file name: (family, method). Anything else run with python is a test failure,
# so that no documented command escapes these checks.
DROP_INS = {
    **{f"{m}_generate.py": ("wan21", m) for m in ("magcache", "teacache", "easycache")},
    **{f"{m}_sample_video.py": ("hunyuan", m) for m in ("magcache", "teacache", "easycache")},
    **{f"{m}_opensora.py": ("opensora", m) for m in ("magcache", "teacache", "easycache")},
    **{f"hyvideo_svg_{m}.py": ("hunyuan-svg", m) for m in ("magcache", "teacache", "easycache")},
}
NOT_OURS = {"venv", "pytest", "pip"}  # `python -m venv`, `python -m pytest`: the set-up and test commands


def _python_commands() -> list[tuple[str, str, list[str]]]:
    """(page, script or module, argv) of every `python`, `python3` and `torchrun` command in the pages."""
    found = []
    for page, words in _documented_commands():
        program = Path(words[0]).name
        if program == "torchrun":
            rest = words[1:]
            while rest and rest[0].startswith("-"):  # torchrun's own options (--nproc_per_node=8)
                rest = rest[1:]
            if rest:
                found.append((page, rest[0], rest[1:]))
        elif program in ("python", "python3"):
            if words[1:2] == ["-m"] and len(words) > 2:
                found.append((page, f"-m {words[2]}", words[3:]))
            elif len(words) > 1:
                found.append((page, words[1], words[2:]))
    return found


class _Parsed(BaseException):
    """Raised right after a tool's parser accepted its arguments, so that the tool itself never runs."""


def _parse_only(main, argv: list[str], **kwargs):
    """Call a `python -m` tool's ``main(argv)`` and stop it as soon as its top-level parser has parsed; returns the
    namespace, and the extras when the tool used ``parse_known_args``. An argparse error exits (SystemExit)."""
    parse_args, parse_known_args = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    state = threading.local()

    def patched_parse_args(self, args=None, namespace=None):
        state.depth = getattr(state, "depth", 0) + 1
        try:
            namespace = parse_args(self, args, namespace)
        finally:
            state.depth -= 1
        if state.depth == 0:
            raise _Parsed(namespace, [])
        return namespace

    def patched_parse_known_args(self, args=None, namespace=None):
        outer = getattr(state, "depth", 0) == 0
        state.depth = getattr(state, "depth", 0) + 1
        try:
            result = parse_known_args(self, args, namespace)
        finally:
            state.depth -= 1
        if outer:
            raise _Parsed(*result)
        return result

    argparse.ArgumentParser.parse_args = patched_parse_args
    argparse.ArgumentParser.parse_known_args = patched_parse_known_args
    try:
        main(argv, **kwargs)
    except _Parsed as parsed:
        return parsed.args
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known_args
    raise AssertionError(f"{main.__module__}.main returned without parsing its arguments")


# A flag that reached upstream's parser but looks like one of ours is a typo in a cache flag.
CACHE_FLAG = re.compile(r"^--(cache|magcache|teacache|easycache|retention|use[-_]magcache|use[-_]ret|thresh|"
                        r"ret[-_]steps|calibration)")


def _check_wan_drop_in(method: str, argv: list[str], upstream, tmp_path, repo=None) -> None:
    import shutil

    from stepcache.wan21.official_generate import WAN21, make_plan, split_argv, upstream_args
    repo = repo or WAN21
    ours, rest = split_argv(method, argv, repo)
    assert not [w for w in rest if CACHE_FLAG.match(w)], f"cache flags {method}_generate.py does not know: {rest}"
    if upstream is None:
        return
    args = upstream_args(upstream.generate, f"{method}_generate.py", rest)
    for flag in ("image", "first_frame", "last_frame"):  # the plan checks that input images exist
        if getattr(args, flag, None):
            (tmp_path / getattr(args, flag)).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / getattr(args, flag)).touch()
    profile = ours.cache_profile
    if profile and profile.endswith(".json") and not (tmp_path / profile).exists():
        # A file an earlier command of the page writes (--magcache_calibration, or `stepcache calibrate` for a
        # TeaCache table Wan2.2 does not publish): the task's shipped profile has the same layout and model, which
        # is what the plan checks; a method it lacks gets Wan2.1-14B's table as the stand-in calibrated one.
        (tmp_path / profile).parent.mkdir(parents=True, exist_ok=True)
        shipped = repo.default_profile(args, upstream.generate)
        data = json.loads(shipped.path.read_text())
        if method not in data:
            from stepcache.profiles import load_profile
            data[method] = load_profile("wan2.1-t2v-14b").method(method)
        (tmp_path / profile).write_text(json.dumps(data))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        make_plan(method, ours, args, upstream.generate, repo)  # PlanError on a combination that cannot run
    finally:
        os.chdir(cwd)


def _check_hunyuan_drop_in(method: str, argv: list[str], upstream) -> None:
    argv = [re.sub(r"\$\{?(\w+)\}?", r"/path/to/\1", w) for w in argv]  # --dit-weight ${DIT_CKPT_PATH}
    if upstream is None:
        from stepcache.hunyuan.official import add_cache_args
        parser = add_cache_args(argparse.ArgumentParser(add_help=False, allow_abbrev=False), method)
        _, rest = parser.parse_known_args(argv)
        assert not [w for w in rest if CACHE_FLAG.match(w)], f"cache flags the HunyuanVideo scripts lack: {rest}"
        return
    upstream.parse_args(method, argv)  # upstream's parser, its sanity_check_args, then our plan


def _check_hunyuan15_drop_in(script: str, argv: list[str]) -> None:
    """Our flags of a HunyuanVideo 1.5 script (a drop-in or the bench), parsed by its own parser; what is left goes
    to upstream's generate.py and must not look like one of ours."""
    from stepcache.hunyuan15.official import METHODS, cache_parser
    from stepcache.hunyuan15.official_bench import SCRIPT, bench_parser
    if script == SCRIPT:
        parser = bench_parser()
    else:
        method = script.removesuffix("_generate.py")
        assert method in METHODS, f"not a HunyuanVideo 1.5 drop-in script: {script}"
        parser = cache_parser(method)
    _, rest = parser.parse_known_args(argv)
    assert not [w for w in rest if CACHE_FLAG.match(w) or w.startswith("--bench")], \
        f"flags {script} does not know: {rest}"


@pytest.fixture(scope="module")
def wan_upstream():
    """Upstream Wan2.1's generate.py when WAN21_REPO points at a checkout (else None: our flags only)."""
    if not os.environ.get("WAN21_REPO"):
        return None
    import wan_official_tiny
    from helpers import wan21_checkout
    return wan_official_tiny.load(wan21_checkout())


@pytest.fixture(scope="module")
def wan22_upstream():
    """Upstream Wan2.2's generate.py when WAN22_REPO points at a checkout (else None: our flags only)."""
    if not os.environ.get("WAN22_REPO"):
        return None
    import wan22_official_tiny
    from helpers import wan22_checkout
    return wan22_official_tiny.load(wan22_checkout())


# The drop-ins of both Wan repositories share their file names: a command's --task says which one it is for.
WAN22_TASKS = ("t2v-A14B", "i2v-A14B", "ti2v-5B", "animate-14B", "s2v-14B")


@pytest.fixture(scope="module")
def hunyuan_upstream():
    """``stepcache.hunyuan.official`` over an importable upstream HunyuanVideo when HUNYUANVIDEO_REPO is set."""
    if not os.environ.get("HUNYUANVIDEO_REPO"):
        yield None
        return
    import hunyuan_tiny
    from helpers import hunyuanvideo_checkout
    root = hunyuanvideo_checkout()
    with hunyuan_tiny.upstream_on_cpu(root):
        from stepcache.hunyuan import official
        yield official


def test_every_documented_python_command_parses(wan_upstream, wan22_upstream, hunyuan_upstream, tmp_path):
    """The drop-in scripts' commands (Wan2.1, Wan2.2, HunyuanVideo, Open-Sora) and every `python -m stepcache...`
    tool parse with the real parsers: our cache flags always, upstream's flags too when its checkout is set."""
    from stepcache.wan22.official_generate import WAN22
    import importlib
    commands = _python_commands()
    families = set()
    for page, program, argv in commands:
        where = f"{page}: `{program} {' '.join(argv)}`"
        try:
            if program.startswith("-m "):
                module = program[3:]
                if module in NOT_OURS:
                    continue
                assert module.startswith("stepcache."), f"{where}: not a stepcache module"
                _, extras = _parse_only(importlib.import_module(module).main, argv)
                assert not extras, f"{where}: unknown arguments {extras}"
                continue
            if page.endswith("hunyuanvideo15.md"):  # HunyuanVideo 1.5's scripts share Wan's file names
                _check_hunyuan15_drop_in(Path(program).name, argv)
                families.add("hunyuan15")
                continue
            assert Path(program).name in DROP_INS, f"{where}: not a stepcache drop-in script"
            family, method = DROP_INS[Path(program).name]
            if family == "wan21" and "--task" in argv and argv[argv.index("--task") + 1] in WAN22_TASKS:
                family = "wan22"
            families.add(family)
            if family == "wan22":
                _check_wan_drop_in(method, argv, wan22_upstream, tmp_path, WAN22)
            elif family == "wan21":
                _check_wan_drop_in(method, argv, wan_upstream, tmp_path)
            elif family == "hunyuan":
                _check_hunyuan_drop_in(method, argv, hunyuan_upstream)
            elif family == "hunyuan-svg":
                from svg_tiny import check_documented_command
                check_documented_command(method, argv)
            else:
                from stepcache.opensora.generate_set import main
                _, extras = _parse_only(main, argv, method=method)
                assert not extras, f"{where}: unknown arguments {extras}"
        except SystemExit:  # argparse printed why
            pytest.fail(f"{where} does not parse")
        except Exception as exc:  # noqa: BLE001 (PlanError, AssertionError: say which command)
            pytest.fail(f"{where}: {type(exc).__name__}: {exc}")
    assert {"wan21", "wan22", "hunyuan", "hunyuan15", "hunyuan-svg"} <= families, \
        "the Wan2.1, Wan2.2, HunyuanVideo (1.0, 1.5) and HunyuanVideo-with-SVG drop-in commands were not all found"
    assert any(p == "-m stepcache.opensora.generate_set" for _, p, _ in commands)


def test_the_command_checks_catch_a_wrong_flag(tmp_path):
    """The checks above fail on a misspelt flag, for each kind of command."""
    from stepcache.cli import build_parser
    with pytest.raises(SystemExit):
        build_parser("generate").parse_args(["generate", "--model", "m", "--prompt", "p", "--threshold", "1"])
    with pytest.raises(AssertionError, match="cache flags"):
        _check_wan_drop_in("magcache", ["--task", "t2v-1.3B", "--magcache_treshold", "0.1"], None, tmp_path)
    with pytest.raises(AssertionError, match="cache flags"):
        _check_hunyuan_drop_in("teacache", ["--video-size", "720", "1280", "--teacache-threshold", "0.1"], None)
    for script, flag in (("magcache_generate.py", "--magcache_treshold"), ("bench_generate.py", "--bench_output")):
        with pytest.raises(AssertionError, match="does not know"):
            _check_hunyuan15_drop_in(script, ["--resolution", "480p", flag, "0.1"])
    from stepcache.opensora.generate_set import main
    with pytest.raises(SystemExit):
        _parse_only(main, ["--tresh", "0.1"], method="magcache")


# ------------------------------------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|\[|\]\([^)]*\)", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} +(.+)$", text, flags=re.M)}


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text) + re.findall(r'src="([^"]+)"', text)


def test_every_relative_link_resolves():
    checked = 0
    for page in PAGES:
        for link in _links(page):
            if re.match(r"[a-z]+:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / unquote(path)).resolve() if path else page
            assert target.exists(), f"{_page_id(page)}: link {link!r} points to nothing"
            assert ROOT in target.parents or target == ROOT, f"{_page_id(page)}: link {link!r} leaves the repository"
            if anchor and target.suffix == ".md":
                assert anchor in _anchors(target), f"{_page_id(page)}: no heading for #{anchor} in {target.name}"
            checked += 1
    assert checked >= 20


def test_pages_point_to_nothing_outside_the_repository():
    for page in PAGES:
        text = page.read_text()
        for gone in ("../shared", "shared/reference", "seed-methods.md"):
            assert gone not in text, f"{_page_id(page)} mentions {gone}, which is not in the repository"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"


def test_the_parameter_table_lists_every_parameter_of_every_method():
    from stepcache import methods
    rows = {tuple(cell.strip(" `") for cell in line.split("|")[1:3])
            for line in README.splitlines() if line.startswith("| ")}
    for name in methods.names():
        for parameter in methods.get(name).PARAMETERS:
            assert (name, parameter) in rows or ("all", parameter) in rows, (name, parameter)
