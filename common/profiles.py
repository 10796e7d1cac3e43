"""Per-model profiles: the published (or calibrated) tables each method needs, loaded from data files.

A profile is a JSON file (format ``stepcache-profile/1``) named after the model it was measured on. The ones
that ship live in ``stepcache/profiles/``; a user's calibrated profile is any file with the same format. Every
table names its source. Nothing here guesses a profile from a checkpoint path: a profile is named, given as a
file, or matched on the model's config by the adapter (see :func:`match_profiles`).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ParameterError, ProfileError, StepcacheWarning
from .policies import compose_resample, expert_switch_step, nearest_resample
from .schema import RESAMPLE_MODES, check_profile_data

FORMAT = "stepcache-profile/1"
PROFILE_DIR = Path(__file__).with_name("profiles")
# A profile a pipeline folder carries (the saved demo; a folder you tuned with stepcache tune --out): the commands
# that take a folder use it when no --profile is given.
FOLDER_PROFILE = "stepcache-profile.json"
# Composing predicted the ratios measured at 10, 20, 30 and 75 steps from a 50-step calibration 4-20x better than
# the reference's nearest resampling on the demo model (docs/calibration/study.md), so it is the default;
# 'nearest' stays available by name.
DEFAULT_RESAMPLE = "compose"


@dataclass
class Profile:
    name: str
    data: dict[str, Any]
    path: Path | None = None
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        # Every profile, from a file or built in memory, passes the one schema check before anything reads it.
        check_profile_data(self.data, repr(str(self.path)) if self.path else f"{self.name!r}")

    @property
    def family(self) -> str:
        return self.data.get("model", {}).get("family", "")

    @property
    def resolution(self) -> tuple[int, int] | None:
        res = self.data.get("model", {}).get("resolution")
        return tuple(res) if res else None

    def method(self, method: str) -> dict[str, Any]:
        from .methods import names
        if method not in names():
            raise ParameterError(f"unknown method {method!r}; known methods: {', '.join(names())}")
        section = self.data.get(method)
        if not section:
            have = [m for m in names() if self.data.get(m)]
            raise ProfileError(
                f"profile {self.name!r} has no {method} table (it has: {', '.join(have) or 'none'}); "
                f"calibrate one with `stepcache calibrate` or choose another method")
        return section

    def has(self, method: str) -> bool:
        return bool(self.data.get(method))

    @property
    def experts(self) -> dict[str, Any] | None:
        """Where a two-expert model switches experts (``model.experts``), or None for a one-expert model."""
        return self.data.get("model", {}).get("experts")

    def expert_switch_step(self, num_steps: int) -> int:
        """The first step of the low-noise expert in a run of ``num_steps`` steps."""
        e = self.experts
        if not e:
            raise ProfileError(f"profile {self.name!r} is not for a two-expert model (it has no model.experts)")
        return expert_switch_step(num_steps, e["boundary"], e["shift"], int(e["num_train_timesteps"]),
                                  e["sigma_max"], e["sigma_min"])

    # --- MagCache ---------------------------------------------------------------------------------------------
    def magcache_branches(self) -> list[str]:
        return list(self.method("magcache").get("branches") or ["cond"])

    def magcache_ratios(self, num_steps: int, branch_index: int,
                        resample: str = DEFAULT_RESAMPLE) -> list[float]:
        """The ratio sequence of one branch, one value per step (index 0 is the padding 1.0), at ``num_steps``."""
        if resample not in RESAMPLE_MODES:
            raise ParameterError(f"resample={resample!r} is not one of {', '.join(RESAMPLE_MODES)}")
        section = self.method("magcache")
        ratios = [float(r) for r in section["ratios"]]
        branches = len(self.magcache_branches())
        return split_branch_ratios(ratios, branches, num_steps, branch_index, resample, self.name)


def split_branch_ratios(ratios: list[float], num_branches: int, num_steps: int, branch_index: int,
                        resample: str, label: str) -> list[float]:
    """De-interleave one branch's ratios (cond, uncond, cond, ... in the reference's layout) and fit them to
    ``num_steps`` the way the reference does: resample each branch separately, keep the padding at index 0."""
    if num_steps < 2:
        raise ParameterError(f"steps={num_steps} is too few; caching needs at least 2 steps")
    if not ratios or len(ratios) % num_branches:
        raise ProfileError(
            f"magcache table of {label!r} has {len(ratios)} entries, which does not split into {num_branches} "
            f"interleaved branch(es); it fits neither a step count nor resampling")
    branch = ratios[branch_index::num_branches]
    if len(branch) == num_steps:
        return branch
    if resample == "none":
        raise ProfileError(
            f"magcache table of {label!r} has {len(branch)} steps per branch but the run has {num_steps}; "
            f"allowed: exactly {len(branch)} steps, or resample='nearest' or 'compose'")
    return (compose_resample if resample == "compose" else nearest_resample)(branch, num_steps)


def _load_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile file {str(path)!r}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{str(path)!r} is not a stepcache profile (not JSON: {exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT or "name" not in data:
        raise ProfileError(f"{str(path)!r} is not a stepcache profile (expected a JSON object with "
                           f"\"format\": \"{FORMAT}\" and a \"name\")")
    return data


@lru_cache(maxsize=None)
def _builtin_index() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))}


def known_profiles() -> list[str]:
    return list(_builtin_index())


def load_profile(name_or_path: str | os.PathLike | Profile) -> Profile:
    """Load a shipped profile by name, or any profile file by path."""
    if isinstance(name_or_path, Profile):
        return name_or_path
    text = str(name_or_path)
    index = _builtin_index()
    if text in index:
        return Profile(text, _load_json(index[text]), index[text])
    path = Path(text).expanduser()
    if path.suffix == ".json" or os.sep in text or path.exists():
        if not path.exists():
            raise ProfileError(f"profile file {text!r} does not exist")
        data = _load_json(path)
        return Profile(data["name"], data, path)
    raise ProfileError(unknown_profile_message(text))


def unknown_profile_message(text: str) -> str:
    return (f"unknown profile {text!r}. Known profiles: {', '.join(known_profiles())}. "
            f"For another model, resolution or step count, calibrate one with `stepcache calibrate` "
            f"(or --magcache_calibration in the official-repo scripts) and pass the file it writes.")


def match_profiles(family: str, config: dict[str, Any], class_name: str | None = None) -> list[Profile]:
    """Shipped profiles whose model family and listed config entries all match ``config``."""
    found = []
    for name in known_profiles():
        profile = load_profile(name)
        model = profile.data.get("model", {})
        if model.get("family") != family or model.get("detect") is False:
            continue
        if class_name and model.get("classes") and class_name not in model["classes"]:
            continue
        wanted = model.get("config", {})
        if all(config.get(k) == v for k, v in wanted.items()):
            found.append(profile)
    return found


class ResolutionWarning(StepcacheWarning):
    """A table is used at a resolution it was not calibrated at."""


# Each run at an unpublished size should say so, not only the first one in a process.
warnings.simplefilter("always", ResolutionWarning)


def choose_by_resolution(profiles: list[Profile], height: int, width: int,
                         method: str | None = None) -> tuple[Profile, str | None]:
    """Among profiles that differ only in resolution, the one for a ``height x width`` video, and a warning text
    when none was calibrated at that size (else None). With ``method``, no warning when every candidate holds the
    same table for it (HunyuanVideo's TeaCache coefficients, say, are one set for all sizes).

    "720p" and "480P" name the short side, in either orientation, so a profile fits exactly when its short side
    is the video's; otherwise the one nearest by pixel area (the token count, which the residual norms depend on)
    is used, and the caller says so: its ratios were not measured there.
    """
    if not profiles:
        raise ProfileError("no candidate profiles to choose from")

    def by_area(p: Profile) -> float:
        h, w = p.resolution or (height, width)
        return abs(h * w - height * width)

    exact = [p for p in profiles if p.resolution and min(p.resolution) == min(height, width)]
    if exact:
        return min(exact, key=by_area), None
    chosen = min(profiles, key=by_area)
    if method is not None and len({json.dumps(p.data.get(method), sort_keys=True) for p in profiles}) == 1:
        return chosen, None
    sizes = ", ".join(f"{p.resolution[0]}x{p.resolution[1]}" for p in profiles if p.resolution)
    h, w = chosen.resolution or (height, width)
    return chosen, (f"no shipped profile was calibrated at {height}x{width} (calibrated sizes: {sizes}); using "
                    f"{chosen.name} ({h}x{w}, the nearest by pixel area). Its ratios were not measured at this "
                    f"size, so the skip schedule may be too aggressive or too timid; a profile calibrated at this "
                    f"size can be passed instead.")


def warn_resolution(message: str | None, stacklevel: int = 3) -> None:
    if message:
        warnings.warn(message, ResolutionWarning, stacklevel=stacklevel)


def check_profile_family(profile: Profile, family: str) -> None:
    if profile.family and profile.family != family:
        raise ProfileError(f"profile {profile.name!r} is for {profile.family!r} models, not {family!r}")


def config_hash(config: dict[str, Any]) -> str:
    """A short hash of a model's config (what a calibrated profile records it was measured on)."""
    text = json.dumps({k: v for k, v in sorted(config.items()) if not k.startswith("_")}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ProfileFitWarning(StepcacheWarning):
    """A calibrated profile is used on a model whose config differs from the one it was measured on."""


warnings.simplefilter("always", ProfileFitWarning)


def check_profile_fit(profile: Profile, model) -> list[str]:
    """Refuse a calibrated profile on another model class; return warnings for a different config."""
    measured = profile.data.get("measured_on")
    if not measured:
        return []
    cls = type(model).__name__
    if measured.get("model_class") and measured["model_class"] != cls:
        raise ProfileError(f"profile {profile.name!r} was calibrated on {measured['model_class']}, not {cls}; "
                           f"its tables mean nothing for another model class")
    notes = []
    config = dict(getattr(model, "config", {}) or {})
    if measured.get("config_hash") and config and config_hash(config) != measured["config_hash"]:
        notes.append(f"profile {profile.name!r} was calibrated on a {cls} with another config (hash "
                     f"{measured['config_hash']}, this one {config_hash(config)})")
    return notes


def operating_point_mismatch(profile: Profile | None, steps: int, guidance: float | None) -> str | None:
    """What differs between the operating point a tuned profile was tuned at and a generation's (steps, and the
    guidance scale when the entry point knows it), said as a note; None when nothing does or nothing was tuned."""
    tuned = profile.data.get("tuned", {}).get("operating_point") if profile is not None else None
    if not tuned:
        return None
    differ = []
    if tuned.get("steps") is not None and tuned["steps"] != steps:
        differ.append(f"{steps} steps")
    if tuned.get("guidance") is not None and guidance is not None and abs(float(guidance) - tuned["guidance"]) > 1e-6:
        differ.append(f"guidance {guidance:g}")
    if not differ:
        return None
    return (f"profile {profile.name} was tuned at {tuned.get('steps')} steps and guidance {tuned.get('guidance')}; "
            f"this generation has {' and '.join(differ)}, so its presets' measured speed and quality are not this "
            f"run's")


def profile_summary(profile: Profile) -> str:
    lines = [f"{profile.name}: {profile.data.get('description', '')}"]
    from .methods import names
    for method in names():
        if not profile.has(method):
            continue
        section = profile.method(method)
        defaults = section.get("defaults") or {k: section[k] for k in ("thresh", "warmup_steps") if k in section}
        presets = ", ".join(section.get("presets", {}))
        lines.append(f"  {method}: defaults {defaults}" + (f"; presets: {presets}" if presets else ""))
        if method == "magcache":
            lines.append(f"    {len(section['ratios'])} ratios for {section['steps']} steps x "
                         f"{len(section.get('branches') or ['cond'])} branch(es); source: {section.get('source')}")
            if section.get("retention_zones"):
                lines.append(f"    retention zones: {section['retention_zones']}")
    missing = [method for method in names() if not profile.has(method)]
    if missing:
        lines.append(f"  {', '.join(missing)}: no table in this profile (none was published): `stepcache calibrate` "
                     f"writes a profile with them")
    if profile.experts:
        e = profile.experts
        lines.append(f"  experts: the low-noise expert takes over at step {e['switch_step']} of {e['steps']} "
                     f"(boundary {e['boundary']}, shift {e['shift']}); source: {e['source']}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("names", nargs="*", help="profiles to describe (default: all shipped profiles)")


def run(args) -> int:
    for name in args.names or known_profiles():
        print(profile_summary(load_profile(name)))
    return 0
