"""Every drop-in script of every family is the same three lines around one entry function, run_script(method)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DROPINS = sorted(p for pattern in ("hunyuan/*_sample_video.py", "wan21/*_generate.py", "opensora/*_opensora.py")
                 for p in ROOT.glob(pattern) if p.name != "official_generate.py")


def test_there_is_a_drop_in_per_method_and_family():
    assert len(DROPINS) == 9, [p.name for p in DROPINS]


@pytest.mark.parametrize("path", DROPINS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_drop_in_calls_run_script_with_its_method(path):
    method = path.name.split("_")[0]
    text = path.read_text()
    found = re.search(r"^from (stepcache\.[\w.]+) import run_script$", text, flags=re.M)
    assert found, f"{path.name} does not import run_script"
    assert f'run_script("{method}")' in text
    assert callable(getattr(importlib.import_module(found.group(1)), "run_script"))


def _our_flag_parsers():
    """Every drop-in's parser of our own flags, built without an upstream checkout."""
    from stepcache.hunyuan.official import add_cache_args
    from stepcache.hunyuan15.official import cache_parser
    from stepcache.hunyuan15.official_bench import bench_parser
    from stepcache.opensora.generate_set import build_parser as opensora_parser
    from stepcache.wan21.official_generate import WAN21, build_parser as wan_parser
    from stepcache.wan22.official_generate import WAN22
    import argparse
    for method in ("magcache", "teacache", "easycache"):
        yield f"hunyuan/{method}", add_cache_args(argparse.ArgumentParser(add_help=False), method)
        yield f"hunyuan15/{method}", cache_parser(method)
        yield f"opensora/{method}", opensora_parser(method)
        yield f"wan21/{method}", wan_parser(method, WAN21)
        yield f"wan22/{method}", wan_parser(method, WAN22)
    yield "hunyuan15/bench", bench_parser()


def test_every_drop_in_help_text_formats():
    """--help prints every flag's text through argparse, which %-formats it: a bare % (EasyCache's "0.05 is 5%")
    stops --help with a ValueError."""
    for name, parser in _our_flag_parsers():
        assert "--" in parser.format_help(), name
