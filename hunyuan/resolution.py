"""Which published HunyuanVideo table a run at a given resolution uses.

MagCache's ratios were calibrated at 720x1280 and 544x960, and the reference picks the table by height alone
(MC-HY:315-318). For any other height it never sets the table and crashes (seed-methods.md §10.4). We keep the
reference's choice for 720 and 544 and, for any other height, take the table nearest by pixel area (the token
count, which is what the residual norms depend on) and say so, because its ratios were not measured there.
"""
from __future__ import annotations

import warnings

from ..profiles import Profile, nearest_by_resolution


class ResolutionWarning(UserWarning):
    """A MagCache table is used at a resolution it was not calibrated at."""


# Each run at an unpublished size should say so, not only the first one in a process.
warnings.simplefilter("always", ResolutionWarning)


def published_heights(candidates: list[Profile]) -> list[int]:
    return sorted({p.resolution[0] for p in candidates if p.resolution})


def choose_by_resolution(candidates: list[Profile], height: int, width: int) -> tuple[Profile, str | None]:
    """(profile, warning text or None) for a ``height x width`` video among profiles that differ in resolution."""
    if not candidates:
        raise ValueError("no candidate profiles to choose from")
    exact = [p for p in candidates if p.resolution and p.resolution[0] == height]
    if exact:
        return nearest_by_resolution(exact, height, width), None
    chosen = nearest_by_resolution(candidates, height, width)
    heights = ", ".join(str(h) for h in published_heights(candidates))
    h, w = chosen.resolution or (height, width)
    message = (f"MagCache has no published HunyuanVideo table for height {height} (published heights: {heights}); "
               f"using {chosen.name} (calibrated at {h}x{w}, the nearest by pixel area). Its ratios were not "
               f"measured at {height}x{width}, so the skip schedule may be too aggressive or too timid; "
               f"a profile calibrated at this size can be passed instead.")
    return chosen, message


def warn_unpublished(message: str | None, stacklevel: int = 3) -> None:
    if message:
        warnings.warn(message, ResolutionWarning, stacklevel=stacklevel)
