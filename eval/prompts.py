"""Prompt sets for evaluation runs: the VBench list shipped inside the `vbench` package, or a user's file.

The project bundles no prompt text of its own; it only knows where an installed `vbench` keeps its list
(`vbench/VBench_full_info.json`: 946 entries, 944 distinct prompts) and how to read a user's file.

Accepted files:
  * .txt  one prompt per line; blank lines and lines starting with '#' are skipped
  * .json a list of strings, or a list of objects with "prompt_en" (VBench) or "prompt", and optionally
          "dimension" (a string or a list of VBench dimension names, used by `dimension=`)

Command line: `python -m stepcache.eval.prompts [--file F] [--dimension D]` prints one prompt per line.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

VBENCH_INFO_FILE = "VBench_full_info.json"


def vbench_prompt_file() -> Path | None:
    """The list inside an installed `vbench`, located without importing it (vbench imports heavy models)."""
    try:
        spec = importlib.util.find_spec("vbench")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / VBENCH_INFO_FILE
        if candidate.is_file():
            return candidate
    return None


def load_prompts(path: str | Path | None = None, dimension: str | None = None, unique: bool = True) -> list[str]:
    """Prompts from `path`, or from the installed vbench package when `path` is None.

    `unique` drops repeated prompts (keeping the first): the published runs name files after the prompt, so a
    repeated prompt would overwrite its own video. `dimension` keeps only prompts tagged with that VBench
    dimension (e.g. "subject_consistency"); a .txt file has no tags, so it cannot be filtered.
    """
    if path is None:
        path = vbench_prompt_file()
        if path is None:
            raise FileNotFoundError(f"no prompt file given and the vbench package (which ships {VBENCH_INFO_FILE}) "
                                    f"is not installed: `pip install --no-deps vbench`, or pass a .txt/.json file")
    path = Path(path)
    if path.suffix.lower() == ".json":
        entries = _json_entries(path)
    else:
        if dimension is not None:
            raise ValueError(f"{path}: a plain-text prompt list has no dimensions to filter by")
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        entries = [(line, ()) for line in lines if line and not line.startswith("#")]
    prompts = [text for text, dims in entries if dimension is None or dimension in dims]
    if unique:
        prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise ValueError(f"{path}: no prompts" + (f" with dimension {dimension!r}" if dimension else ""))
    return prompts


def _json_entries(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of prompts")
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            entries.append((item, ()))
            continue
        text = item.get("prompt_en", item.get("prompt")) if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}: entry {i} has no \"prompt_en\" or \"prompt\" string")
        dims = item.get("dimension", ())
        entries.append((text, (dims,) if isinstance(dims, str) else tuple(dims)))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stepcache.eval.prompts", description=__doc__.splitlines()[0])
    parser.add_argument("--file", help="a .txt or .json prompt file (default: the installed vbench's list)")
    parser.add_argument("--dimension", help="keep only prompts of this VBench dimension")
    parser.add_argument("--keep-duplicates", action="store_true", help="do not drop repeated prompts")
    args = parser.parse_args(argv)
    try:
        prompts = load_prompts(args.file, args.dimension, unique=not args.keep_duplicates)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(prompts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
