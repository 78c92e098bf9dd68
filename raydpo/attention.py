"""Attention over packed rows: no cross-sequence scores, no device sync inside a layer.

A packed row holds several sequences back to back, positions restarting per sequence. Left alone,
transformers reads the boundaries from the restarting position ids and builds a block-diagonal
``(B, 1, L, L)`` mask; SDPA then computes all ``L x L`` scores of a row, so a row of 16 sequences of
330 tokens does 16x the attention work the sequences need. What runs instead (docs/update_step.md):

- CUDA, ``flash_attn`` importable, bf16/fp16 compute: transformers' ``flash_attention_2`` with the
  boundaries as ``cu_seq_lens_q/k`` (int32, copied to the device once per forward) and
  ``max_length_q/k`` as host ints, so its varlen kernel runs and reads nothing back.
- Anywhere else (CPU; CUDA without flash-attn or in float32): ``raydpo_varlen``, registered with
  transformers' ``AttentionInterface``. The boundaries arrive as host integers
  (:class:`PackedBounds`, computed by the packer, passed to every layer), and each layer runs one
  causal SDPA per sequence over ``split`` pieces of the row: no mask, no read-back. On CPU this beat
  one padded SDPA call by 2.2-2.5x (single-threaded, forward and forward+backward: the padded batch
  computes ``N x Lmax^2`` scores against ``sum L_i^2``); FlexAttention has no CPU backward
  (bench/packed_attention.py, docs/update_step.md).
- Eager models (Gemma 2's attention softcap needs it) stay eager: transformers' block-diagonal mask.

Padded layouts (an attention mask, no bounds) go through transformers' own ``sdpa`` path unchanged.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.utils import is_flash_attn_2_available

NAME = "raydpo_varlen"
FLASH = "flash_attention_2"
KWARG = "raydpo_packing"  # the decoder keyword carrying the PackedBounds to every layer


@dataclass(frozen=True)
class PackedBounds:
    """The sequence boundaries of a packed micro-batch as host integers: run ``i`` covers tokens
    ``[bounds[i], bounds[i + 1])`` of the flattened ``rows x width`` tokens (flash-attention's
    ``cu_seq_lens``); ``bounds[-1]`` is the token count, and a row's trailing padding is a run of its
    own. Built by the packer, on the host, so no layer ever reads a boundary back from the device."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(e <= s for s, e in zip(b[:-1], b[1:])):
            raise ValueError(f"bounds must start at 0 and strictly increase, got {b}")

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(e - s for s, e in zip(self.bounds[:-1], self.bounds[1:]))

    @property
    def longest(self) -> int:
        return max(self.lengths)


def per_sequence_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bounds: PackedBounds,
                           scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention within each run of the flattened tokens: one causal SDPA per run.

    Shapes: ``query (1, H, T, D)``, ``key``/``value`` ``(1, Hkv, T, D)`` (Hkv divides H: grouped
    query attention); returns ``(1, H, T, D)``. ``split``, not slices: split's backward is one cat,
    where each slice's backward writes its gradient into a zero tensor of the whole row (N full-row
    copies per layer; the loop raydpo ran before did that)."""
    n = bounds.lengths
    gqa = key.shape[1] != query.shape[1]
    pieces = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
              for q, k, v in zip(query.split(n, 2), key.split(n, 2), value.split(n, 2))]
    return torch.cat(pieces, dim=2)


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
    """transformers' attention signature. Shapes: ``query (B, H, L, D)``, ``key``/``value``
    ``(B, Hkv, L, D)``; returns ``(B, L, H, D)``. With :class:`PackedBounds` under
    ``raydpo_packing``: :func:`per_sequence_attention` over the ``B x L`` flattened tokens; without:
    transformers' ``sdpa``."""
    bounds: PackedBounds | None = kwargs.pop(KWARG, None)
    if bounds is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if kwargs.get("softcap") is not None:  # transformers' sdpa refuses it too: SDPA has no softcap
        raise ValueError("raydpo_varlen cannot apply an attention softcap (Gemma 2): load the model with eager attention")
    window = kwargs.get("sliding_window")
    if window is not None and bounds.longest > window:
        # Each sequence runs plain causal; a window shorter than a sequence would change the math.
        raise ValueError(f"packed rows ignore the attention's sliding window ({window} tokens), but a sequence has "
                         f"{bounds.longest}: turn train.packing off for this model")
    b, h, length, d = query.shape

    def flat(x: torch.Tensor) -> torch.Tensor:  # (B, H, L, D) -> (1, H, B x L, D); a view when B = 1
        return x.transpose(0, 1).reshape(1, x.shape[1], b * length, d)

    out = per_sequence_attention(flat(query), flat(key), flat(value), bounds, scale=scaling, dropout=dropout)
    return out.reshape(h, b, length, d).permute(1, 2, 0, 3), None


# Set while a packed forward whose layers get the bounds builds its mask: the mask is then not needed.
_PACKED = contextvars.ContextVar("raydpo_packed_forward", default=False)


def _varlen_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's mask, except for a packed forward that carries its boundaries to every layer: there
    transformers would build (and every layer ignore) a ``(B, 1, L, L)`` block-diagonal mask."""
    if _PACKED.get() and kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, varlen_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _varlen_mask)


def choose(model: torch.nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> str:
    """The attention implementation for ``model`` running on ``device`` with matmuls in
    ``compute_dtype`` (autocast's dtype, else the weights'): ``flash_attention_2`` on CUDA in
    bf16/fp16 where ``flash_attn`` is importable and the architecture supports it, else
    ``raydpo_varlen``. Models not on SDPA (eager: Gemma 2's softcap; flex) keep theirs."""
    current = model.config._attn_implementation
    if current not in ("sdpa", NAME, FLASH):
        return current
    flash = (torch.device(device).type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16)
             and getattr(model, "_supports_flash_attn", False) and is_flash_attn_2_available())
    return FLASH if flash else NAME


def use(model: torch.nn.Module, device: torch.device | str, compute_dtype: torch.dtype) -> str:
    """Set ``model``'s attention to :func:`choose`'s pick (a config attribute every layer reads at
    call time); returns it."""
    implementation = choose(model, device, compute_dtype)
    if model.config._attn_implementation != implementation:
        model.config._attn_implementation = implementation
    return implementation


@contextmanager
def packed(implementation: str, bounds: PackedBounds | None, device: torch.device) -> Iterator[dict]:
    """The decoder keywords for one forward over packed ``bounds`` (None: a padded layout, no
    keywords), under the mask rule of :func:`_varlen_mask`.

    - ``flash_attention_2``: ``cu_seq_lens_q/k`` int32 on ``device`` (one host-to-device copy, no
      sync) and ``max_length_q/k`` host ints; transformers then calls the varlen kernel directly.
    - ``raydpo_varlen``: the :class:`PackedBounds` under ``raydpo_packing``, and no block-diagonal mask.
    - anything else (eager): nothing; transformers' block-diagonal mask keeps sequences apart."""
    if bounds is None or implementation not in (FLASH, NAME):
        yield {}
        return
    if implementation == FLASH:
        cu = torch.tensor(bounds.bounds, dtype=torch.int32).to(device, non_blocking=True)
        yield {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": bounds.longest,
               "max_length_k": bounds.longest}
        return
    token = _PACKED.set(True)
    try:
        yield {KWARG: bounds}
    finally:
        _PACKED.reset(token)
