"""Prompt-set loader: user files, and the list of an installed `vbench` (faked here with made-up prompts)."""
import json

import pytest

from stepcache.eval import prompts


def test_text_file_skips_blanks_comments_and_repeats(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na red cube\n\na blue sphere\na red cube\n")
    assert prompts.load_prompts(path) == ["a red cube", "a blue sphere"]
    assert prompts.load_prompts(path, unique=False) == ["a red cube", "a blue sphere", "a red cube"]
    with pytest.raises(ValueError, match="no dimensions"):
        prompts.load_prompts(path, dimension="color")


def test_json_file_with_dimensions(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"prompt_en": "a red cube", "dimension": ["color", "object_class"]},
                                {"prompt": "a cat walking", "dimension": "human_action"}, "plain string"]))
    assert prompts.load_prompts(path) == ["a red cube", "a cat walking", "plain string"]
    assert prompts.load_prompts(path, dimension="color") == ["a red cube"]
    with pytest.raises(ValueError, match="no prompts with dimension 'scene'"):
        prompts.load_prompts(path, dimension="scene")
    path.write_text(json.dumps([{"text": "wrong key"}]))
    with pytest.raises(ValueError, match="entry 0"):
        prompts.load_prompts(path)


def test_installed_vbench_list_is_found_without_importing_it(tmp_path, monkeypatch):
    package = tmp_path / "site" / "vbench"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('vbench must not be imported')\n")
    (package / prompts.VBENCH_INFO_FILE).write_text(json.dumps(
        [{"prompt_en": "made-up prompt one", "dimension": ["scene"]},
         {"prompt_en": "made-up prompt two", "dimension": ["color"]},
         {"prompt_en": "made-up prompt one", "dimension": ["overall_consistency"]}]))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert prompts.vbench_prompt_file() == package / prompts.VBENCH_INFO_FILE
    assert prompts.load_prompts() == ["made-up prompt one", "made-up prompt two"]
    assert prompts.load_prompts(dimension="color") == ["made-up prompt two"]


def test_no_vbench_and_no_file_says_what_to_do(monkeypatch, capsys):
    monkeypatch.setattr(prompts, "vbench_prompt_file", lambda: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps vbench"):
        prompts.load_prompts()
    assert prompts.main([]) == 2
    assert capsys.readouterr().err.startswith("error: ")
