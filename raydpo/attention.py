"""Attention over packed sequences without a block-diagonal mask: one causal SDPA per sequence.

transformers reads packed sequences from restarting position ids and builds a block-diagonal
``(B, 1, L, L)`` mask for SDPA; the CPU kernel then computes all ``L x L`` scores of a row, so a row
of 16 sequences of 330 tokens does 16x the attention work the sequences need. Flash-attention's
varlen kernel (GPU) avoids this by taking the sequence boundaries, ``cu_seq_lens``, directly.

``raydpo_varlen`` is that for SDPA, on any device: registered with transformers'
``AttentionInterface``, it takes the same ``cu_seq_lens_q`` keyword flash-attention does (the
scorer passes it with every packed layout) and runs one causal SDPA per sequence. Without
``cu_seq_lens_q`` (padded layouts, generation) it is exactly transformers' ``sdpa``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "raydpo_varlen"


def varlen_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Shapes: ``query (B, H, L, D)``, ``key``/``value`` ``(B, Hkv, L, D)``; ``cu_seq_lens_q`` holds
    the run boundaries over the flattened ``B x L`` tokens (``[0, l1, l1 + l2, ..., B x L]``).
    Returns ``(B, L, H, D)``, as transformers' attention functions do."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    b, h, length, d = query.shape
    hk = key.shape[1]
    q = query.transpose(0, 1).reshape(1, h, b * length, d)
    k = key.transpose(0, 1).reshape(1, hk, b * length, d)
    v = value.transpose(0, 1).reshape(1, hk, b * length, d)
    bounds = cu.tolist()
    pieces = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], dropout_p=dropout, is_causal=True,
                                       scale=scaling, enable_gqa=hk != h)
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    out = torch.cat(pieces, dim=2)  # (1, H, B*L, D)
    return out.reshape(h, b, length, d).permute(1, 2, 0, 3).contiguous(), None


AttentionInterface.register(NAME, varlen_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # padded layouts keep SDPA's own mask


def use_varlen(model: torch.nn.Module) -> None:
    """Switch an SDPA model to ``raydpo_varlen``. Eager models stay eager (some need it: Gemma 2's
    attention softcap), and flash-attention models keep their own varlen kernel."""
    config = model.config
    if config._attn_implementation == "sdpa":
        config._attn_implementation = NAME
