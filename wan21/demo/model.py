"""The demo model: its config, its weight file, and a real diffusers ``WanPipeline`` built from it, offline.

The weight file (``weights/demo_wan.safetensors`` inside this package, written by :mod:`.train`) holds the EMA
transformer weights (``transformer.*``), the prompt word table (``text_encoder.*``) and the fixed latent codec
(``codec.*``); its metadata holds the transformer config and how it was trained. Loading never touches the
network: the transformer is built from the config with ``WanTransformer3DModel(**config)`` and filled with
``load_state_dict``.

:class:`DemoPipeline` is a thin wrapper: it calls the real ``WanPipeline`` (``output_type="latent"``, the
pipeline's own ``FlowMatchEulerDiscreteScheduler`` loop, its CFG and ``cache_context`` calls, so stepcache's
Wan adapter sees exactly what it sees on a real Wan2.1) and decodes the latents with the fixed codec.
The pipeline has no VAE, so it assumes Wan's 4x temporal and 8x spatial VAE factors; the wrapper passes the
frame count and size that give the demo's latent shape (8 frames of 8x8), and decodes them to 8 frames of
32x32 RGB.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .codec import LinearCodec
from .scenes import FRAMES, SIZE
from .text import MAX_TOKENS, TEXT_DIM, WordEncoder, WordTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
WEIGHTS = PACKAGE_DIR / "weights" / "demo_wan.safetensors"
PROFILE = PACKAGE_DIR / "weights" / "wan2.1-demo-tiny.json"
FORMAT = "stepcache-demo-model/1"

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=6, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)
# in_channels * prod(patch_size) = 64 <= inner dim 128: the output head can reach every latent direction.
SHIFT = 3.0           # FlowMatchEulerDiscreteScheduler shift used for sampling
GUIDANCE = 2.5        # classifier-free guidance scale for sampling (the model fragments objects at Wan's 5.0)
STEPS = 30            # default number of sampling steps
VAE_T, VAE_S = 4, 8   # WanPipeline's VAE factors when it has no VAE


def build_transformer(config: dict | None = None, seed: int | None = None):
    from diffusers import WanTransformer3DModel
    if seed is not None:
        torch.manual_seed(seed)
    return WanTransformer3DModel(**(config or TRANSFORMER_CONFIG))


@dataclass
class DemoModel:
    transformer: torch.nn.Module
    text_encoder: WordEncoder
    tokenizer: WordTokenizer
    codec: LinearCodec
    metadata: dict


def state_dict_for_export(transformer, text_encoder, codec, dtype=torch.float16) -> dict[str, torch.Tensor]:
    sd = {f"transformer.{k}": v.detach().to(dtype).contiguous() for k, v in transformer.state_dict().items()}
    sd.update({f"text_encoder.{k}": v.detach().to(dtype).contiguous() for k, v in text_encoder.state_dict().items()})
    sd.update({k: v.contiguous() for k, v in codec.state_dict().items()})  # the codec stays float32
    return sd


def save_weights(path, transformer, text_encoder, codec, info: dict, dtype=torch.float16) -> Path:
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    meta = {"format": FORMAT, "transformer_config": json.dumps(config, sort_keys=True),
            "text_dim": str(text_encoder.embedding.weight.shape[1]), "info": json.dumps(info, sort_keys=True)}
    tmp = path.with_suffix(".tmp")
    save_file(state_dict_for_export(transformer, text_encoder, codec, dtype), str(tmp), metadata=meta)
    tmp.replace(path)
    return path


class WeightsMissing(FileNotFoundError):
    pass


def load(path=None, dtype=torch.float32) -> DemoModel:
    """Load the demo model from ``path`` (default: the file shipped in this package). No network."""
    from safetensors import safe_open
    path = Path(path) if path is not None else WEIGHTS
    if not path.exists():
        raise WeightsMissing(
            f"no demo model weights at {path}; train them with `python -m stepcache.wan21.demo.train --out DIR` "
            f"and copy DIR/demo_wan.safetensors there")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stepcache demo model file (format {meta.get('format')!r})")
    config = json.loads(meta["transformer_config"])
    config = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if not k.startswith("_")}
    transformer = build_transformer(config)
    transformer.load_state_dict({k[len("transformer."):]: v.to(dtype) for k, v in sd.items()
                                 if k.startswith("transformer.")})
    tokenizer = WordTokenizer()
    text_encoder = WordEncoder(len(tokenizer), int(meta.get("text_dim", TEXT_DIM)))
    text_encoder.load_state_dict({k[len("text_encoder."):]: v.to(dtype) for k, v in sd.items()
                                  if k.startswith("text_encoder.")})
    codec = LinearCodec.from_state_dict(sd)
    transformer.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return DemoModel(transformer, text_encoder, tokenizer, codec, {**meta, "path": str(path)})


def wan_pipeline(model: DemoModel, shift: float = SHIFT):
    """A real ``diffusers.WanPipeline`` around the demo transformer and prompt encoder (no VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model.transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=shift))
    # registered as plain attributes: they are not Hugging Face classes, and the pipeline only calls them
    pipe.tokenizer, pipe.text_encoder = model.tokenizer, model.text_encoder
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DemoPipeline:
    """``DemoPipeline(model)(prompts, seeds) -> uint8 videos (B, FRAMES, SIZE, SIZE, 3)`` through ``WanPipeline``.

    ``self.pipe`` is the real ``WanPipeline``: enable stepcache on it (``stepcache.enable(demo.pipe, ...)``).
    """

    def __init__(self, model: DemoModel | None = None, shift: float = SHIFT):
        self.model = model if model is not None else load()
        self.codec = self.model.codec
        self.pipe = wan_pipeline(self.model, shift)

    def latents(self, prompts, seeds, steps: int = STEPS, guidance: float = GUIDANCE) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = [seeds] * len(prompts) if isinstance(seeds, int) else list(seeds)
        lat = SIZE // 4
        with torch.inference_mode():
            out = self.pipe(prompt=prompts, negative_prompt=[""] * len(prompts), height=lat * VAE_S,
                            width=lat * VAE_S, num_frames=(FRAMES - 1) * VAE_T + 1, num_inference_steps=steps,
                            guidance_scale=guidance, output_type="latent", max_sequence_length=MAX_TOKENS,
                            generator=[torch.Generator().manual_seed(int(s)) for s in seeds])
        return out.frames

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents -> float RGB (B, FRAMES, SIZE, SIZE, 3) in [0, 1]"""
        return self.codec.decode(latents).permute(0, 2, 3, 4, 1)

    def __call__(self, prompts, seeds, steps: int = STEPS, guidance: float = GUIDANCE) -> torch.Tensor:
        video = self.decode(self.latents(prompts, seeds, steps, guidance))
        return (video * 255).round().to(torch.uint8)
