"""diffusers ``HunyuanVideoTransformer3DModel``: where its blocks are and where each method's signal lives.

The block stack is ``transformer_blocks`` then ``single_transformer_blocks``; the cached residual covers the
image tokens only, as in the reference, and the text tokens pass through a reused pass untouched (the output
head reads the image tokens alone). The TeaCache signal is the reference's tensor, block 0's modulated image
input, here the first output of ``transformer_blocks[0].norm1``. diffusers ships no context-parallel plan for
this model: :func:`enable_context_parallel` gives it one (image and text tokens split, the text-padding mask cut
per rank), under which the TeaCache signal is a shard reduced over the group.

Design notes: docs/hunyuanvideo.md#diffusers-hunyuanvideotransformer3dmodel-hunyuandiffusers_adapterpy
"""
from __future__ import annotations


import torch

from ..distributed import SIGNAL
from ..diffusers_io import DiffusersTransformerAdapter, call_arg
from ..patching import BlockIO, first_block_signal, install_stack

# What `stepcache generate` should pass to a HunyuanVideoPipeline by default: the published sampling setup
# (upstream hyvideo/config.py defaults; guidance-distilled, so one pass per step).
PIPELINE_DEFAULTS = dict(height=720, width=1280, num_frames=129, num_inference_steps=50, guidance_scale=6.0,
                         true_cfg_scale=1.0)


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _encoder_hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]


BLOCK_IO = BlockIO(
    hidden_in=_hidden_states,
    hidden_out=lambda output: output[0],
    passthrough=lambda args, kwargs: (_hidden_states(args, kwargs), _encoder_hidden_states(args, kwargs)),
    replace_hidden=lambda output, hidden: (hidden, output[1]),
)


def block0_modulated_input(block: torch.nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The modulated image input of a dual-stream block, from that block's call arguments."""
    hidden = _hidden_states(args, kwargs)
    temb = call_arg(args, kwargs, 2, "temb")
    token_replace_emb = call_arg(args, kwargs, 5, "token_replace_emb")
    if token_replace_emb is not None:  # image-to-video "token_replace": the first frame has its own modulation
        return block.norm1(hidden, temb, token_replace_emb, call_arg(args, kwargs, 6, "num_tokens"))[0]
    return block.norm1(hidden, emb=temb)[0]


class HunyuanVideoDiffusersAdapter(DiffusersTransformerAdapter):
    family = "hunyuanvideo"
    return_dict_index = 7
    config_keys = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                   "image_condition_type")
    default_signal = "block0_modulated"  # the activation a signal-reading method (TeaCache) reads by default
    block_io = BLOCK_IO
    # Under context parallelism the TeaCache signal is read from block 0's input, the image-token shard; the
    # model's input and output (EasyCache) are whole on every rank.
    sequence_sharded = frozenset({SIGNAL})
    model_name = "HunyuanVideo transformer (dual-stream blocks)"

    def install(self, patch, model, runner_of, wants_signal: bool, signal_name) -> None:
        signal_of = first_block_signal(model.transformer_blocks, block0_modulated_input, wants_signal, signal_name,
                                       self.default_signal, self.model_name)
        install_stack(patch, runner_of, self.blocks(model), self.block_io, signal_of=signal_of)

    @staticmethod
    def blocks(model) -> list:
        """The block stack, in call order: the dual-stream blocks, then the single-stream ones."""
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def check_parallel(self, model) -> None:
        """Refuse a context-parallel model that was not set up by :func:`enable_context_parallel` (its text
        mask would be wrong on every rank)."""
        if _context_parallel_config(model) is not None and not getattr(model, "_stepcache_context_parallel", False):
            raise ValueError(CP_HOW)

    def detect_profiles(self, model):
        # The shipped tables were measured on text-to-video; an image-to-video model has the same layer counts
        # but is not the model they describe.
        if model.config.get("image_condition_type") is not None:
            return []
        return super().detect_profiles(model)


# ------------------------------------------------------------------------------------- context parallelism
CP_HOW = ("HunyuanVideo has no context-parallel plan in diffusers; enable it with "
          "stepcache.hunyuan.diffusers_adapter.enable_context_parallel(transformer, ContextParallelConfig(...)) "
          "instead of transformer.enable_parallelism(...), so that the text tokens and their attention mask are "
          "split with the image tokens")
MASK_HOOK = "stepcache_cp_joint_mask"


def _context_parallel_config(model):
    config = getattr(model, "_parallel_config", None)
    return getattr(config, "context_parallel_config", None) if config is not None else None


def context_parallel_plan(model) -> dict:
    """diffusers' ``cp_plan`` for a ``HunyuanVideoTransformer3DModel`` (why each split: docs/hunyuanvideo.md)."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    first = "transformer_blocks.0" if len(model.transformer_blocks) else "single_transformer_blocks.0"
    return {
        "rope": {0: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True),
                 1: ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)},
        first: {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False),
                "encoder_hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def _joint_mask_hook():
    from diffusers.hooks.hooks import ModelHook

    class JointMaskShardHook(ModelHook):
        """Cuts the joint ``[image; text]`` attention mask a block receives to this rank's
        ``[image shard; text shard]`` (ring: drops an all-valid mask, refuses a padded one). A no-op until the
        block's attention has a context-parallel config."""

        def __init__(self, memo: dict):
            super().__init__()
            self.memo = memo  # shared by the blocks of one model: the mask is one tensor per forward

        def pre_forward(self, module, *args, **kwargs):
            config = getattr(getattr(module.attn, "processor", None), "_parallel_config", None)
            cp = getattr(config, "context_parallel_config", None) if config is not None else None
            in_args = len(args) > 3
            mask = args[3] if in_args else kwargs.get("attention_mask")
            if cp is None or mask is None:
                return args, kwargs
            memo = self.memo
            if memo.get("mask") is not mask:
                memo["mask"], memo["local"] = mask, _local_mask(mask, _hidden_states(args, kwargs),
                                                                _encoder_hidden_states(args, kwargs), cp)
            if in_args:
                args = (*args[:3], memo["local"], *args[4:])
            else:
                kwargs = {**kwargs, "attention_mask": memo["local"]}
            return args, kwargs

        def reset_state(self, module):
            self.memo.clear()
            return module

    return JointMaskShardHook


def _local_mask(mask: torch.Tensor, hidden: torch.Tensor, encoder: torch.Tensor, cp) -> torch.Tensor | None:
    import torch.distributed as dist

    n = cp.ring_degree * cp.ulysses_degree
    image, text = hidden.shape[1], encoder.shape[1]  # this rank's shard lengths
    if mask.shape[-1] == image + text:
        return mask  # already this rank's
    if mask.shape[-1] != n * (image + text):
        raise ValueError(f"HunyuanVideo context parallelism: the attention mask covers {mask.shape[-1]} tokens, "
                         f"expected {n} x ({image} image + {text} text) tokens of this rank's shard")
    if cp.ring_degree > 1:
        if bool(mask.all()):
            return None  # nothing is masked: ring attention runs without a mask
        raise ValueError("HunyuanVideo with ring attention (ring_degree > 1) cannot mask padded text tokens: "
                         "ring attention applies one mask to every rank's keys. Use ulysses_degree (which "
                         "handles the padding), or text without padding")
    rank = dist.get_rank(cp._flattened_mesh.get_group())
    full_image = n * image
    return torch.cat((mask[..., rank * image:(rank + 1) * image],
                      mask[..., full_image + rank * text:full_image + (rank + 1) * text]), dim=-1)


def enable_context_parallel(transformer, config) -> None:
    """Context parallelism (Ulysses or ring) for a diffusers ``HunyuanVideoTransformer3DModel``, through
    diffusers' own ``enable_parallelism`` with :func:`context_parallel_plan` and the joint-mask hooks.

    ``config`` is a ``diffusers.ContextParallelConfig`` (or a ``ParallelConfig`` holding one). Call it on every
    rank after ``torch.distributed`` is initialised, like ``enable_parallelism``; ``stepcache.enable`` may come
    before or after it.
    """
    from diffusers import ContextParallelConfig
    from diffusers.hooks.hooks import HookRegistry

    cp = config if isinstance(config, ContextParallelConfig) else getattr(config, "context_parallel_config", None)
    if cp is None:
        raise ValueError("enable_context_parallel needs a diffusers ContextParallelConfig (ulysses_degree or "
                         "ring_degree > 1)")
    if transformer.config.get("image_condition_type") == "token_replace":
        raise ValueError("HunyuanVideo image-to-video with image_condition_type='token_replace' is not supported "
                         "under context parallelism: its first-frame modulation indexes the full sequence")
    if cp.ulysses_anything or cp.ring_anything:
        raise ValueError("HunyuanVideo context parallelism needs equal shards: ulysses_anything / ring_anything "
                         "are not supported (make the text length and the image token count divisible by the "
                         "degree)")
    hook_cls = _joint_mask_hook()
    memo: dict = {}
    for block in HunyuanVideoDiffusersAdapter.blocks(transformer):
        registry = HookRegistry.check_if_exists_or_initialize(block)
        if registry.get_hook(MASK_HOOK) is None:
            registry.register_hook(hook_cls(memo), MASK_HOOK)
    transformer.enable_parallelism(config=config, cp_plan=context_parallel_plan(transformer))
    transformer._stepcache_context_parallel = True


def decode_latents(pipe, latents):
    """``HunyuanVideoPipeline``'s own decoding of ``output_type="latent"`` latents (its ``__call__``'s last lines:
    the VAE's scaling factor, ``vae.decode``, the video processor), as float RGB (B, T, H, W, 3) in [0, 1]."""
    with torch.inference_mode():
        video = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.video_processor.postprocess_video(video, output_type="pt").permute(0, 1, 3, 4, 2).float()


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
