"""The demo's prompt encoder: a word-level tokenizer and a learned word-embedding table.

It plugs into ``WanPipeline`` where umT5 goes (``pipe.tokenizer`` and ``pipe.text_encoder``), so prompts go
through the pipeline's own ``encode_prompt``: the tokenizer maps each known word to an id and appends an end
token (like T5), the encoder returns one embedding per token, and the pipeline zero-pads to
``max_sequence_length``. The empty (negative) prompt is the end token alone: that is what training shows the
model when it drops the conditioning, so classifier-free guidance works. Deterministic: no randomness at
inference, and the table ships inside the model file.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import torch
from torch import nn

from .scenes import VOCAB

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL = (PAD, EOS, UNK)
MAX_TOKENS = 12   # the longest prompt is 9 words + </s>; training and sampling both pad to this length
TEXT_DIM = 32


class WordTokenizer:
    """The subset of the Hugging Face tokenizer call that ``WanPipeline`` uses."""

    def __init__(self, words=VOCAB):
        self.vocab = {w: i for i, w in enumerate((*SPECIAL, *words))}

    def __len__(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        words = re.findall(r"[a-z0-9]+", text.lower())
        return [self.vocab.get(w, self.vocab[UNK]) for w in words] + [self.vocab[EOS]]

    def __call__(self, prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                 add_special_tokens=True, return_attention_mask=True, return_tensors="pt", **_):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        rows = [self.ids(p)[:max_length] for p in prompts]
        ids = torch.zeros(len(rows), max_length, dtype=torch.long)
        mask = torch.zeros(len(rows), max_length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return SimpleNamespace(input_ids=ids, attention_mask=mask)


class WordEncoder(nn.Module):
    """One learned vector per word; padding positions are zero (``WanPipeline`` zero-pads past the mask too)."""

    def __init__(self, vocab_size: int, dim: int = TEXT_DIM):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embedding(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None].to(h.dtype)
        return SimpleNamespace(last_hidden_state=h)

    def encode(self, tokenizer: WordTokenizer, prompts, max_length: int = MAX_TOKENS) -> torch.Tensor:
        t = tokenizer(prompts, max_length=max_length)
        return self(t.input_ids, t.attention_mask).last_hidden_state
