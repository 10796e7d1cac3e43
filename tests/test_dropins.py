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
