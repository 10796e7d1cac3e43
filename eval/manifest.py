"""The timing manifest: how the generation runners tell `stepcache compare` what each video cost.

A runner writes `manifest.json` (schema 1: the method, optional label and params, and per video its `seconds`,
with optional `dit_seconds`, `computed_passes` and `total_passes`) into the folder of videos it generated; the
uncached baseline run writes one too. Speedup is the ratio of mean generation times over the videos both
manifests time; pass speedup is total over computed passes.

Design notes: docs/compare.md#timing-manifests
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CompareError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1


@dataclass
class VideoTiming:
    seconds: float
    dit_seconds: float | None = None
    computed_passes: int | None = None
    total_passes: int | None = None


@dataclass
class Manifest:
    method: str
    label: str | None = None
    params: dict = field(default_factory=dict)
    baseline_seconds: float | None = None
    videos: dict[str, VideoTiming] = field(default_factory=dict)

    @property
    def display_label(self) -> str:
        if self.label:
            return self.label
        settings = " ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.method} {settings}".strip()

    def add_video(self, name: str, seconds: float, dit_seconds: float | None = None,
                  computed_passes: int | None = None, total_passes: int | None = None) -> None:
        self.videos[name] = VideoTiming(seconds, dit_seconds, computed_passes, total_passes)

    def to_json(self) -> dict:
        out = {"schema": SCHEMA_VERSION, "method": self.method, "label": self.label, "params": self.params,
               "baseline_seconds": self.baseline_seconds,
               "videos": {name: {k: v for k, v in vars(t).items() if v is not None} for name, t in self.videos.items()}}
        return {k: v for k, v in out.items() if v is not None}

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `manifest.json` atomically, so a reader never sees half a file while a runner is still going."""
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path


def load_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The manifest of a folder, None if it has none; CompareError if it exists but breaks the schema."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        videos = {}
        for name, entry in data.get("videos", {}).items():
            seconds = float(entry["seconds"])
            if not math.isfinite(seconds) or seconds <= 0:
                raise ValueError(f"videos[{name!r}].seconds must be a positive number, got {entry['seconds']!r}")
            videos[name] = VideoTiming(seconds, _optional(entry, "dit_seconds", float),
                                       _optional(entry, "computed_passes", int), _optional(entry, "total_passes", int))
        baseline = _optional(data, "baseline_seconds", float)
        return Manifest(method=str(data.get("method", "unknown")), label=data.get("label"),
                        params=dict(data.get("params") or {}), baseline_seconds=baseline, videos=videos)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CompareError(f"{path}: not a valid timing manifest ({exc}); the schema is in "
                           f"stepcache/eval/manifest.py") from None


def record_video(folder: str | os.PathLike, name: str, *, method: str, seconds: float, params: dict | None = None,
                 label: str | None = None, dit_seconds: float | None = None, computed_passes: int | None = None,
                 total_passes: int | None = None) -> Path:
    """Add (or replace) one video's timing in `folder`'s manifest, creating the manifest on first use.

    Called by the generation runners after each video. One folder holds one method and setting: a video made with
    another one is still recorded (its generation is not thrown away), with a warning that the folder's label and
    speedup now mix two settings.
    """
    params = dict(params or {})
    manifest = load_manifest(folder) or Manifest(method=method, label=label, params=params)
    if (manifest.method, manifest.params) != (method, params):
        warnings.warn(f"{Path(folder) / MANIFEST_NAME} describes {manifest.display_label!r}, but {name} was made "
                      f"with {Manifest(method, params=params).display_label!r}; write each setting to its own "
                      f"folder, or its speedup and quality are reported under the first one", stacklevel=2)
    manifest.add_video(name, seconds, dit_seconds, computed_passes, total_passes)
    return manifest.save(folder)


def _optional(entry: dict, key: str, kind):
    value = entry.get(key)
    return None if value is None else kind(value)


def timing(reference: Manifest | None, generated: Manifest | None, names: list[tuple[str, str]]) -> dict:
    """Speedup figures of a generated run over the reference run (empty if unknown).

    `names` holds (reference file name, generated file name) per compared pair: equal in folder mode, free in
    pair mode.
    """
    if generated is None:
        return {}
    out: dict = {}
    timed = [(r, g) for r, g in names if g in generated.videos]
    if reference is not None:
        timed = [(r, g) for r, g in timed if r in reference.videos]
        baseline_total = sum(reference.videos[r].seconds for r, _ in timed)
    elif generated.baseline_seconds is not None:
        baseline_total = generated.baseline_seconds * len(timed)
    else:
        baseline_total = None
    if timed and baseline_total:
        seconds_total = sum(generated.videos[g].seconds for _, g in timed)
        out.update(speedup=baseline_total / seconds_total, seconds_mean=seconds_total / len(timed),
                   baseline_seconds_mean=baseline_total / len(timed), timed_videos=len(timed))
    passes = [generated.videos[g] for _, g in names if g in generated.videos]
    if passes and all(t.computed_passes and t.total_passes for t in passes):
        out["pass_speedup"] = sum(t.total_passes for t in passes) / sum(t.computed_passes for t in passes)
    return out
