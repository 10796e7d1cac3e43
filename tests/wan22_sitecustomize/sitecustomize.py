"""Test-only: wan22_official_tiny's CPU stand-ins for a whole Python process, so that the Wan2.2 drop-in scripts run
as a user runs them (``python magcache_generate.py ...`` in the root of a Wan2.2 checkout) without weights or a GPU.
Used by test_wan22_copied_scripts.py; does nothing unless ``STEPCACHE_TEST_WAN22_STANDINS=1``.

Put this folder and tests/ (the harness) first on the process's PYTHONPATH. Python imports ``sitecustomize`` at
start; this one installs an import hook for the top-level module ``generate`` and nothing else. When the script
imports ``generate`` (stepcache's ``import_upstream``), the hook looks the module up where Python would (the script's
own folder first, through ``PathFinder`` on ``sys.path``): where there is no ``generate.py`` of a Wan2.2 checkout
it steps aside and the import fails as it would for a user. Where there is one, it loads that checkout through the
harness (:func:`wan22_official_tiny.load`, which skips the package ``__init__``s and takes upstream's modules out of
``sys.modules`` again), puts ``wan`` and its loaded submodules back into ``sys.modules`` and returns that
``generate`` module, with, for the rest of the process:

* ``wan.WanT2V`` / ``wan.WanI2V`` / ``wan.WanTI2V``: :func:`fake_constructors` (tiny random ``WanModel``s, stub T5
  and VAE), each model counted by a ``helpers.BlockWork``;
* ``flash_attention``: the SDPA reference (:func:`cpu_attention`); ``torch.cuda.synchronize``: a no-op
  (:func:`cuda_sync_noop`); 64*64 in the size tables (:func:`tiny_sizes`);
* ``generate.save_video``: :func:`save_video_with_torch` (``torch.save`` of the video tensor).

``STEPCACHE_TEST_WAN22_TRACE=PATH``: at exit, a JSON file with the ``generate.py`` the script got (or null), the
samplers upstream's ``generate()`` built and, per model in build order, which of its calls ran blocks ("C") or none
(".").
"""
import os

if os.environ.get("STEPCACHE_TEST_WAN22_STANDINS") == "1":
    import atexit
    import contextlib
    import importlib.abc
    import importlib.machinery
    import importlib.util
    import json
    import sys
    import types

    _STATE = {"generate": None, "made": [], "counters": [], "stack": contextlib.ExitStack()}

    def _loaded_modules(package: types.ModuleType) -> dict:
        """``package`` and every module loaded under it (an imported submodule is an attribute of its parent)."""
        found = {package.__name__: package}
        for attr, value in vars(package).items():
            if isinstance(value, types.ModuleType) and value.__name__ == f"{package.__name__}.{attr}":
                found.update(_loaded_modules(value))
        return found

    def _install(repo: str) -> types.ModuleType:
        from helpers import BlockWork
        from wan22_official_tiny import (cpu_attention, cuda_sync_noop, fake_constructors, load,
                                         save_video_with_torch, tiny_sizes)
        up = load(repo)
        stack = _STATE["stack"]  # entered for the process, never left
        stack.enter_context(cpu_attention(up))
        stack.enter_context(tiny_sizes(up))
        stack.enter_context(cuda_sync_noop())

        def count(model):
            _STATE["counters"].append(BlockWork(model))
            return model

        for name, build in fake_constructors(up, _STATE["made"], wrap=count).items():
            setattr(up.wan, name, build)
        up.generate.save_video = save_video_with_torch
        sys.modules.update(_loaded_modules(up.wan))  # generate.py's `wan` is the package the script sees too
        _STATE["generate"] = up.generate
        return up.generate

    class _Loaded(importlib.abc.Loader):
        def __init__(self, module):
            self.module = module

        def create_module(self, spec):
            return self.module

        def exec_module(self, module):
            pass

    class _GenerateFinder(importlib.abc.MetaPathFinder):
        busy = False

        def find_spec(self, name, path=None, target=None):
            if name != "generate" or path is not None or self.busy:
                return None
            found = importlib.machinery.PathFinder.find_spec(name, sys.path)
            if found is None or not found.origin or os.path.basename(found.origin) != "generate.py":
                return None
            repo = os.path.dirname(found.origin)
            if not os.path.isfile(os.path.join(repo, "wan", "textimage2video.py")):
                return None  # not a Wan2.2 checkout: imported as usual
            self.busy = True  # the harness imports this generate.py itself
            try:
                module = _install(repo)
            finally:
                self.busy = False
            return importlib.util.spec_from_loader(name, _Loaded(module), origin=found.origin)

    sys.meta_path.insert(0, _GenerateFinder())

    def _write_trace():
        path = os.environ.get("STEPCACHE_TEST_WAN22_TRACE")
        if not path:
            return
        generate = _STATE["generate"]
        trace = {"generate_file": getattr(generate, "__file__", None),
                 "samplers": [type(s).__name__ for s in _STATE["made"]],
                 "ran": [c.ran() for c in _STATE["counters"]]}
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(trace, handle)

    atexit.register(_write_trace)
