"""What `stepcache bench --pipeline` runs: a diffusers pipeline folder stepcache supports, seen the way the bench
sees the demo model (``pipe``, ``latents(prompts, seeds, steps, guidance)``, ``decode(latents)``).

The bench stores each video's latents (small) and scores decoded videos; a folder's pipeline decodes with its own
last lines (its family's ``decode``), so what is scored is what the pipeline would have returned.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from ..errors import InputError


class SubjectError(InputError):
    pass


def _fingerprint(folder: Path) -> str:
    """A cheap identity of a pipeline folder: its configs and the names and sizes of its files (hashing tens of GB
    of weights would take minutes; a changed file changes its size or a config in practice)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{path.stat().st_size}\0".encode())
        if path.suffix == ".json" and path.stat().st_size < 1 << 20:
            digest.update(path.read_bytes())
    return digest.hexdigest()


class PipelineSubject:
    """A supported diffusers pipeline folder at one size, on one device, in one dtype."""

    def __init__(self, folder, pipeline_class: str, spec, dtype: str, device: str, height: int, width: int,
                 frames: int, true_cfg: float = 1.0, images: dict[str, str] | None = None):
        from stepcache.families import load_object
        from stepcache.generate import load_pipeline
        if spec.decode is None:
            raise SubjectError(f"stepcache bench cannot decode {pipeline_class} latents yet (its family declares "
                               f"no decode)")
        self.folder, self.pipeline_class, self.spec = Path(folder), pipeline_class, spec
        self.height, self.width, self.frames, self.device = height, width, frames, device
        self.images = images   # an image-to-video pipeline's first frame per prompt
        self.true_cfg = true_cfg
        self.pipe = load_pipeline(self.folder, pipeline_class, spec, dtype, device)
        self.pipe.set_progress_bar_config(disable=True)
        self._decode = load_object(spec.decode)

    def latents(self, prompts, seeds, steps: int, guidance: float):
        import torch
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
        extra = self.spec.call_kwargs(guidance, self.true_cfg, self.pipe)
        if self.images is not None:
            if len(prompts) != 1:
                raise SubjectError("an image-to-video pipeline is run one prompt (and its first frame) at a time")
            from diffusers.utils import load_image
            extra["image"] = load_image(self.images[prompts[0]])
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            return self.pipe(prompt=prompts, negative_prompt=[""] * len(prompts), num_frames=self.frames,
                             num_inference_steps=steps, output_type="latent",
                             **self.spec.size_kwargs(self.height, self.width),
                             generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds],
                             **extra).frames

    def decode(self, latents):
        """Float RGB (B, T, H, W, 3) in [0, 1], on the CPU."""
        return self._decode(self.pipe, latents).cpu()

    def shipped_profiles(self) -> list:
        """The shipped profiles for this pipeline's configuration (what ``stepcache generate`` would match)."""
        from stepcache.families import pipelines
        from stepcache.generate import shipped_profiles
        family = pipelines()[self.pipeline_class][0].name
        return shipped_profiles(self.folder, self.pipeline_class, family, self.spec.transformer)[1]

    def calibration_meta(self) -> dict:
        return {"resolution": [self.height, self.width], "frames": self.frames, "pipeline": self.pipeline_class}


def pipeline_identity(folder: Path, pipeline_class: str, given: str | None = None) -> dict:
    """What a bench folder records of its pipeline: a local folder by path and fingerprint; a Hugging Face Hub
    pipeline by id and revision (its snapshot folder, whose files arrive after this is recorded)."""
    if given is not None and not Path(given).exists():
        return {"model": "pipeline", "pipeline": given, "revision": folder.name, "pipeline_class": pipeline_class}
    return {"model": "pipeline", "pipeline": str(folder.resolve()), "pipeline_class": pipeline_class,
            "fingerprint": _fingerprint(folder)}


def subject_prompts(args, spec) -> list[str]:
    """The prompts of a pipeline bench, in order: --prompts (a .txt or .json file, or 'vbench' for the installed
    VBench list), else the pipeline's own (a model trained on its own vocabulary), else an error."""
    from stepcache.families import load_object
    from .prompts import load_prompts
    if args.prompts is None:
        if spec.prompts is None:
            raise SubjectError("--prompts is required with --pipeline: a .txt (one prompt per line) or .json file, "
                               "or 'vbench' (the VBench list, with the vbench package installed)")
        return list(load_object(spec.prompts)())
    try:
        prompts = load_prompts(None if args.prompts == "vbench" else args.prompts)
    except (OSError, ValueError) as exc:
        raise SubjectError(f"--prompts {args.prompts!r}: {exc}") from None
    if not prompts:
        raise SubjectError(f"--prompts {args.prompts!r} holds no prompt")
    return prompts


IMAGE_PROMPTS_HELP = ('--prompts FILE.json holding objects {"prompt": TEXT, "image": PATH} (a path relative to the '
                      'file)')


def subject_images(args, pipeline_class: str, spec, prompts: list[str]) -> dict[str, str] | None:
    """An image-to-video pipeline's first frame for each prompt, from --prompts FILE.json entries that name an
    ``image`` (relative to the file); None for a text-to-video pipeline. Every prompt must have one, and every
    image must exist: both are checked before a model loads."""
    if not spec.needs_image:
        return None
    source = args.prompts
    if source is None or source == "vbench" or Path(source).suffix != ".json":
        raise SubjectError(f"{pipeline_class} needs a first frame per video: give {IMAGE_PROMPTS_HELP}")
    base = Path(source).parent
    images = {}
    for entry in json.loads(Path(source).read_text()):
        if isinstance(entry, dict) and entry.get("image"):
            text = entry.get("prompt") or entry.get("prompt_en")
            images[text] = str((base / entry["image"]).resolve())
    missing = [p for p in prompts if p not in images]
    if missing:
        raise SubjectError(f"--prompts {source}: {len(missing)} prompt(s) have no image, the first {missing[0]!r}; "
                           f"{pipeline_class} needs {IMAGE_PROMPTS_HELP}")
    absent = sorted({path for path in images.values() if not Path(path).is_file()})
    if absent:
        raise SubjectError(f"--prompts {source}: image {absent[0]} does not exist ({len(absent)} missing)")
    return {p: images[p] for p in prompts}


def check_prompt_budget(prompts: list[str], start: int, start_flags: str, calibration: int, command: str) -> None:
    """The prompts taken from the start of the list (``start``, as ``start_flags`` set them) and the calibration
    prompts taken from its end must not overlap."""
    need = start + calibration
    if len(prompts) < need:
        raise SubjectError(f"--prompts has {len(prompts)} prompts; {command} needs {start} from the start "
                           f"({start_flags}) and {calibration} calibration prompts from the end that are not among "
                           f"them ({need} in all): give more prompts, or ask for fewer")


def folder_summary(folder: Path) -> dict:
    index = json.loads((folder / "model_index.json").read_text())
    return {"folder": str(folder.resolve()), "model_index": {k: v for k, v in index.items() if not k.startswith("_")
                                                             or k == "_class_name"}}
