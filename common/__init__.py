"""stepcache: training-free step caching (TeaCache, MagCache, EasyCache) for video diffusion transformers.

The public API (``enable``, ``disable``, ``stats``) is imported lazily so that ``import stepcache`` and the
model-free commands (``stepcache schedule``) do not pay for torch.
"""
__version__ = "0.1.0"

_API = {"enable", "disable", "stats"}


def __getattr__(name):
    if name in _API:
        from . import api
        return getattr(api, name)
    raise AttributeError(f"module 'stepcache' has no attribute {name!r}")
