"""The `stepcache` command. Each subcommand lives in the module that owns its feature; this file only wires them."""
from __future__ import annotations

import argparse
import importlib
import sys

from . import families
from .cliargs import OneLineParser
from .errors import run_cli

# (subcommand, module, one-line help). The module provides `add_arguments(parser)` and `run(args) -> int`.
# Imported lazily so that `stepcache schedule` never imports torch-heavy modules it does not need.
SUBCOMMANDS = [
    ("schedule", "stepcache.schedule", "print a method's pass pattern for a profile, without running a model"),
    ("generate", "stepcache.generate", "run a supported diffusers pipeline from a local folder with a cache method"),
    ("compare", "stepcache.eval.compare", "compare cached videos with uncached ones (PSNR, SSIM, LPIPS)"),
    ("profiles", "stepcache.profiles", "list the known profiles and what each one holds"),
    ("calibrate", "stepcache.calibrate", "measure a model's tables (all three methods) and write a profile file"),
    ("bench", "stepcache.eval.bench", "benchmark vs fewer steps, diffusers' caches and cache-dit on the demo model "
                                      "or your pipeline"),
    ("tune", "stepcache.eval.tune", "choose each method's setting per target speedup on your pipeline, check it on "
                                    "held-out prompts, and write a profile with presets named by speed"),
]


def subcommands() -> list[tuple[str, str, str]]:
    """The core's subcommands, then those the model families add (e.g. ``demo``)."""
    return SUBCOMMANDS + families.commands()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="stepcache",
        description="Training-free step caching (TeaCache, MagCache, EasyCache) for video diffusion transformers.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name, help_text in subcommands():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        if only == name:
            importlib.import_module(module_name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    known = {name for name, _, _ in subcommands()}
    parser = build_parser(command if command in known else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_cli(lambda: importlib.import_module(args._module).run(args), prog=f"stepcache {args.command}")


if __name__ == "__main__":
    sys.exit(main())
