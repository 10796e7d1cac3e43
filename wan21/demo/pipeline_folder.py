"""The demo model as a standard diffusers pipeline folder (``stepcache demo --save-pipeline DIR``).

The folder holds diffusers' and transformers' own classes wherever one fits:

- ``transformer/``: the demo's ``WanTransformer3DModel``;
- ``scheduler/``: ``FlowMatchEulerDiscreteScheduler`` with the demo's shift;
- ``tokenizer/``: a transformers ``PreTrainedTokenizerFast`` (a word-level ``tokenizers`` model: lower case,
  runs of letters and digits, an end token), which loads offline;
- ``text_encoder/``: a transformers ``OPTModel`` with no layers, which is exactly the demo's word table: its token
  embedding is the table, its position table is zero, and it has no final norm;
- ``vae/``: the demo's linear codec, a component diffusers has no class for, so its code ships in the folder
  (``vae/demo_codec.py``), the way diffusers' custom components do;
- ``pipeline.py``: ``StepcacheDemoPipeline``, ``WanPipeline`` with the demo's sizes as defaults.

``DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)`` loads it in a Python without stepcache.
stepcache itself loads it with :func:`load`, from its own copy of that code (it runs no code from the folder).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...profiles import FOLDER_PROFILE
from .folder import demo_codec, pipeline as demo_pipeline
from .text import EOS, MAX_TOKENS, PAD, UNK, WordEncoder, WordTokenizer

FOLDER_CODE = Path(demo_pipeline.__file__).parent
PIPELINE_CLASS = demo_pipeline.StepcacheDemoPipeline.__name__
CODEC_CLASS = demo_codec.DemoLinearCodec.__name__
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
CODEC_MODULE = Path(demo_codec.__file__).stem
PIPELINE_MODULE = Path(demo_pipeline.__file__).stem


def build_tokenizer(tokenizer: WordTokenizer | None = None):
    """The demo's word tokenizer as a transformers fast tokenizer: the same ids for every prompt of at most
    ``MAX_TOKENS - 1`` words (a longer one keeps its end token, where the demo's own cuts it)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    vocab = (tokenizer or WordTokenizer()).vocab
    words = Tokenizer(WordLevel(vocab, unk_token=UNK))
    words.normalizer = normalizers.Sequence([normalizers.Lowercase(),
                                             normalizers.Replace(Regex("[^a-z0-9]+"), " ")])
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   model_max_length=MAX_TOKENS)


def build_text_encoder(encoder: WordEncoder):
    """The word table as a transformers ``OPTModel`` with no layers: ``last_hidden_state`` is the token's row of
    the table (plus a zero position row), exactly. Padding positions keep their row; ``WanPipeline`` cuts the
    embeddings at the attention mask and pads with zeros, as it does for umT5."""
    from transformers import OPTConfig, OPTModel
    vocab, dim = encoder.embedding.weight.shape
    config = OPTConfig(vocab_size=vocab, hidden_size=dim, word_embed_proj_dim=dim, num_hidden_layers=0,
                       num_attention_heads=1, ffn_dim=dim, max_position_embeddings=MAX_TOKENS,
                       do_layer_norm_before=False, dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                       bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = OPTModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        model.decoder.embed_tokens.weight.copy_(encoder.embedding.weight.float())
        model.decoder.embed_positions.weight.zero_()
    return model


def build_codec(codec) -> "demo_codec.DemoLinearCodec":
    components = codec.basis.shape[1]
    module = demo_codec.DemoLinearCodec(components=components, z_dim=codec.channels,
                                        latents_mean=[0.0] * codec.channels, latents_std=[1.0] * codec.channels)
    with torch.no_grad():
        module.mean.copy_(codec.mean)
        module.basis.copy_(codec.basis)
        module.std.copy_(codec.std)
    return module.eval()


def build_pipeline(model):
    """``StepcacheDemoPipeline`` around a loaded :class:`~.model.DemoModel`, with transformers' tokenizer and
    text encoder and the codec as a diffusers component."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .model import SHIFT
    pipe = demo_pipeline.StepcacheDemoPipeline(
        tokenizer=build_tokenizer(model.tokenizer), text_encoder=build_text_encoder(model.text_encoder),
        vae=build_codec(model.codec), scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT),
        transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save(folder, model=None, profile: str | Path | None = None) -> Path:
    """Write the demo as a diffusers pipeline folder at ``folder`` (which must not exist), whole or not at all.
    ``profile``: the stepcache profile to put beside it (default: the demo's)."""
    from ...outputs import atomic_dir
    from .model import PROFILE, load
    model = model if model is not None else load()
    folder = Path(folder)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    with atomic_dir(folder) as partial:
        pipe = build_pipeline(model)
        bars = (diffusers_logging, transformers_logging)
        for library in bars:
            library.disable_progress_bar()  # one bar per file is noise for a 7 MB folder
        try:
            pipe.save_pretrained(partial, safe_serialization=True)
        finally:
            for library in bars:
                library.enable_progress_bar()
        index = json.loads((partial / "model_index.json").read_text())
        # The two custom pieces, named as diffusers finds custom code in a folder: the pipeline by
        # [module, class] in the root, the codec by [module, class] in its component folder.
        index["_class_name"] = [PIPELINE_MODULE, PIPELINE_CLASS]
        index["vae"] = [CODEC_MODULE, CODEC_CLASS]
        # transformers 5 saves its fast tokenizer as "TokenizersBackend", a name transformers 4 lacks; the older
        # name is the same class in 5, so the folder loads with either.
        index["tokenizer"] = ["transformers", TOKENIZER_CLASS]
        config_path = partial / "tokenizer" / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = TOKENIZER_CLASS
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (partial / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(demo_pipeline.__file__, partial / f"{PIPELINE_MODULE}.py")
        shutil.copyfile(demo_codec.__file__, partial / "vae" / f"{CODEC_MODULE}.py")
        shutil.copyfile(profile or PROFILE, partial / FOLDER_PROFILE)
        (partial / "README.md").write_text(README)
    return folder


def is_demo_folder(folder) -> bool:
    """Whether ``folder`` holds a demo pipeline folder (its model_index.json names the demo's pipeline class)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return index.get("_class_name") == [PIPELINE_MODULE, PIPELINE_CLASS]


def load(folder, dtype=torch.float32, device="cpu"):
    """A saved demo folder, loaded from its weight files (safetensors) with stepcache's own copy of the folder's
    code: nothing in the folder runs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import OPTModel, PreTrainedTokenizerFast
    folder = Path(folder)
    pipe = demo_pipeline.StepcacheDemoPipeline(
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer", local_files_only=True),
        text_encoder=OPTModel.from_pretrained(folder / "text_encoder", local_files_only=True,
                                              use_safetensors=True).eval(),
        vae=demo_codec.DemoLinearCodec.from_pretrained(folder / "vae", local_files_only=True,
                                                       use_safetensors=True).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
        transformer=WanTransformer3DModel.from_pretrained(folder / "transformer", local_files_only=True,
                                                          use_safetensors=True, torch_dtype=dtype).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


README = """# stepcache demo model, as a diffusers pipeline

A 6-layer Wan2.1 transformer (3.6 MB) trained by stepcache on procedural clips: a coloured square or disc moving
over a dark, light or gradient background, 8 frames of 32x32. Written by `stepcache demo --save-pipeline`.

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("THIS_FOLDER", trust_remote_code=True)
frames = pipe("a red square moving right on a dark background", output_type="np").frames[0]  # (8, 32, 32, 3)
```

`trust_remote_code=True` runs two short files of this folder: `pipeline.py` (WanPipeline with the demo's sizes
as defaults: 32x32, 8 frames, 30 steps, guidance 2.5, 12 prompt tokens) and `vae/demo_codec.py` (the demo's
fixed linear codec). The tokenizer and text encoder are transformers classes (a word-level tokenizer, and the
word table as an `OPTModel` with no layers).

With stepcache: `stepcache generate --model THIS_FOLDER --prompt "..." --method magcache --out ball.mp4`;
`stepcache-profile.json` is the demo's profile. Prompts name a colour (red, green, blue, yellow, cyan, magenta),
a shape (square, disc), a direction (right, left, up, down) and a background (dark, light, gradient).
"""
