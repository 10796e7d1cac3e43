"""Complete HunyuanVideo 1.5 diffusers pipeline folders for the tests, built offline with ``save_pretrained``.

The transformer and the VAE are tests/hunyuan15_tiny.py's; beside them, every component diffusers'
``HunyuanVideo15Pipeline.from_pretrained`` loads, as the classes the pipeline names, tiny and random:

* ``text_encoder``: a 2-layer ``Qwen2_5_VLTextModel`` as wide as the transformer's ``text_embed_dim``;
* ``tokenizer``: a ``Qwen2Tokenizer`` with a byte-level vocabulary written here (GPT-2's 256 byte symbols, a merge
  chain making each pre-token of the pipeline's system message one token, and Qwen's ``<|endoftext|>``,
  ``<|im_start|>``, ``<|im_end|>``) and Qwen2.5-VL's chat template. The pipeline's own text path runs unchanged:
  ``apply_chat_template`` with its system message, padding to ``tokenizer_max_length +
  prompt_template_encode_start_idx`` (1000 + 108; both are set in the pipeline's ``__init__``, not in a config, so
  they stay) and the crop of the first 108 tokens. Here the template's prefix is 131 tokens
  (:func:`template_prefix_length`), so the crop leaves the tail of the system message before the prompt (the
  tests check that their prompts reach the text encoder whole);
* ``text_encoder_2``: a 1-layer ``T5EncoderModel`` as wide as ``text_embed_2_dim``, with ``ByT5Tokenizer`` (its
  256 max length kept): it runs only for a prompt with quoted text (the pipeline's glyph texts);
* ``guider``: ``ClassifierFreeGuidance`` at 6.0 (two calls per step);
* image-to-video: a tiny ``SiglipVisionModel`` and ``SiglipImageProcessor`` (16 px), as tests/hunyuan15_tiny.py's.
"""
from __future__ import annotations

from pathlib import Path

import torch

import hunyuan15_tiny as T

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen2.5-VL-Instruct's chat template (text and vision parts), as its tokenizer_config.json carries it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable symbol table (byte-level BPE's alphabet, Qwen2's too)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def system_message() -> str:
    """The pipeline's own system message (its ``__init__`` sets it; read off an instance with only a VAE)."""
    from diffusers import HunyuanVideo15Pipeline
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=None, vae=T.tiny_vae(),
                                  scheduler=None, text_encoder_2=None, tokenizer_2=None, guider=None)
    return pipe.system_message


def qwen_tokenizer():
    """A byte-level ``Qwen2Tokenizer`` whose vocabulary is the 256 byte symbols, a merge chain making each
    pre-token of the pipeline's system message one token, and Qwen's special tokens (pad = ``<|endoftext|>``)."""
    from transformers import Qwen2Tokenizer
    symbols = bytes_to_unicode()
    vocab = {s: i for i, s in enumerate(symbols.values())}
    merges: list[tuple[str, str]] = []
    probe = Qwen2Tokenizer(vocab=dict(vocab), merges=[])
    for piece, _ in probe.backend_tokenizer.pre_tokenizer.pre_tokenize_str(system_message()):
        for end in range(2, len(piece) + 1):
            if piece[:end] not in vocab:
                merges.append((piece[:end - 1], piece[end - 1]))
                vocab[piece[:end]] = len(vocab)
    for token in SPECIALS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def template_prefix_length(tokenizer) -> int:
    """Tokens of the pipeline's chat-template prefix (everything before the user's text)."""
    messages = [{"role": "system", "content": system_message()}, {"role": "user", "content": "X"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    full = list(ids["input_ids"])
    return full.index(tokenizer.convert_tokens_to_ids("X"))


def text_stack(seed: int = 0):
    """(text_encoder, tokenizer, text_encoder_2, tokenizer_2), tiny and random, for the tiny transformer's widths."""
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel
    tokenizer = qwen_tokenizer()
    torch.manual_seed(seed + 10)
    qwen = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=T.TINY["text_embed_dim"], intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]},
        bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id)).eval()
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(seed + 11)
    byt5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer_2), d_model=T.TINY["text_embed_2_dim"], d_kv=4, d_ff=16,
                                   num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                                   pad_token_id=tokenizer_2.pad_token_id,
                                   eos_token_id=tokenizer_2.eos_token_id)).eval()
    return qwen, tokenizer, byt5, tokenizer_2


def save_t2v_folder(path, seed: int = 0) -> Path:
    """A complete local HunyuanVideo15Pipeline folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15Pipeline
    from diffusers.guiders import ClassifierFreeGuidance
    qwen, tokenizer, byt5, tokenizer_2 = text_stack(seed)
    pipe = HunyuanVideo15Pipeline(text_encoder=qwen, tokenizer=tokenizer, transformer=T.transformer("t2v", seed),
                                  vae=T.tiny_vae(), scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                                  text_encoder_2=byt5, tokenizer_2=tokenizer_2,
                                  guider=ClassifierFreeGuidance(guidance_scale=6.0))
    pipe.save_pretrained(path)
    return Path(path)


def save_i2v_folder(path, seed: int = 0) -> Path:
    """A complete local HunyuanVideo15ImageToVideoPipeline folder (the text stack plus a SigLIP vision tower)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideo15ImageToVideoPipeline
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    qwen, tokenizer, byt5, tokenizer_2 = text_stack(seed)
    torch.manual_seed(seed + 1)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=T.TINY["image_embed_dim"], intermediate_size=16,
                                                  num_hidden_layers=1, num_attention_heads=2, image_size=16,
                                                  patch_size=8)).eval()
    pipe = HunyuanVideo15ImageToVideoPipeline(
        text_encoder=qwen, tokenizer=tokenizer, transformer=T.transformer("i2v", seed), vae=T.tiny_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=byt5, tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0), image_encoder=vision,
        feature_extractor=SiglipImageProcessor(size={"height": 16, "width": 16}))
    pipe.save_pretrained(path)
    return Path(path)
