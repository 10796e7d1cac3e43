"""A tiny random-weight HunyuanVideo 1.5 (Tencent-Hunyuan/HunyuanVideo-1.5) run by upstream's own generate.py on the
CPU, for the opt-in tests (HUNYUANVIDEO15_REPO).

What stands in for GPU- or checkpoint-bound code, and nothing else: a torchvision placeholder (upstream imports it
for image-to-video's reference frame only), the device mesh built on "cpu" (gloo) instead of "cuda", a no-op
torch.cuda.set_device (generate.py calls it at import), an eager equivalent of upstream's compiled flex attention
(the same masked attention; compiling it on a CPU takes seconds per shape), stub text encoders and VAE, and a
create_pipeline that builds the pipeline around a tiny transformer instead of loading checkpoints. The transformer,
the pipeline's denoising loop, its scheduler and generate.py's main() are upstream's own.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch import nn


def eager_flex_attention(query, key, value, score_mod=None, **_):
    """What attention.py's torch branch computes with flex_attention + its score_mod
    (score kept where mask[b,q] & mask[b,kv], else -inf), written as masked SDPA on [B,H,L,D].
    Rows with every key masked (padded text queries) come out 0, as flex_attention returns them."""
    mask = score_mod.__closure__[0].cell_contents  # the [B, L] bool attn_mask the score_mod closes over
    pair = mask[:, None, :, None] & mask[:, None, None, :]
    scores = (query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    scores = scores.masked_fill(~pair, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(value.dtype)
    return probs @ value


def install(root: str) -> None:
    """Apply the stand-ins; call before anything imports hyvideo or generate."""
    if root not in sys.path:
        sys.path.insert(0, root)
    # (1) torchvision: hunyuan_video_pipeline.py:32 imports torchvision.transforms (used only for I2V's
    #     reference image, :841-847): the five pieces it uses, on PIL. diffusers must be imported before the
    #     placeholder exists.
    import diffusers.pipelines.pipeline_utils  # noqa: F401
    if "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except ImportError:
            tv, tvt = types.ModuleType("torchvision"), torchvision_transforms()
            tv.transforms = tvt
            sys.modules.update({"torchvision": tv, "torchvision.transforms": tvt})
    # (2) parallel_states.py:35 builds its DeviceMesh on "cuda" (also via get_parallel_state() on first use,
    #     e.g. inside the transformer forward :707): same mesh on "cpu" (gloo, world size 1 from the env defaults
    #     hyvideo/__init__.py:32-44 sets).
    import hyvideo.commons.parallel_states as ps
    if not getattr(ps.init_device_mesh, "_cpu_standin", False):
        real = ps.init_device_mesh
        def init_device_mesh(device_type, *a, **k):
            return real("cpu", *a, **k)
        init_device_mesh._cpu_standin = True
        ps.init_device_mesh = init_device_mesh
    # (3) generate.py:40 torch.cuda.set_device(LOCAL_RANK) at import.
    torch.cuda.set_device = lambda *a, **k: None
    # (4) attention: 'flash' falls back to 'torch' (commons/__init__.py:211-217) whose kernel is
    #     torch.compile(flex_attention) (attention.py:36-38, 188-191): compile on CPU needs a C++ toolchain and
    #     takes seconds; an eager equivalent.
    import hyvideo.models.transformers.modules.attention as attn
    attn.flex_attention = eager_flex_attention
    import warnings
    warnings.filterwarnings("ignore", message="Falling back from `flash`")
    angelslim_caches()


def angelslim_caches() -> bool:
    """(5) upstream's own caches (--enable_cache) come from angelslim, whose package __init__ imports triton (a GPU
    toolchain). When angelslim is installed (`pip install --no-deps angelslim`), load only its pure-torch cache
    helpers (compressor/diffusion/cache/) under the names upstream imports: ``import angelslim`` (its availability
    check) and ``from angelslim.compressor.diffusion import DeepCacheHelper, TeaCacheHelper, TaylorCacheHelper``.
    Returns whether they are there."""
    import importlib.util
    from pathlib import Path
    if "angelslim.compressor.diffusion" in sys.modules:
        return True
    found = importlib.util.find_spec("angelslim")
    if found is None or not found.submodule_search_locations:
        return False
    where = Path(list(found.submodule_search_locations)[0]) / "compressor" / "diffusion"
    for name, path in (("angelslim", where.parents[1]), ("angelslim.compressor", where.parent),
                       ("angelslim.compressor.diffusion", where)):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    spec = importlib.util.spec_from_file_location("angelslim.compressor.diffusion.cache", where / "cache" / "__init__.py",
                                                  submodule_search_locations=[str(where / "cache")])
    cache = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cache
    spec.loader.exec_module(cache)
    for name in ("DeepCacheHelper", "TeaCacheHelper", "TaylorCacheHelper"):
        setattr(sys.modules["angelslim.compressor.diffusion"], name, getattr(cache, name))
    return True


TINY = dict(patch_size=[1, 1, 1], in_channels=4, concat_condition=True, out_channels=4, hidden_size=64, heads_num=2,
            mlp_width_ratio=2.0, mlp_act_type="gelu_tanh", mm_double_blocks_depth=2, mm_single_blocks_depth=0,
            rope_dim_list=[8, 12, 12], qkv_bias=True, qk_norm=True, qk_norm_type="rms", guidance_embed=False,
            use_meanflow=False, text_projection="single_refiner", use_attention_mask=True, text_states_dim=32,
            text_states_dim_2=768, text_pool_type=None, rope_theta=256, attn_mode="flash", glyph_byT5_v2=True,
            vision_projection="linear", vision_states_dim=16, is_reshape_temporal_channels=False,
            use_cond_type_embedding=True, ideal_resolution="480p", ideal_task="t2v")

def build_transformer(seed=0, **over):
    from hyvideo.models.transformers.hunyuanvideo_1_5_transformer import HunyuanVideo_1_5_DiffusionTransformer
    torch.manual_seed(seed)
    m = HunyuanVideo_1_5_DiffusionTransformer(**{**TINY, **over}).eval()
    with torch.no_grad():  # upstream zero-inits modulation / final layer / concat channels / cond_type_embedding
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


# ---------------------------------------------------------------- stub encoders, tiny VAE, pipeline

TEXT_LEN = 12   # the LLM's max_length (upstream: 1000)
BYT5_LEN = 8    # byt5_max_length (upstream: 256); the 1472 width is hard-coded (pipeline :602, transformer :407-413)
VISION_TOKENS, VISION_DIM = 4, 16  # upstream 729 x 1152 (pipeline __init__ config)


class StubTextEncoder(nn.Module):
    """Upstream TextEncoder's interface as the pipeline uses it (encode_prompt :242-410): max_length, dtype, device,
    text2tokens(text, data_type, max_length), encode(tokens, data_type, device, is_uncond) -> TextEncoderModelOutput.
    Deterministic per prompt; the empty prompt masks all but 1 token."""

    def __init__(self, dim=32, max_length=TEXT_LEN):
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.register_buffer("_anchor", torch.zeros(()))

    @property
    def dtype(self):
        return self._anchor.dtype

    @property
    def device(self):
        return self._anchor.device

    def text2tokens(self, text, data_type="image", max_length=300):
        return [text] if isinstance(text, str) else list(text)

    def encode(self, tokens, data_type="image", device=None, is_uncond=False, **_):
        from hyvideo.models.text_encoders import TextEncoderModelOutput
        hs, masks = [], []
        for s in tokens:
            g = torch.Generator().manual_seed(sum(map(ord, s)) + 7)
            hs.append(torch.randn(self.max_length, self.dim, generator=g))
            m = torch.zeros(self.max_length, dtype=torch.int64)
            m[: max(1, min(len(s.split()), self.max_length))] = 1
            masks.append(m)
        return TextEncoderModelOutput(hidden_state=torch.stack(hs).to(device or self.device),
                                      attention_mask=torch.stack(masks))


class StubByT5(nn.Module):
    """Only called for prompts with quoted text (pipeline :605-619); returns (embeddings,)."""

    def forward(self, ids, attention_mask=None):
        return (torch.randn(ids.shape[0], ids.shape[1], 1472, generator=torch.Generator().manual_seed(0)),)


def tiny_vae(seed=0):
    """A real upstream AutoencoderKLConv3D, tiny: 16x spatial / 4x temporal like the released VAE."""
    from hyvideo.models.autoencoders.hunyuanvideo_15_vae import AutoencoderKLConv3D
    torch.manual_seed(seed)
    return AutoencoderKLConv3D(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8, 8),
                               layers_per_block=1, ffactor_spatial=16, ffactor_temporal=4, sample_size=256,
                               sample_tsize=64, scaling_factor=1.03682).eval()


def build_pipeline(transformer=None, version="480p_t2v", seed=0, bucket_base=128, stub_vae=True):
    from hyvideo.commons import PIPELINE_CONFIGS
    from hyvideo.pipelines.hunyuan_video_pipeline import HunyuanVideo_1_5_Pipeline
    transformer = transformer if transformer is not None else build_transformer(seed)
    cfg = PIPELINE_CONFIGS[version]
    pipe = HunyuanVideo_1_5_Pipeline(
        vae=StubVAE15() if stub_vae else tiny_vae(seed), text_encoder=StubTextEncoder(), transformer=transformer,
        scheduler=HunyuanVideo_1_5_Pipeline._create_scheduler(cfg["flow_shift"]), text_encoder_2=None,
        progress_bar_config=None, byt5_model=StubByT5(), byt5_tokenizer=None, byt5_max_length=BYT5_LEN,
        prompt_format=None, execution_device="cpu", vision_encoder=None, enable_offloading=False,
        vision_num_semantic_tokens=VISION_TOKENS, vision_states_dim=VISION_DIM, **cfg)
    # CPU: upstream runs the loop in bf16 under autocast(device_type="cuda") (:1170, :1227, :1298); on a CPU
    # build that autocast is disabled with a warning, so run fp32 end to end.
    pipe.target_dtype = torch.float32
    pipe.autocast_enabled = pipe.vae_autocast_enabled = False
    for res in pipe.target_size_config.values():  # 480p buckets around 640 px -> around 128 px (96x160 at 16:9)
        res["bucket_hw_base_size"] = bucket_base
    pipe.set_progress_bar_config(disable=True)
    return pipe


class StubVisionEncoder(nn.Module):
    """Stands in for the SigLIP VisionEncoder: I2V's ``encode_images(uint8 H x W x 3)`` (pipeline :694, :723) ->
    ``.last_hidden_state`` [1, VISION_TOKENS, VISION_DIM], deterministic per image. T2V never calls it (:711-712),
    but with --offloading the pipeline moves it (auto_offload_model(None) would fail: commons/__init__.py:229-241
    iterates it)."""

    def encode_images(self, image):
        g = torch.Generator().manual_seed(int(image.sum()) % 100000)
        return types.SimpleNamespace(last_hidden_state=torch.randn(1, VISION_TOKENS, VISION_DIM, generator=g))


def torchvision_transforms():
    """The torchvision.transforms pieces I2V's reference image goes through (pipeline :841-847), on PIL and torch."""
    import numpy as np
    from PIL import Image
    module = types.ModuleType("torchvision.transforms")

    class InterpolationMode:
        LANCZOS = Image.LANCZOS

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    class Resize:
        def __init__(self, size, interpolation=Image.BILINEAR):
            self.size, self.interpolation = size, interpolation

        def __call__(self, image):
            return image.resize((self.size[1], self.size[0]), self.interpolation)

    class CenterCrop:
        def __init__(self, size):
            self.size = size

        def __call__(self, image):
            (h, w), (width, height) = self.size, image.size
            left, top = (width - w) // 2, (height - h) // 2
            return image.crop((left, top, left + w, top + h))

    class ToTensor:
        def __call__(self, image):
            return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    class Normalize:
        def __init__(self, mean, std):
            self.mean, self.std = mean[0], std[0]

        def __call__(self, x):
            return (x - self.mean) / self.std

    for piece in (InterpolationMode, Compose, Resize, CenterCrop, ToTensor, Normalize):
        setattr(module, piece.__name__, piece)
    return module


def fake_create_pipeline(record=None):
    """A stand-in for HunyuanVideo_1_5_Pipeline.create_pipeline (pipeline :1466-1547) with its signature."""
    def create_pipeline(pretrained_model_name_or_path, transformer_version, create_sr_pipeline=False,
                        transformer_dtype=torch.bfloat16, device=None, transformer_init_device=None, **kwargs):
        if record is not None:
            record.update(path=pretrained_model_name_or_path, version=transformer_version, sr=create_sr_pipeline,
                          dtype=transformer_dtype, device=device, init_device=transformer_init_device)
        task = transformer_version.split("_")[1]
        pipe = build_pipeline(build_transformer(ideal_task=task, ideal_resolution=transformer_version.split("_")[0]),
                              version=transformer_version)
        pipe.register_modules(vision_encoder=StubVisionEncoder())
        return pipe
    return create_pipeline




class StubVAE15(nn.Module):
    """The VAE interface the pipeline uses (pipeline :158, :862-872, :1289-1299): config.block_out_channels /
    ffactor_spatial / ffactor_temporal / scaling_factor / shift_factor, enable_tile_parallelism(),
    memory_efficient_context(), decode(latents, return_dict=False, generator=None) -> (video,). The "video" is the
    latent's first 3 channels, nearest-upsampled 16x in space and (F-1)*4+1 frames: cheap and deterministic."""

    def __init__(self):
        super().__init__()
        self.config = types.SimpleNamespace(block_out_channels=[1] * 5, ffactor_spatial=16, ffactor_temporal=4,
                                             scaling_factor=1.03682, shift_factor=None)
        self.register_buffer("_anchor", torch.zeros(()))

    def enable_tile_parallelism(self):
        pass

    @contextlib.contextmanager
    def memory_efficient_context(self):
        yield

    def encode(self, x):
        """I2V's reference-image latent (pipeline :851-853: ``vae.encode(px).latent_dist.mode()``): 16x average
        pooling, 4 channels."""
        latent = torch.nn.functional.avg_pool3d(x, (1, 16, 16))
        latent = torch.cat([latent, latent[:, :1]], 1)[:, :4]
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: latent.clone()))

    def decode(self, z, return_dict=False, generator=None):
        v = z[:, :3].repeat_interleave(16, -1).repeat_interleave(16, -2)
        v = torch.cat([v[:, :, :1], v[:, :, 1:].repeat_interleave(4, 2)], 2).tanh()
        return (v,)
