"""Which published HunyuanVideo table a run at a given resolution uses: the core's rule (short side exact, else
the nearest by pixel area, with a warning), where the reference picks by height and crashes on any other
(MagCache4HunyuanVideo/magcache_sample_video.py picks its table by `height == 720` or `544`)."""
from ..profiles import ResolutionWarning, choose_by_resolution, warn_resolution

warn_unpublished = warn_resolution

__all__ = ["ResolutionWarning", "choose_by_resolution", "warn_unpublished"]
