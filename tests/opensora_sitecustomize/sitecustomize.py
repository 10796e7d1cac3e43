"""Test-only: the Open-Sora fork's engine on CPU for a whole Python process, so that an Open-Sora drop-in script runs as
a user runs it (``python experiments/magcache_opensora.py`` inside a MagCache checkout) without weights or a GPU.
Used by test_opensora_copied_script.py; does nothing unless ``STEPCACHE_TEST_OPENSORA_STANDINS=1``.

Put this folder and tests/ first on the process's PYTHONPATH and set ``OPENSORA_REPO`` to the checkout. Python imports
``sitecustomize`` at start; this one installs an import hook for the top-level module ``videosys`` and nothing else.
When the script imports ``videosys`` (stepcache's ``build_engine``), the hook returns the package of
:func:`opensora_fork_engine.install`: the checkout's modules, its own ``VideoSysEngine``, and a config whose pipeline
is the tiny one of opensora_fork_pipeline.py (see opensora_fork_engine.py for every stand-in).
"""
import os

if os.environ.get("STEPCACHE_TEST_OPENSORA_STANDINS") == "1":
    import importlib.abc
    import importlib.machinery
    import sys

    class _Installed(importlib.abc.Loader):
        def create_module(self, spec):
            import opensora_fork_engine
            return opensora_fork_engine.install(os.environ["OPENSORA_REPO"])

        def exec_module(self, module):
            pass

    class _VideoSysFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != "videosys" or "videosys" in sys.modules:
                return None
            return importlib.machinery.ModuleSpec(name, _Installed(), is_package=True)

    sys.meta_path.insert(0, _VideoSysFinder())
