"""HunyuanVideo with Sparse VideoGen's attention (SVG) and a step cache: the implementation behind the drop-ins
``hyvideo_svg_easycache.py`` (EasyCache4HunyuanVideo's script of that name), ``hyvideo_svg_magcache.py`` and
``hyvideo_svg_teacache.py``.

EasyCache4HunyuanVideo's ``hyvideo_svg_easycache.py`` runs EasyCache over SVG's own copy of HunyuanVideo
(``svg.models.hyvideo``, svg-project/Sparse-VideoGen's SVG1 layout, last at 5efea72), not over Tencent's
``hyvideo``. The copy's ``HYVideoDiffusionTransformer`` is Tencent's with a layer index and the timestep passed to
its blocks, so stepcache's official adapter caches it as it is. SVG's attention is installed as SVG's own
``hyvideo_inference.py`` does it (every block gets the args; the prompt length is read in advance; the masks,
``Hunyuan_SparseAttn``'s settings and the flex-attention block mask are set; ``replace_sparse_forward()`` swaps the
block classes' forward), then the cache on the transformer instance, then upstream's sampler runs. What the flags
say is checked before anything loads; the videos, stats and profile are written whole, as the other drop-ins do
(:mod:`stepcache.hunyuan.official`, whose pieces this reuses).

SVG's kernels need a GPU; :mod:`stepcache.hunyuan.svg_reference` replaces them by PyTorch equivalents for the
CPU tests.

Design notes: docs/hunyuanvideo.md#sparse-videogen-svg-with-a-step-cache
"""
from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError, run_cli
from . import official
from .official import CacheFlagError, refuse, video_size
from .resolution import warn_unpublished

PACKAGE = "svg.models.hyvideo"
SVG1_COMMIT = "5efea724f4b44579dae3f3e130648c3148131d90"  # the last commit with svg/models/hyvideo/config.py
SVG2_COMMIT = "19c2662a0789eb11dde152a71a459f8f94f3c0fc"  # "init SVG2": moved that code to svg/models/hyvideo_orig
METHODS = official.METHODS
BLOCK = 128  # SVG's token block: of the masks sample_mse scores heads with, and of the band of its flex mask
PIP_NAMES = {"flash_attn": "flash-attn"}


class SvgImportError(InputError):
    """Sparse VideoGen's package, or one of its requirements, cannot be imported."""


def script_name(method: str) -> str:
    return f"hyvideo_svg_{method}.py"


# ------------------------------------------------------------------------------------------------ import
def import_svg() -> types.SimpleNamespace:
    """SVG's modules the drop-in uses, or one line saying why they cannot be imported."""
    spec = importlib.util.find_spec("svg")
    if spec is None:
        raise SvgImportError(
            f"Sparse VideoGen's svg package is not importable: copy this script into the root of a "
            f"svg-project/Sparse-VideoGen checkout (SVG1, commit {SVG1_COMMIT[:7]} or earlier) and run it from "
            f"there")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    # Looked for before importing: SVG2 has an svg.models.hyvideo too (a rewrite whose modules import flashinfer),
    # where an import error would not say that the layout is the wrong one
    if not any((root / "models" / "hyvideo" / "config.py").is_file() for root in roots):
        where = roots[0] if roots else spec.origin
        raise SvgImportError(
            f"the svg package at {where} has no models/hyvideo/config.py: EasyCache's composition runs SVG1's "
            f"svg.models.hyvideo, which SVG2 (commit {SVG2_COMMIT[:7]} on) moved to svg.models.hyvideo_orig; check "
            f"out {SVG1_COMMIT[:7]}")
    names = {"config": "config", "constants": "constants", "inference": "inference", "models": "modules.models",
             "attenion": "modules.attenion"}  # (sic) SVG's and upstream's name
    try:
        return types.SimpleNamespace(**{key: importlib.import_module(f"{PACKAGE}.{sub}") for key, sub in names.items()})
    except ImportError as exc:
        missing = getattr(exc, "name", None) or ""
        if missing and not missing.startswith("svg"):
            top = missing.split(".")[0]
            raise SvgImportError(
                f"Sparse VideoGen's HunyuanVideo needs the Python module {missing!r}, which is not installed: pip "
                f"install {PIP_NAMES.get(top) or official.pip_name(missing)} (Sparse-VideoGen's requirements.txt; "
                f"its kernels need a CUDA GPU)") from exc
        raise SvgImportError(f"Sparse VideoGen's HunyuanVideo cannot be imported: {exc}") from exc


# ----------------------------------------------------------------------------------------------- arguments
def build_parser(method: str, svg) -> argparse.ArgumentParser:
    """SVG's parser (what ``svg.models.hyvideo.config.parse_args`` builds: upstream's groups and SVG's "Sparsity"
    group), plus ours."""
    cfg = svg.config
    parser = argparse.ArgumentParser(
        description=f"HunyuanVideo with Sparse VideoGen attention and {method} step caching (stepcache). All flags "
                    f"of Sparse-VideoGen's hyvideo_inference.py work unchanged.")
    for add in (cfg.add_network_args, cfg.add_extra_models_args, cfg.add_denoise_schedule_args,
                cfg.add_inference_args, cfg.add_parallel_args, cfg.add_sparsity_args):
        parser = add(parser)
    for action in parser._actions:
        # SVG's --first_times_fp help says "first 10% timestep": argparse %-formats help texts, and SVG's own
        # --help stops there with a ValueError
        if action.help and "%" in action.help:
            try:
                action.help % {**vars(action), "prog": parser.prog}
            except (ValueError, KeyError, TypeError):
                action.help = action.help.replace("%", "%%")
    return official.add_cache_args(parser, method)


@dataclass
class SvgPlan:
    """SVG's settings for this run, checked and sized from the flags alone, before any model exists."""

    pattern: str
    context_length: int = 0  # text tokens (upstream pads the prompt to --text-len)
    num_frame: int = 0  # latent frames
    frame_size: int = 0  # image tokens per latent frame
    width: float = 0.0  # the band of the sparse heads, in frames (SVG's spatial_width = temporal_width)
    num_sampled_rows: int = 0
    sample_mse_max_row: int = 0
    first_layers_fp: float = 0.0
    first_times_fp: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def seq_len(self) -> int:
        return self.context_length + self.num_frame * self.frame_size

    @property
    def band(self) -> int:
        """The band in tokens, as SVG's mask rounds it (``round_to_multiple``, svg/models/hyvideo/modules/
        utils.py:24-32)."""
        return math.floor(self.width * self.frame_size / BLOCK) * BLOCK


def align_to(value: int, alignment: int) -> int:
    """Upstream's ``align_to`` (hyvideo/utils/data_utils.py): the size the pipeline actually generates."""
    return int(math.ceil(value / alignment) * alignment)


def token_grid(args) -> tuple[int, int]:
    """(latent frames, image tokens per frame) of upstream's transformer for these flags: the "884" VAE (4x in
    time, 8x in space, hyvideo/inference.py's ``latents_size``) and HunyuanVideo's 1x2x2 patches."""
    height, width = (align_to(s, 16) for s in video_size(args))
    if "884" in args.vae:
        frames = (args.video_length - 1) // 4 + 1
    elif "888" in args.vae:
        frames = (args.video_length - 1) // 8 + 1
    else:
        frames = args.video_length
    return frames, (height // 16) * (width // 16)


def sparsity_to_width(sparsity: float, context_length: int, num_frame: int, frame_size: int) -> float:
    """SVG's ``sparsity_to_width`` (its hyvideo_inference.py:15-24; the same in EasyCache's script), which its
    scripts evaluate at 720p and 129 frames whatever the flags say: the band width, in frames, that keeps
    ``sparsity`` of the attention map after the text rows and columns."""
    seq_len = context_length + num_frame * frame_size
    total = seq_len ** 2
    kept = (sparsity * total - 2 * seq_len * context_length) / total
    return seq_len * (1 - math.sqrt(1 - kept)) / frame_size


def plan_svg(args, error: Callable[[str], Any]) -> SvgPlan:
    """Check SVG's flags; ``error`` exits (argparse style). With ``--pattern dense`` SVG's code runs dense and its
    other flags are not read, as in SVG's script."""
    if args.pattern != "SVG":
        return SvgPlan(args.pattern)
    if len(args.video_size) not in (1, 2):
        error(f"argument --video-size: {args.video_size} is not allowed; allowed: HEIGHT [WIDTH]")
    # SVG's attention takes one timestep per call (`if timestep > ...`, svg/models/hyvideo/modules/attenion.py:235)
    # and one prompt length for the whole batch: a batch of two fails there, or masks the wrong text.
    if args.cfg_scale > 1:
        error(f"argument --cfg-scale: {args.cfg_scale} batches two passes per step, which Sparse VideoGen's attention "
              f"does not take; allowed with --pattern SVG: 1 (embedded guidance, --embedded-cfg-scale, as its "
              f"published commands use)")
    if args.num_videos > 1:
        error(f"argument --num-videos: {args.num_videos} videos per prompt batch them, which Sparse VideoGen's "
              f"attention does not take; allowed with --pattern SVG: 1")
    for flag in ("ulysses_degree", "ring_degree"):
        if getattr(args, flag) > 1:
            error(f"argument --{flag.replace('_', '-')}: {getattr(args, flag)} splits the sequence, and Sparse "
                  f"VideoGen's attention takes it whole (its sizes are asserted at svg/models/hyvideo/modules/"
                  f"attenion.py:141); allowed with --pattern SVG: 1 (one GPU)")
    if "884" in args.vae and (args.video_length - 1) % 4:
        error(f"argument --video-length: {args.video_length} is not allowed; allowed: 4k+1 frames (upstream's rule "
              f"for the 884 VAE)")
    for flag in ("first_layers_fp", "first_times_fp"):
        value = getattr(args, flag)
        if not 0 <= value <= 1:  # also refuses nan
            error(f"argument --{flag}: {value} is not allowed; allowed: a number in [0, 1] (the fraction of layers "
                  f"or timesteps kept dense)")
    for flag in ("num_sampled_rows", "sample_mse_max_row"):
        if getattr(args, flag) < 1:
            error(f"argument --{flag}: {getattr(args, flag)} is not allowed; allowed: an integer >= 1")
    if args.text_len < 1:
        error(f"argument --text-len: {args.text_len} is not allowed; allowed: an integer >= 1")
    num_frame, frame_size = token_grid(args)
    plan = SvgPlan("SVG", args.text_len, num_frame, frame_size, 0.0, args.num_sampled_rows,
                   args.sample_mse_max_row, args.first_layers_fp, args.first_times_fp)
    lowest = _lowest_sparsity(plan)
    if not (0 < args.sparsity <= 1) or args.sparsity < lowest:
        error(f"argument --sparsity: {args.sparsity} is not allowed; allowed: {lowest} <= sparsity <= 1 at this "
              f"--video-size and --video-length (below it SVG's band, rounded down to {BLOCK} tokens, is empty and "
              f"the sparse heads attend to the text alone)")
    plan.width = sparsity_to_width(args.sparsity, plan.context_length, num_frame, frame_size)
    if plan.sample_mse_max_row > plan.seq_len:
        # SVG samples rows below this cap from a mask of seq_len rows: beyond it the index is out of range. Its
        # default, 10000, is under HunyuanVideo's sequence at every published size.
        plan.notes.append(f"--sample_mse_max_row {plan.sample_mse_max_row} is more than the {plan.seq_len} tokens of "
                          f"this video: Sparse VideoGen's rows are sampled among all {plan.seq_len}")
        plan.sample_mse_max_row = plan.seq_len
    if getattr(args, "output_path", None) and str(args.output_path) != str(args.save_path):
        plan.notes.append(f"--output_path {args.output_path} is not used: the videos are written under --save-path, "
                          f"as in EasyCache's hyvideo_svg_easycache.py")
    plan.notes.append(f"Sparse VideoGen: {plan.num_frame} frames of {plan.frame_size} tokens and {plan.context_length} "
                      f"text tokens; band {plan.width:.3f} frames ({plan.band} tokens) at sparsity {args.sparsity}; "
                      f"dense: layers below {42 * plan.first_layers_fp:g} and timesteps above "
                      f"{1000 * (1 - plan.first_times_fp):g}")
    return plan


def _lowest_sparsity(plan: SvgPlan) -> float:
    """The smallest ``--sparsity`` (4 decimals) whose band keeps at least one block of keys."""
    seq = plan.seq_len
    if seq <= BLOCK:
        return 1.0
    kept = 1 - (1 - BLOCK / seq) ** 2
    lowest = math.ceil((kept + 2 * plan.context_length / seq) * 1e4) / 1e4
    while lowest < 1 and math.floor(sparsity_to_width(lowest, plan.context_length, plan.num_frame, plan.frame_size)
                                    * plan.frame_size / BLOCK) < 1:
        lowest = round(lowest + 1e-4, 4)
    return min(lowest, 1.0)


def parse_args(method: str, argv: list[str] | None, svg):
    """(args, CachePlan, SvgPlan). A malformed flag exits through argparse (status 2); a value that cannot run
    raises :class:`~stepcache.hunyuan.official.CacheFlagError`."""
    args = build_parser(method, svg).parse_args(argv)
    try:
        args = svg.config.sanity_check_args(args)
    except ValueError as exc:  # upstream's own check of --vae / --latent-channels
        raise CacheFlagError(str(exc)) from exc
    plan = official.plan_cache(args, refuse, PACKAGE)
    return args, plan, plan_svg(args, refuse)


# ------------------------------------------------------------------------------------------- SVG's attention
def sample_masks(context_length: int, num_frame: int, frame_size: int, rows: int, device=None) -> list:
    """The first ``rows`` rows of the spatial and the temporal mask that ``sample_mse`` scores each head with.

    What SVG's script builds in ``get_attention_mask`` (its hyvideo_inference.py:77-116, the same in EasyCache's
    script), with the sizes hard-coded there for 720p and 129 frames: image tokens in blocks of 128 attend the
    blocks less than ``frame_size * 1.5 // 128`` away, in frame-major order (spatial) or in token-major order
    (temporal: the same band, seen through SVG's reshape and permute); every text row and column is kept. Built
    here for the run's sizes and for these rows only, as booleans: the script fills the whole float mask on the CPU
    first (57 GB at 720p) and keeps these rows as floats, where ``sample_mse`` only compares them with 0.
    """
    import torch

    pixels = num_frame * frame_size
    seq = pixels + context_length
    reach = frame_size * 1.5 // BLOCK  # the script's `block_thres // block_size` (a float)
    blocks = torch.arange(math.ceil(pixels / BLOCK), device=device)
    near = (blocks[:, None] - blocks[None, :]).abs() < reach  # block i attends block j
    row = torch.arange(min(rows, seq), device=device)
    col = torch.arange(seq, device=device)

    def token_major(i):  # frame-major index (frame, patch) -> its place in token-major order, patch * frames + frame
        return (i % frame_size) * num_frame + i // frame_size

    masks = []
    for order in (lambda i: i, token_major):  # spatial, temporal
        # Indexed from the block mask, so that the only large tensor is the result (10000 x 119056 booleans at
        # 720p, 1.2 GB); the text rows and columns are set after (their block index is clamped, then overwritten)
        mask = near[order(row.clamp(max=pixels - 1)) // BLOCK][:, order(col.clamp(max=pixels - 1)) // BLOCK]
        mask[:, pixels:] = True
        mask[row >= pixels] = True
        masks.append(mask)
    return masks


@dataclass
class InstalledSvg:
    """What :func:`install_svg` set, and how to put it back (SVG sets class attributes, for every instance)."""

    undo: list[Callable[[], None]] = field(default_factory=list)

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()


_MISSING = object()


def _set(installed: InstalledSvg, owner: Any, name: str, value: Any) -> None:
    before = owner.__dict__.get(name, _MISSING)

    def undo():
        if before is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, before)
    setattr(owner, name, value)
    installed.undo.append(undo)


def install_svg(sampler, args, plan: SvgPlan, svg) -> InstalledSvg:
    """SVG's attention on upstream's transformer, as SVG's script installs it (hyvideo_inference.py:40-135); with
    ``--pattern dense`` only the args on the blocks, as there. Must run before the cache is installed: SVG swaps the
    block classes' ``forward``, and the cache wraps each block's forward as it finds it."""
    import torch

    installed = InstalledSvg()
    transformer = sampler.pipeline.transformer
    for module in (*transformer.double_blocks, *transformer.single_blocks, transformer):
        _set(installed, module, "sparse_args", args)
    if plan.pattern != "SVG":
        return installed
    try:
        if list(transformer.patch_size) != [1, 2, 2]:
            raise CacheFlagError(f"--model {args.model}: Sparse VideoGen's masks are sized for 1x2x2 patches, and "
                                 f"this transformer's are {transformer.patch_size}")
        height, width = video_size(args)
        # SVG reads the prompt length in advance: its block mask must know where the text padding starts.
        prompt_mask = sampler.get_prompt_mask(
            prompt=args.prompt, height=height, width=width, video_length=args.video_length,
            negative_prompt=args.neg_prompt, infer_steps=args.infer_steps, guidance_scale=args.cfg_scale,
            num_videos_per_prompt=args.num_videos, embedded_guidance_scale=args.embedded_cfg_scale)
        if prompt_mask.shape[-1] != plan.context_length:
            raise CacheFlagError(f"--text-len {args.text_len}: the text encoder returned {prompt_mask.shape[-1]} "
                                 f"tokens; pass --text-len {prompt_mask.shape[-1]}")
        prompt_len = prompt_mask.sum()
        device = torch.device(sampler.device)
        attn = svg.attenion.Hunyuan_SparseAttn
        settings = {
            "num_sampled_rows": plan.num_sampled_rows,
            "sample_mse_max_row": plan.sample_mse_max_row,
            "attention_masks": sample_masks(plan.context_length, plan.num_frame, plan.frame_size,
                                            plan.sample_mse_max_row, device),
            "first_layers_fp": plan.first_layers_fp,
            "first_times_fp": plan.first_times_fp,
            # The sizes SVG's class hard-codes for 720p and 129 frames (attenion.py:51-53), for this run's
            "context_length": plan.context_length, "num_frame": plan.num_frame, "frame_size": plan.frame_size,
        }
        for name, value in settings.items():
            _set(installed, attn, name, value)
        dtype = svg.constants.PRECISION_TO_TYPE[args.precision]
        heads = transformer.heads_num
        block_mask = svg.attenion.prepare_flexattention(
            1, heads, transformer.hidden_size // heads, dtype, device, plan.context_length, prompt_len,
            plan.num_frame, plan.frame_size, diag_width=plan.width, multiplier=plan.width)
        _set(installed, attn, "block_mask", block_mask)
        custom = importlib.import_module(f"{PACKAGE}.modules.custom_models")
        for cls in (custom.MMDoubleStreamBlock, custom.MMSingleStreamBlock):
            _set(installed, cls, "forward", cls.__dict__["forward"])  # recorded: replace_sparse_forward overwrites it
        custom.replace_sparse_forward()
    except BaseException:
        installed.remove()
        raise
    return installed


# ------------------------------------------------------------------------------------------------ running
def load_sampler(args, svg):
    """SVG's loading, as its hyvideo_inference.py does it (EasyCache's script loads from ./HunyuanVideo whatever
    --model-base says)."""
    return svg.inference.HunyuanVideoSampler.from_pretrained(Path(args.model_base), args=args)


def save_video(sample, path: str) -> None:
    # imported here, as upstream's own (it needs torchvision, which nothing before the saving does)
    importlib.import_module(f"{PACKAGE}.utils.file_utils").save_videos_grid(sample, path, fps=24)


def main(method: str, argv: list[str] | None = None, *, load: Callable[[Any], Any] | None = None,
         save: Callable[[Any, str], None] | None = None) -> int:
    """Run one drop-in: ``method`` is its default method. ``load``/``save`` replace the model loading and video
    writing (the tests drive a tiny model through SVG's own sampler this way); with ``load`` given, the checkpoint
    files are not looked for. Returns the exit status: 0, or 2 after one line for bad input."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return run_cli(lambda: _run(method, argv, load, save), prog=script_name(method))


def _run(method: str, argv, load, save) -> int:
    svg = import_svg()
    args, plan, svg_plan = parse_args(method, argv, svg)
    official.check_outputs(args, plan)
    if load is None:
        official.check_checkpoints(args, svg.constants)
    print(args)
    warn_unpublished(plan.warning)
    for note in (*plan.notes, *svg_plan.notes):
        official._log(f"stepcache: {note}")
    save_path = official.save_folder(args)  # created with the first video, once the generation has succeeded
    sampler = (load or functools.partial(load_sampler, svg=svg))(args)
    args = sampler.args
    transformer = sampler.pipeline.transformer
    installed = install_svg(sampler, args, svg_plan, svg)
    try:
        cached, calibration = official.install(plan, sampler, args)
        outputs, seconds = official.predict(sampler, args)
        if not official._is_main_rank():
            return 0
        videos = official.save_videos(outputs, save_path, save or save_video)
        if calibration is not None:
            official.write_calibration(calibration.runner, plan, args)
        if cached is not None:
            official.write_stats(cached, plan, args, seconds, videos)
    finally:
        # Both off, the cache first: its block wrappers hold SVG's sparse forwards, which removing SVG first would
        # leave on the blocks. (A script ends here anyway; a caller in the same process gets its model back.)
        from ..api import disable
        disable(transformer)
        installed.remove()
    return 0


def run_script(method: str) -> None:
    """Entry point of the drop-in scripts."""
    sys.exit(main(method))
