"""LPIPS (v0.1) without torchvision, and the search for its two weight files.

The `lpips` package builds its backbone through torchvision, which PyPI does not ship importable beside a CPU
build of torch, so this module rebuilds the same computation with plain torch.nn; it reproduces
`lpips.LPIPS` exactly given the same weights, by default as the published scripts use it (`spatial=True`,
mean of the map: `spatial_mean=True`). Weights are never downloaded: the backbone from --lpips-weights,
$LPIPS_BACKBONE_PATH or torchvision's cache; the 6 KB heads from --lpips-heads or an installed `lpips` or
`torchmetrics`, found without importing either.

Design notes: docs/compare.md#lpips-weights-offline
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import CompareError

BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
BACKBONE_URLS = {name: f"https://download.pytorch.org/models/{file}" for name, file in BACKBONE_FILES.items()}
BACKBONE_ENV = "LPIPS_BACKBONE_PATH"
# Exclusive ends of the slices of torchvision's `features` after which LPIPS taps the activations (after ReLU).
TAP_ENDS = {"alex": (2, 5, 8, 10, 12), "vgg": (4, 9, 16, 23, 30)}
TAP_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# Where the two packages that ship the heads keep them, relative to the package directory.
HEAD_LOCATIONS = (("lpips", "weights/v0.1/{net}.pth"), ("torchmetrics", "functional/image/lpips_models/{net}.pth"))
SPATIAL_REDUCTION = "mean of the spatial map (lpips spatial=True, as the published scripts)"
# The scaling layer maps [-1, 1] inputs to the ImageNet statistics the backbone was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def backbone_features(net: str) -> nn.Sequential:
    """The `features` part of torchvision's alexnet / vgg16, with identical layer indices (so state dicts load)."""
    if net == "alex":
        return nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(True), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(True),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(3, 2))
    if net == "vgg":
        layers, channels = [], 3
        for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
            if width == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(True)]
                channels = width
        return nn.Sequential(*layers)
    raise ValueError(f"unknown LPIPS network {net!r}; choose from {sorted(BACKBONE_FILES)}")


class LPIPS(nn.Module):
    """LPIPS distance per image pair. Build it with `load_lpips` unless you already hold the state dicts."""

    def __init__(self, net: str, backbone_state: dict, head_state: dict, spatial_mean: bool = True):
        super().__init__()
        self.net = net
        self.spatial_mean = spatial_mean
        self.features = backbone_features(net)
        self.tap_ends = TAP_ENDS[net]
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS[net])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.features.load_state_dict(backbone_state)
        for i, head in enumerate(self.heads):
            head.weight.data.copy_(head_state[f"lin{i}.model.1.weight"])
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, start = [], 0
        for end in self.tap_ends:
            x = self.features[start:end](x)
            taps.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            start = end
        return taps

    @torch.no_grad()
    def forward(self, reference: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) tensors in [-1, 1] -> (N,) distances."""
        size = reference.shape[-2:]
        taps_a = self._taps((reference - self.shift) / self.scale)
        taps_b = self._taps((generated - self.shift) / self.scale)
        total = 0
        for head, a, b in zip(self.heads, taps_a, taps_b):
            layer = head((a - b) ** 2)
            if self.spatial_mean:
                # Summing the upsampled maps before the mean (not after) keeps lpips' order of float additions.
                total = total + F.interpolate(layer, size=size, mode="bilinear", align_corners=False)
            else:
                total = total + layer.mean((2, 3), keepdim=True)
        return total.mean((1, 2, 3))


@dataclass
class LpipsSetup:
    """Outcome of the weight search: a ready scorer, or the reason LPIPS is skipped (then `scorer` is None)."""

    scorer: object | None
    description: dict

    @property
    def available(self) -> bool:
        return self.scorer is not None


def default_backbone_path(net: str = "alex") -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME and falls back to ~/.cache/torch, like torchvision's downloader.
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def find_heads(net: str = "alex") -> Path | None:
    """The heads file inside an installed lpips or torchmetrics package, found without importing either."""
    for package, relative in HEAD_LOCATIONS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / relative.format(net=net)
            if candidate.is_file():
                return candidate
    return None


def load_backbone_state(path: Path, net: str) -> dict:
    """`features.*` of a torchvision checkpoint (full or trimmed), or a bare `features` state dict."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompareError(f"{path}: cannot load LPIPS backbone weights ({exc})") from None
    if not isinstance(state, dict):
        raise CompareError(f"{path}: not a state dict")
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    expected = backbone_features(net).state_dict()
    wrong = sorted(k for k in expected if k not in state or state[k].shape != expected[k].shape)
    if wrong:
        raise CompareError(f"{path}: not a torchvision {net} checkpoint (missing or misshapen: {', '.join(wrong)})")
    return {k: state[k] for k in expected}


def load_head_state(path: Path, net: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CompareError(f"{path}: cannot load LPIPS head weights ({exc})") from None
    keys = [f"lin{i}.model.1.weight" for i in range(len(TAP_CHANNELS[net]))]
    wrong = [k for k, c in zip(keys, TAP_CHANNELS[net]) if k not in state or state[k].shape != (1, c, 1, 1)]
    if wrong:
        raise CompareError(f"{path}: not LPIPS v0.1 {net} heads (missing or misshapen: {', '.join(wrong)})")
    return state


def _explicit_path(path, what: str) -> Path:
    # A path the user named must exist: silently skipping LPIPS after a typo would look like a missing metric.
    path = Path(path).expanduser()
    if not path.is_file():
        raise CompareError(f"{what} {path}: no such file")
    return path


def missing_weights_message(net: str, backbone_missing: bool, heads_missing: bool) -> str:
    parts = []
    if backbone_missing:
        parts.append(
            f"the {net} backbone file {BACKBONE_FILES[net]} was not found: pass --lpips-weights PATH, set "
            f"${BACKBONE_ENV}, or put it at {default_backbone_path(net)} (download it once, on any machine with "
            f"internet, from {BACKBONE_URLS[net]})")
    if heads_missing:
        parts.append(
            f"the LPIPS head file ({net}.pth, 6 KB) was not found: `pip install torchmetrics`, or "
            f"`pip install --no-deps lpips==0.1.4`, or pass --lpips-heads PATH")
    return "LPIPS skipped: " + "; ".join(parts)


def load_lpips(net: str = "alex", weights=None, heads=None, device: str | torch.device = "cpu") -> LpipsSetup:
    """Find the weight files and build the LPIPS scorer, or explain what is missing.

    Raises CompareError when a path the user named explicitly (argument or $LPIPS_BACKBONE_PATH) is missing or is
    not the right kind of file; returns an unavailable setup when the default locations are simply empty.
    """
    if net not in BACKBONE_FILES:
        raise CompareError(f"unknown LPIPS network {net!r}; choose from {sorted(BACKBONE_FILES)}")
    if weights is not None:
        backbone, source = _explicit_path(weights, "--lpips-weights"), "--lpips-weights"
    elif os.environ.get(BACKBONE_ENV):
        backbone, source = _explicit_path(os.environ[BACKBONE_ENV], f"${BACKBONE_ENV}"), f"${BACKBONE_ENV}"
    else:
        backbone, source = default_backbone_path(net), "torch hub cache"
    head_path = _explicit_path(heads, "--lpips-heads") if heads is not None else find_heads(net)

    backbone_missing, heads_missing = not backbone.is_file(), head_path is None
    if backbone_missing or heads_missing:
        reason = missing_weights_message(net, backbone_missing, heads_missing)
        return LpipsSetup(None, {"status": "skipped", "net": net, "reason": reason})
    if source == "torch hub cache" and heads is None:
        # Nothing was named explicitly and torchvision's cache holds the backbone: this is exactly the situation
        # upstream lpips is built for, so prefer it where it imports (it gives the same numbers as LPIPS above).
        upstream = _upstream_lpips(net, device)
        if upstream is not None:
            return upstream
    model = LPIPS(net, load_backbone_state(backbone, net), load_head_state(head_path, net)).to(device)
    return LpipsSetup(model, {"status": "ok", "implementation": "stepcache.eval.lpips", "net": net,
                              "backbone": str(backbone), "backbone_source": source, "heads": str(head_path),
                              "reduction": SPATIAL_REDUCTION})


def _upstream_lpips(net: str, device) -> LpipsSetup | None:
    try:
        import lpips as upstream  # needs a working torchvision, which a CPU torch from PyPI does not have

        model = upstream.LPIPS(net=net, spatial=True, verbose=False).to(device).eval().requires_grad_(False)
    except Exception:  # torchvision missing or broken (ImportError, RuntimeError "operator ... does not exist")
        return None

    @torch.no_grad()
    def scorer(reference: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        return model(reference, generated).mean((1, 2, 3))

    return LpipsSetup(scorer, {"status": "ok", "implementation": f"lpips {getattr(upstream, '__version__', '')}".strip(),
                               "net": net, "backbone": str(default_backbone_path(net)),
                               "backbone_source": "torch hub cache", "heads": "lpips package",
                               "reduction": SPATIAL_REDUCTION})
