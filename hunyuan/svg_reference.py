"""A CPU reference of Sparse VideoGen's attention for HunyuanVideo (SVG1, ``svg.models.hyvideo``): SVG's code runs
as written, and only its CUDA-only pieces are replaced by PyTorch equivalents.

What SVG computes on every sparse layer (``Hunyuan_SparseAttn.attention_core_logic``, svg/models/hyvideo/modules/
attenion.py:125-158) is kept: the head classification (``sample_mse``: a few sampled query rows scored against full
attention under the spatial and the temporal mask, each head taking the mask with the smaller error), the token
reordering of temporal heads and back (SVG's own reference placements, ``ref_hunyuan_*_placement``, which its
triton kernels are tested against in placement.py), and which layers and timesteps stay dense (``attention``,
attenion.py:227-241). What is replaced:

* the block-sparse kernel, ``flex_attention`` with the block mask ``prepare_flexattention`` builds on CUDA: here
  ``scaled_dot_product_attention`` with the equivalent dense boolean mask, SVG's own ``mask_mod``
  (``generate_temporal_head_mask_mod``) evaluated at every (query, key) pair. A flex-attention block mask applies
  the same ``mask_mod`` elementwise in its partial blocks and skips only blocks the ``mask_mod`` leaves empty, so
  the two compute the same attention (tests/test_hunyuan_svg.py checks it against PyTorch's own flex_attention
  run eagerly on the CPU);
* the triton placement kernels (``hunyuan_sparse_head_placement``, ``hunyuan_hidden_states_placement``): SVG's
  ``ref_`` versions, which SVG's class already exposes as ``sparse_head_placement`` / ``hidden_states_placement``;
* ``flash_attn_varlen_func`` (the dense layers and timesteps): attention per ``cu_seqlens`` segment with SDPA;
* ``get_cu_seqlens``, which SVG allocates on ``"cuda"``: the same arithmetic on the text mask's device.

Importing SVG's model code needs ``flash_attn`` and ``triton`` importable (attenion.py:7 imports flash_attn outside
its try block; placement.py:2-3 imports triton); the reference calls neither. On a machine without them the tests
import SVG with stand-in modules (tests/svg_tiny.py).

Design notes: docs/hunyuanvideo.md#sparse-videogen-svg-with-a-step-cache
"""
from __future__ import annotations

import contextlib
import importlib
from typing import Iterator

import torch
import torch.nn.functional as F

PACKAGE = "svg.models.hyvideo"  # SVG1's copy of HunyuanVideo (the layout EasyCache's hyvideo_svg_easycache.py imports)


def dense_mask(mask_mod, seq_len: int, device=None) -> torch.Tensor:
    """``mask_mod`` (a flex-attention mask function) evaluated at every (query, key) pair: ``[seq_len, seq_len]``
    booleans, True where the query attends the key. SVG's mask functions are elementwise tensor expressions of the
    indices, so one broadcast call evaluates them all. ``seq_len ** 2`` bytes: a reference for the small sizes of
    the tests (at 720p and 129 frames it would take 14 GB)."""
    index = torch.arange(seq_len, device=device)
    mask = mask_mod(0, 0, index[:, None], index[None, :])
    return torch.as_tensor(mask, device=device).expand(seq_len, seq_len).clone()


def prepare_dense_mask(cfg_size, num_head, head_dim, dtype, device, context_length, prompt_length, num_frame,
                       frame_size, diag_width=1, multiplier=2) -> torch.Tensor:
    """Stands in for SVG's ``prepare_flexattention`` (attenion.py:371-383), same signature: the dense boolean mask
    of the ``mask_mod`` SVG builds its CUDA block mask from, for :func:`sdpa_sparse` to apply."""
    assert diag_width == multiplier  # as SVG's: one width for the spatial and the temporal band
    utils = importlib.import_module(f"{PACKAGE}.modules.utils")
    mask_mod = utils.generate_temporal_head_mask_mod(context_length, prompt_length, num_frame, frame_size,
                                                     mul=multiplier)
    return dense_mask(mask_mod, context_length + num_frame * frame_size, device)


def sdpa_sparse(cls, query, key, value, block_mask):
    """Stands in for ``Hunyuan_SparseAttn.sparse_flex_attention``: ``block_mask`` is the dense mask of
    :func:`prepare_dense_mask` (held where SVG holds its block mask, ``Hunyuan_SparseAttn.block_mask``)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=block_mask.to(query.device))


def flash_attn_varlen_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q=None, max_seqlen_kv=None,
                           dropout_p=0.0, softmax_scale=None, causal=False, **_):
    """``flash_attn_varlen_func``'s computation: ``[total, heads, dim]`` packed sequences, attention within each
    ``cu_seqlens`` segment."""
    out = torch.empty_like(q)
    for i in range(len(cu_seqlens_q) - 1):
        a, b = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        c, d = int(cu_seqlens_kv[i]), int(cu_seqlens_kv[i + 1])
        if b > a:
            out[a:b] = F.scaled_dot_product_attention(
                q[None, a:b].transpose(1, 2), k[None, c:d].transpose(1, 2), v[None, c:d].transpose(1, 2),
                dropout_p=dropout_p, scale=softmax_scale, is_causal=causal).transpose(1, 2)[0]
    return out


def get_cu_seqlens(text_mask, img_len):
    """SVG's (and upstream's) ``get_cu_seqlens`` arithmetic, on the text mask's device instead of ``"cuda"``."""
    batch_size = text_mask.shape[0]
    text_len = text_mask.sum(dim=1)
    max_len = text_mask.shape[1] + img_len
    cu_seqlens = torch.zeros([2 * batch_size + 1], dtype=torch.int32, device=text_mask.device)
    for i in range(batch_size):
        cu_seqlens[2 * i + 1] = i * max_len + text_len[i] + img_len
        cu_seqlens[2 * i + 2] = (i + 1) * max_len
    return cu_seqlens


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """SVG's CUDA-only pieces replaced by the CPU equivalents above while the context is open, everything put back
    after. Everything else of SVG (the head classification, the layer and timestep choice, the masks of
    ``sample_mse``) stays SVG's."""
    attenion = importlib.import_module(f"{PACKAGE}.modules.attenion")
    models = importlib.import_module(f"{PACKAGE}.modules.models")
    attn = attenion.Hunyuan_SparseAttn
    saved_modules = [(attenion, name, getattr(attenion, name))
                     for name in ("flash_attn_varlen_func", "get_cu_seqlens", "prepare_flexattention")]
    saved_modules.append((models, "get_cu_seqlens", models.get_cu_seqlens))  # imported by name there
    saved_class = {name: attn.__dict__[name] for name in
                   ("sparse_flex_attention", "fast_sparse_head_placement", "fast_hidden_states_placement")}
    attenion.flash_attn_varlen_func = flash_attn_varlen_sdpa
    attenion.get_cu_seqlens = models.get_cu_seqlens = get_cu_seqlens
    attenion.prepare_flexattention = prepare_dense_mask
    attn.sparse_flex_attention = classmethod(sdpa_sparse)
    # SVG's own torch references of its triton kernels (attenion.py:96-115)
    attn.fast_sparse_head_placement = attn.__dict__["sparse_head_placement"]
    attn.fast_hidden_states_placement = attn.__dict__["hidden_states_placement"]
    try:
        yield
    finally:
        for module, name, value in saved_modules:
            setattr(module, name, value)
        for name, value in saved_class.items():
            setattr(attn, name, value)
