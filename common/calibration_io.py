"""MagCache calibration in the official-repo scripts: the ratios one uncached run measured, as a profile file.

MagCache's table is, per CFG branch and per step, the mean over tokens of ``||r_t|| / ||r_{t-1}||`` where ``r`` is
the block-stack residual ``h_L - h0`` (MagCache4Wan2.1/magcache_generate.py, ``magcache_calibration``). The
reference also records the per-token std of that ratio and the mean cosine distance ``1 - cos(r_t, r_{t-1})``;
they are kept for inspection, not used by the policy.

The reference prints the list for the user to paste into its source. Here the measurement is written as a
``stepcache-profile/1`` file that every entry point loads by path (``profile=...``, ``--cache_profile``).

The measuring is :func:`stepcache.calibrate.install_calibration`, the one calibrator (``stepcache calibrate``
uses it too); this module turns its ratios into the reference's table layout and writes the file.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .methods.magcache import RULE as MAGCACHE_RULE, interleave_with_padding
from .outputs import write_json
from .profiles import FORMAT, Profile, load_profile


@dataclass
class RatioRecord:
    step: int
    ratio: float
    std: float
    cos_distance: float


def measured_ratios(runner) -> tuple[list[str], int, dict[str, list[RatioRecord]]]:
    """(branches in first-seen order, steps per branch, {branch: ratios}) of a calibration runner's last
    generation (every branch must have run the same number of steps)."""
    last = max((m.generation for m in runner.measures), default=None)
    measures = [m for m in runner.measures if m.generation == last]
    branches: list[str] = []
    for m in measures:
        if m.branch not in branches:
            branches.append(m.branch)
    counts = {b: sum(m.branch == b for m in measures) for b in branches}
    if len(set(counts.values())) > 1:
        raise RuntimeError(f"the branches ran different numbers of passes: {counts}")
    records = {b: [RatioRecord(m.step, m.ratio, m.ratio_std, m.cos_distance) for m in measures
                   if m.branch == b and m.ratio is not None] for b in branches}
    return branches, next(iter(counts.values()), 0), records


def calibrated_source(when: _dt.datetime | None = None, where: str | None = None) -> str:
    from . import __version__
    when = when or _dt.datetime.now(_dt.timezone.utc)
    text = f"calibrated by stepcache {__version__} on {when.strftime('%Y-%m-%d %H:%M UTC')}"
    return f"{text} ({where})" if where else text




def magcache_profile_data(*, name: str, description: str, model: dict[str, Any], recorder_or_ratios,
                          branches: Sequence[str], steps: int, source: str, measured_on: dict[str, Any],
                          defaults: dict[str, Any], presets: dict[str, Any] | None = None,
                          base: Profile | None = None) -> dict[str, Any]:
    """A profile dict holding a calibrated MagCache table.

    ``recorder_or_ratios`` is ``{branch: [RatioRecord, ...]}`` (:func:`measured_ratios`).
    The table keeps the decision rule of ``base``'s MagCache table (HunyuanVideo's ``<=``, Wan's ``<``), or
    without a base the released Wan rule (``<``, ``|1 - prod(ratio)|``, no square root). ``base``'s other method
    sections (TeaCache, EasyCache) are copied, named as copied, so that the file serves every method.
    """
    records = {b: list(recorder_or_ratios[b]) for b in branches}
    for b in branches:
        if len(records[b]) != steps - 1:
            raise ValueError(f"branch {b!r} has {len(records[b])} measured ratios; a {steps}-step run has "
                             f"{steps - 1} (every step after the first)")
    ratios = interleave_with_padding({b: [round(r.ratio, 5) for r in records[b]] for b in branches}, branches)
    rule = base.data.get("magcache", {}) if base is not None else {}
    data: dict[str, Any] = {
        "format": FORMAT,
        "name": name,
        "description": description,
        "model": model,
        "magcache": {
            "ratios": ratios,
            "steps": int(steps),
            "branches": list(branches),
            **{key: rule.get(key, default) for key, default in MAGCACHE_RULE.items()},
            "source": source,
            "measured_on": measured_on,
            "std": interleave_with_padding({b: [round(r.std, 5) for r in records[b]] for b in branches},
                                           branches, pad=0.0),
            "cos_distance": interleave_with_padding(
                {b: [round(r.cos_distance, 5) for r in records[b]] for b in branches}, branches, pad=0.0),
            "defaults": dict(defaults),
        },
    }
    if presets:
        data["magcache"]["presets"] = dict(presets)
    if rule.get("retention_zones"):  # part of the base's rule (Wan2.2 A14B's zones around the expert switch)
        data["magcache"]["retention_zones"] = json.loads(json.dumps(rule["retention_zones"]))
    if base is not None:
        from .methods import names
        for method in names():
            if method != "magcache" and base.has(method):
                section = json.loads(json.dumps(base.data[method]))
                section["copied_from_profile"] = base.name
                data[method] = section
    return data


def write_profile(path: str | os.PathLike, data: dict[str, Any]) -> Profile:
    """Write a profile file atomically and load it back, so that a file that cannot be used is never left."""
    path = Path(path).expanduser()
    if path.suffix != ".json":
        raise ValueError(f"a profile file must end in .json (got {str(path)!r})")
    Profile(str(data.get("name", path.stem)), data)  # the schema check, before anything is written
    write_json(path, data)
    return load_profile(str(path))
