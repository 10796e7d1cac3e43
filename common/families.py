"""The model families stepcache reaches, each declared by its own package: the core names none of them.

A family package (each model folder of this project, or a package of your own) exports ``FAMILY``, a
:class:`Family`, and is listed under the ``stepcache.families`` entry points (setup.py). The core reads from it which adapter serves which model class, which diffusers pipelines ``generate`` and
``calibrate`` can run and how to call them, named calibration targets (``stepcache calibrate --model demo``)
and extra ``stepcache`` subcommands (``stepcache demo``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any, Callable

GROUP = "stepcache.families"


def load_object(spec: str) -> Any:
    """``"package.module:attribute"`` -> the attribute, imported only when asked for."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


@dataclass(frozen=True)
class Pipeline:
    """A diffusers pipeline class of a family, and how ``stepcache generate`` / ``calibrate`` run it.

    ``guidance`` is the default of ``--guidance`` and what it means for this pipeline; ``true_cfg`` whether
    ``--true-cfg`` is passed as ``true_cfg_scale``; ``needs_image`` whether ``--image`` is required; ``load`` a
    ``"module:function"`` with ``load(folder, dtype, device)`` when the plain ``from_pretrained`` is not right;
    ``defaults`` the pipeline's own values of ``height``, ``width``, ``frames``, ``steps`` and ``dtype`` where
    they are not the commands' (a model trained at another size); ``ships_code`` whether a folder of this class
    carries its code (model_index.json names it ``[module, class]``), which ``load`` replaces with the family's
    own copy, so that nothing in the folder runs; ``decode`` a ``"module:function"`` with ``decode(pipe,
    latents)``, the pipeline's own decoding of ``output_type="latent"`` latents into float RGB (B, T, H, W, 3) in
    [0, 1] (``stepcache bench --pipeline`` stores latents and scores videos); ``prompts`` a ``"module:function"``
    giving the prompts ``bench --pipeline`` uses when given none (a model trained on its own vocabulary);
    ``guider`` whether the guidance scale is the pipeline's guider's (HunyuanVideo 1.5: set on ``pipe.guider``, no
    ``guidance_scale`` argument); ``size_from_image`` whether the pipeline sizes the video from its first frame
    (no ``height`` / ``width`` arguments).
    """
    transformer: str
    guidance: float
    guidance_help: str
    true_cfg: bool = False
    needs_image: bool = False
    load: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    ships_code: bool = False
    decode: str | None = None
    prompts: str | None = None
    guider: bool = False
    size_from_image: bool = False

    def call_kwargs(self, guidance: float | None, true_cfg: float, pipe: Any = None) -> dict[str, Any]:
        """The guidance arguments of a pipeline call, from the command line's values. A guider pipeline takes none:
        a given scale is set on ``pipe``'s guider (None keeps the guider's own, e.g. a distilled checkpoint's 1.0)."""
        if self.guider:
            if guidance is not None:
                if pipe is None:
                    raise ValueError("this pipeline's guidance is set on its guider: pass the pipeline")
                pipe.guider = pipe.guider.new(guidance_scale=float(guidance))
            return {}
        kwargs: dict[str, Any] = {"guidance_scale": self.guidance if guidance is None else guidance}
        if self.true_cfg:
            kwargs["true_cfg_scale"] = true_cfg
        return kwargs

    def size_kwargs(self, height: int, width: int) -> dict[str, Any]:
        """The size arguments of a pipeline call (none where the first frame sets the size)."""
        return {} if self.size_from_image else {"height": height, "width": width}


@dataclass(frozen=True)
class Family:
    name: str  # a profile's model.family
    adapters: dict[str, str] = field(default_factory=dict)  # model class name -> "module:AdapterClass"
    pipelines: dict[str, Pipeline] = field(default_factory=dict)  # diffusers pipeline class name -> how to run it
    calibration_targets: dict[str, str] = field(default_factory=dict)  # --model NAME -> "module:function"
    commands: list[tuple[str, str, str]] = field(default_factory=list)  # (subcommand, module, one-line help)
    # A pipeline class another family registered, which this family serves when configured its way (Wan2.2's
    # pipelines are Wan2.1's classes): "module:function", function(pipeline class name, pipeline config,
    # transformer config) -> the names of this family's profiles for it ([] for none), or None when not its own;
    # and "module:Class", the adapter for such a pipeline, built with the pipeline.
    claim_pipeline: str | None = None
    claimed_adapter: str | None = None


def claim(pipeline_class: str, pipeline_config: Any, transformer_config: Any) -> tuple[Family, list[str]] | None:
    """(family, its profile names) of the family that claims a pipeline configured this way, or None. Works on a
    loaded pipeline's configs and on a saved folder's (model_index.json, transformer/config.json) alike."""
    for family in families():
        if family.claim_pipeline:
            names = load_object(family.claim_pipeline)(pipeline_class, pipeline_config or {},
                                                       transformer_config or {})
            if names is not None:
                return family, names
    return None


@lru_cache(maxsize=None)
def families() -> tuple[Family, ...]:
    found = []
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        family = load_object(entry.value)
        if not isinstance(family, Family):
            raise TypeError(f"entry point {entry.name} = {entry.value} is not a stepcache.families.Family")
        found.append(family)
    if not found:
        raise RuntimeError(f"no model family is registered under the {GROUP!r} entry points: reinstall stepcache "
                           f"(pip install -e . in the repository) so that its families are found")
    return tuple(found)


def _merged(attr: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for family in families():
        merged.update(getattr(family, attr))
    return merged


def adapters() -> dict[str, str]:
    return _merged("adapters")


def pipelines() -> dict[str, tuple[Family, Pipeline]]:
    return {name: (family, spec) for family in families() for name, spec in family.pipelines.items()}


def calibration_target(name: str) -> Callable | None:
    """The function a family registered for ``stepcache calibrate --model NAME`` (None when there is none)."""
    spec = _merged("calibration_targets").get(name)
    return load_object(spec) if spec else None


def commands() -> list[tuple[str, str, str]]:
    return [command for family in families() for command in family.commands]
