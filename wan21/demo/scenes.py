"""Procedural video clips for the demo model, their prompts, and the read-back that checks a video against its prompt.

A scene is one object (a square or a disc) of one of six saturated colours moving in a straight line in one
of four directions over a grey background (dark, light, or a gradient at a random angle). Clips are
``FRAMES`` frames of ``SIZE`` x ``SIZE`` RGB in [0, 1], rendered with anti-aliased edges, vectorised in torch
and fully determined by a ``torch.Generator``. Every scene is described by a short prompt such as
``"a red disc moving left on a dark background"``.

:func:`read_back` recovers colour and direction from the pixels of any video (generated or ground truth):
object pixels are the saturated ones, colour is their mean matched to the palette, direction is the motion
of their saturation-weighted centroid from the first to the last frame.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

FRAMES = 8
SIZE = 32
COLOURS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.15),
    "blue": (0.12, 0.25, 0.95),
    "yellow": (0.92, 0.85, 0.10),
    "cyan": (0.10, 0.80, 0.88),
    "magenta": (0.86, 0.12, 0.86),
}
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy); y grows downwards
SHAPES = ("square", "disc")
BACKGROUNDS = ("dark", "light", "gradient")
COLOUR_NAMES = tuple(COLOURS)
DIRECTION_NAMES = tuple(DIRECTIONS)
PALETTE = torch.tensor([COLOURS[c] for c in COLOUR_NAMES])
DIR_VECTORS = torch.tensor([DIRECTIONS[d] for d in DIRECTION_NAMES], dtype=torch.float32)

# Read-back thresholds (see module docstring)
SATURATION = 0.35     # a pixel is "object" when max-min over RGB exceeds this
MIN_PIXELS = 12       # an object is visible in a frame when it has at least this many object pixels ...
MAX_PIXELS = 260      # ... and at most this many (objects are about 55-150 px; more means colour everywhere)
MIN_MOTION = 4.0      # px of centroid motion from the first to the last frame, along the dominant axis


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    direction: str
    background: str

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} background"


ALL_SCENES = [Scene(c, s, d, b) for c, s, d, b in itertools.product(COLOUR_NAMES, SHAPES, DIRECTION_NAMES,
                                                                     BACKGROUNDS)]
VOCAB = ("a", "moving", "on", "background", *COLOUR_NAMES, *SHAPES, *DIRECTION_NAMES, *BACKGROUNDS)


# The order `stepcache bench` takes the prompts in: a fixed shuffle, so a benchmark's first prompts cover the scenes
# and its calibration prompts (from the far end) are never among them.
BENCH_ORDER_SEED = 200_000


def bench_prompts() -> list[str]:
    """Every scene's prompt, in the bench's fixed order."""
    order = torch.randperm(len(ALL_SCENES), generator=torch.Generator().manual_seed(BENCH_ORDER_SEED)).tolist()
    return [ALL_SCENES[i].prompt for i in order]


def parse_prompt(prompt: str) -> Scene:
    words = prompt.lower().replace(",", " ").split()
    pick = lambda names, default: next((w for w in words if w in names), default)  # noqa: E731
    return Scene(pick(COLOUR_NAMES, "red"), pick(SHAPES, "square"), pick(DIRECTION_NAMES, "right"),
                 pick(BACKGROUNDS, "dark"))


def sample_scenes(n: int, generator: torch.Generator) -> list[Scene]:
    idx = torch.randint(len(ALL_SCENES), (n,), generator=generator)
    return [ALL_SCENES[i] for i in idx.tolist()]


def render(scenes: list[Scene], generator: torch.Generator) -> torch.Tensor:
    """Clips for ``scenes``: float tensor (B, 3, FRAMES, SIZE, SIZE) in [0, 1]. Everything random comes from
    ``generator``, drawn in a fixed order, so the same generator state gives the same clips."""
    b = len(scenes)
    g = generator
    u = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    colour = PALETTE[[COLOUR_NAMES.index(s.colour) for s in scenes]]                    # (B, 3)
    colour = (colour + (u(b, 3) - 0.5) * 0.08).clamp(0, 1)
    direction = DIR_VECTORS[[DIRECTION_NAMES.index(s.direction) for s in scenes]]         # (B, 2)
    disc = torch.tensor([s.shape == "disc" for s in scenes])
    size = 9.0 + 3.0 * u(b)                       # square side or disc diameter, 9-12 px
    size = torch.where(disc, size + 1.0, size)    # discs look smaller at the same diameter
    speed = 2.0 + 0.5 * u(b)                      # px per frame: 14-17.5 px over the clip
    half = size / 2
    travel = speed * (FRAMES - 1)
    # start so that the object stays fully inside the frame for the whole clip
    lo_along = half
    hi_along = SIZE - half - travel
    along0 = lo_along + (hi_along - lo_along) * u(b)
    across = half + (SIZE - 2 * half) * u(b)
    moving_x = direction[:, 0] != 0
    sign = direction.sum(1)                       # +1 right/down, -1 left/up
    start_along = torch.where(sign > 0, along0, SIZE - along0)
    cx0 = torch.where(moving_x, start_along, across)
    cy0 = torch.where(moving_x, across, start_along)
    t = torch.arange(FRAMES, dtype=torch.float32)
    cx = cx0[:, None] + direction[:, 0:1] * speed[:, None] * t                             # (B, T)
    cy = cy0[:, None] + direction[:, 1:2] * speed[:, None] * t
    pix = torch.arange(SIZE, dtype=torch.float32) + 0.5
    dx = pix[None, None, None, :] - cx[:, :, None, None]                                   # (B, T, 1, W)
    dy = pix[None, None, :, None] - cy[:, :, None, None]                                   # (B, T, H, 1)
    h = half[:, None, None, None]
    square = (0.5 + h - dx.abs()).clamp(0, 1) * (0.5 + h - dy.abs()).clamp(0, 1)
    circle = (0.5 + h - (dx ** 2 + dy ** 2).sqrt()).clamp(0, 1)
    alpha = torch.where(disc[:, None, None, None], circle, square)                        # (B, T, H, W)

    kind = torch.tensor([BACKGROUNDS.index(s.background) for s in scenes])
    dark = 0.06 + 0.2 * u(b)
    light = 0.55 + 0.25 * u(b)
    angle = u(b) * 2 * np.pi
    g_lo, g_hi = 0.08 + 0.15 * u(b), 0.55 + 0.25 * u(b)
    tint = (u(b, 3) - 0.5) * 0.03
    proj = ((pix[None, None, :] - SIZE / 2) * torch.sin(angle)[:, None, None]
            + (pix[None, :, None] - SIZE / 2) * torch.cos(angle)[:, None, None]) / (SIZE * 0.72) + 0.5
    gradient = g_lo[:, None, None] + (g_hi - g_lo)[:, None, None] * proj.clamp(0, 1)       # (B, H, W)
    level = torch.where((kind == 0)[:, None, None], dark[:, None, None],
                        torch.where((kind == 1)[:, None, None], light[:, None, None], gradient))
    bg = (level[:, None] + tint[:, :, None, None]).clamp(0, 1)                             # (B, 3, H, W)
    a = alpha[:, None]                                                                     # (B, 1, T, H, W)
    video = bg[:, :, None] * (1 - a) + colour[:, :, None, None, None] * a
    return video.clamp(0, 1)


def make_batch(n: int, generator: torch.Generator) -> tuple[list[Scene], torch.Tensor]:
    scenes = sample_scenes(n, generator)
    return scenes, render(scenes, generator)


@dataclass
class ReadBack:
    colour: str | None
    direction: str | None
    valid: bool
    reason: str = ""

    def matches(self, scene: Scene) -> bool:
        return self.valid and self.colour == scene.colour and self.direction == scene.direction


def read_back(video) -> ReadBack:
    """Colour and direction of the one moving object in ``video``: (T, H, W, 3) or (3, T, H, W), floats in
    [0, 1] or uint8."""
    v = torch.as_tensor(np.asarray(video))
    if v.dtype == torch.uint8:
        v = v.float() / 255
    v = v.float()
    if v.shape[0] == 3 and v.shape[-1] != 3:
        v = v.permute(1, 2, 3, 0)
    sat = v.max(-1).values - v.min(-1).values                                             # (T, H, W)
    mask = sat > SATURATION
    counts = mask.flatten(1).sum(1)
    if counts[0] < MIN_PIXELS or counts[-1] < MIN_PIXELS:
        return ReadBack(None, None, False, f"no object in the first or last frame ({counts.tolist()})")
    if (counts > MAX_PIXELS).any():
        return ReadBack(None, None, False, f"too many saturated pixels ({counts.tolist()})")
    mean = v[mask].mean(0)
    colour = COLOUR_NAMES[int(((PALETTE - mean) ** 2).sum(1).argmin())]
    w = sat * mask
    ys, xs = torch.meshgrid(torch.arange(v.shape[1], dtype=torch.float32),
                            torch.arange(v.shape[2], dtype=torch.float32), indexing="ij")

    def centroid(i):
        total = w[i].sum()
        return torch.stack([(w[i] * xs).sum() / total, (w[i] * ys).sum() / total])

    motion = centroid(-1) - centroid(0)
    axis = int(motion.abs().argmax())
    if motion[axis].abs() < MIN_MOTION:
        return ReadBack(colour, None, False, f"moves only {float(motion.abs().max()):.1f} px")
    vec = [0, 0]
    vec[axis] = 1 if motion[axis] > 0 else -1
    direction = DIRECTION_NAMES[DIR_VECTORS.tolist().index([float(vec[0]), float(vec[1])])]
    return ReadBack(colour, direction, True)
