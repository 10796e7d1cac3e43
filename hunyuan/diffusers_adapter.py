"""diffusers ``HunyuanVideoTransformer3DModel``: where its blocks are and where each method's signal lives.

Blocks in call order are ``transformer_blocks`` (dual-stream) then ``single_transformer_blocks``; both take
``(hidden_states, encoder_hidden_states, temb, ...)`` and return ``(hidden_states, encoder_hidden_states)``
with image and text tokens apart. The cached residual covers the image tokens only, as in the reference
(seed-methods.md §2.2, §3.1). On a reused pass the text tokens leave the stack as they entered it; nothing
reads them afterwards, because the output head (``norm_out``, ``proj_out``) takes ``hidden_states`` alone.

The TeaCache signal is the reference's tensor: block 0's modulated image input. In diffusers that is the
first output of ``transformer_blocks[0].norm1`` (an ``AdaLayerNormZero``: LayerNorm without affine, times
``1 + scale_msa``, plus ``shift_msa``), the same computation as upstream's ``img_norm1`` + ``img_mod`` chunks.
It is evaluated from the block's own call arguments before the block decides; ``norm1`` is a pure function,
so evaluating it once more leaves the block's result unchanged.
"""
from __future__ import annotations

from typing import Any

import torch

from ..patching import BlockIO, install_stack
from ..profiles import match_profiles

VAE_SPATIAL_SCALE = 8  # HunyuanVideo's causal 3D VAE downsamples height and width by 8

# What `stepcache generate` should pass to a HunyuanVideoPipeline by default: the published sampling setup
# (upstream hyvideo/config.py defaults; guidance-distilled, so one pass per step).
PIPELINE_DEFAULTS = dict(height=720, width=1280, num_frames=129, num_inference_steps=50, guidance_scale=6.0,
                         true_cfg_scale=1.0)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _encoder_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]


def _arg(args: tuple, kwargs: dict, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


BLOCK_IO = BlockIO(
    hidden_in=_hidden_states,
    hidden_out=lambda output: output[0],
    passthrough=lambda args, kwargs: (_hidden_states(args, kwargs), _encoder_hidden_states(args, kwargs)),
    replace_hidden=lambda output, hidden: (hidden, output[1]),
)


def block0_modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The modulated image input of a dual-stream block, from that block's call arguments."""
    hidden = _hidden_states(args, kwargs)
    temb = _arg(args, kwargs, 2, "temb")
    token_replace_emb = _arg(args, kwargs, 5, "token_replace_emb")
    if token_replace_emb is not None:  # image-to-video "token_replace": the first frame has its own modulation
        return block.norm1(hidden, temb, token_replace_emb, _arg(args, kwargs, 6, "num_tokens"))[0]
    return block.norm1(hidden, emb=temb)[0]


class HunyuanVideoDiffusersAdapter:
    family = "hunyuanvideo"
    block_io = BLOCK_IO

    def __init__(self):
        self.method: str | None = None

    def install(self, patch, model, runner_of, method: str, signal_name) -> None:
        self.method = method
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
        signal_of = None
        if method == "teacache":
            if len(model.transformer_blocks) == 0:
                raise ValueError("TeaCache on HunyuanVideo reads the first dual-stream block's modulated input, "
                                 "and this model has no dual-stream blocks (num_layers=0)")
            first = model.transformer_blocks[0]

            def signal_of(args, kwargs):
                return block0_modulated_input(first, args, kwargs)

        install_stack(patch, runner_of, blocks, self.block_io, signal_of=signal_of)

    def latent_of(self, model, args: tuple, kwargs: dict) -> torch.Tensor:
        # Image-to-video "latent_concat" appends condition channels after the latent; the output has none.
        return _hidden_states(args, kwargs)[:, : model.config.out_channels]

    def pixel_size(self, model, args: tuple, kwargs: dict) -> tuple[int, int]:
        latent = _hidden_states(args, kwargs)
        return latent.shape[-2] * VAE_SPATIAL_SCALE, latent.shape[-1] * VAE_SPATIAL_SCALE

    def output_latent(self, output: Any) -> torch.Tensor:
        return output[0] if isinstance(output, tuple) else output.sample

    def build_output(self, model, latent: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        if not _arg(args, kwargs, 7, "return_dict", True):
            return (latent,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput
        return Transformer2DModelOutput(sample=latent)

    def describe_config(self, model) -> dict[str, Any]:
        c = model.config
        return {k: c.get(k) for k in ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim",
                                      "in_channels", "image_condition_type")}

    def detect_profiles(self, model):
        # The shipped tables were measured on text-to-video; an image-to-video model has the same layer counts
        # but is not the model they describe.
        if model.config.get("image_condition_type") is not None:
            return []
        return match_profiles(self.family, dict(model.config), type(model).__name__)


def load_pipeline(model_dir, dtype: torch.dtype | str = torch.bfloat16, device: str | torch.device = "cuda",
                  components_dtype: torch.dtype | str | None = None, **components):
    """A ``HunyuanVideoPipeline`` from a local diffusers-format folder (e.g. hunyuanvideo-community/HunyuanVideo).

    The transformer is loaded in ``dtype``; the text encoders and VAE in ``components_dtype``, which defaults
    to float16 next to a bfloat16 transformer on an accelerator (diffusers' documented setup) and to ``dtype``
    otherwise. VAE tiling is on, since a 129-frame 720p decode does not fit otherwise. Keyword ``components``
    replace the folder's (e.g. ``text_encoder=None`` for a folder saved without one, when prompts come as
    embeddings).
    """
    from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

    dtype = _as_dtype(dtype)
    device = torch.device(device)
    if components_dtype is None:
        components_dtype = torch.float16 if dtype == torch.bfloat16 and device.type != "cpu" else dtype
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(model_dir, subfolder="transformer", dtype=dtype)
    pipe = HunyuanVideoPipeline.from_pretrained(model_dir, transformer=transformer,
                                                dtype=_as_dtype(components_dtype), **components)
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.enable_tiling()
    return pipe.to(device)


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[str(dtype).lower()]
