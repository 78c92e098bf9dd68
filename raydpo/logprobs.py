"""Per-sequence log-probs from hidden states, without full-vocabulary logits.

A sequence log-prob is ``sum_t log p(ids[t] | ids[<t])`` over completion tokens only; prompt and
padding tokens never count. Every layout gives the same number: padded (right or left), or packed
(several sequences in one row, positions restarting per sequence, attention never crossing a
sequence boundary).

Only the positions whose next token is scored go through the LM head, in chunks of
``chunk_tokens`` positions, each chunk projected and log-softmaxed in float32 and dropped
straight after; backward recomputes each chunk. So the head holds O(chunk_tokens x V) floats, not
O(2B x T x V) (for SmolLM2, V = 49,152: a 1,024-token chunk is 200 MB of fp32 logits, where 16
sequences of 512 tokens hold 1.6 GB per full-size copy). The ``logits/*`` and ``entropy`` metrics
come out of the same chunks.

Why our own and not a library (see docs/logprobs.md): cut-cross-entropy gives per-token losses on
CPU (torch.compile) and GPU (Triton), but no entropy or mean logit, so the metrics would need a
second pass over the vocabulary; Liger-Kernel's chunked preference losses chunk over pairs, so each
chunk still holds ``[2 x chunk, T, V]``; torchtune's chunked output keeps full-size fp32 logits for
autograd. This is one matmul, a log-softmax and its closed-form gradient, per chunk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from raydpo import attention
from raydpo.attention import PackedBounds

Layout = dict[str, "Tensor | PackedBounds"]  # a batch for PolicyScorer: tensors, plus host bounds when packed

DEFAULT_CHUNK_TOKENS = 1024  # positions per head chunk: chunk x V fp32 logits live at a time


# --------------------------------------------------------------------------------------------
# The head, chunked over tokens
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeadTransform:
    """What a model does to ``hidden @ W.T (+ bias)`` before the softmax: ``scale`` multiplies
    (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``), then ``softcap`` squashes
    (Gemma 2/3: ``cap * tanh(z / cap)``). Plain Llama/Qwen/Mistral: neither."""

    scale: float = 1.0
    softcap: float | None = None


def _chunk_logits(h: Tensor, weight: Tensor, bias: Tensor | None, t: HeadTransform) -> Tensor:
    """``(C, H) -> (C, V)`` float32 logits: the matmul in ``weight``'s dtype (the model's or
    autocast's, cast once per call by the caller, not per chunk), everything after it in float32."""
    z = (h.to(weight.dtype) @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if t.scale != 1.0:
        z = z * t.scale
    if t.softcap is not None:
        z = torch.tanh(z / t.softcap) * t.softcap
    return z


class _ChunkedHeadLogps(torch.autograd.Function):
    """``logp[m] = log_softmax(head(hidden[m]))[targets[m]]`` chunk by chunk; see :func:`head_logps`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, transform, dtype):  # type: ignore[override]
        m = hidden.shape[0]
        logp = torch.empty(m, dtype=torch.float32, device=hidden.device)
        mean = torch.empty_like(logp)
        entropy = torch.empty_like(logp)
        w = weight.to(dtype)  # one cast of the (V, H) weight per call
        for s in range(0, m, chunk):
            z = _chunk_logits(hidden[s : s + chunk], w, bias, transform)
            lse = torch.logsumexp(z, dim=-1)
            logp[s : s + chunk] = z.gather(1, targets[s : s + chunk, None]).squeeze(1) - lse
            mean[s : s + chunk] = z.mean(-1)
            # H = lse - sum_v p_v z_v  (nats), from the same chunk.
            entropy[s : s + chunk] = lse - (torch.softmax(z, -1) * z).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk, ctx.transform, ctx.dtype = chunk, transform, dtype
        ctx.mark_non_differentiable(mean, entropy)
        return logp, mean, entropy

    @staticmethod
    def backward(ctx, g_logp, _g_mean, _g_entropy):  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        t, dtype, chunk = ctx.transform, ctx.dtype, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        w = weight.to(dtype)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk].to(dtype)
            z = _chunk_logits(h, w, bias, t)
            # d logp / d z = onehot(target) - softmax(z), times the incoming gradient per row.
            dz = -torch.softmax(z, -1)
            dz.scatter_add_(1, targets[s : s + chunk, None], torch.ones_like(dz[:, :1]))
            dz *= g_logp[s : s + chunk, None].float()
            if t.softcap is not None:
                dz *= 1.0 - (z / t.softcap) ** 2  # z is already capped: tanh' = 1 - tanh^2
            if t.scale != 1.0:
                dz *= t.scale
            if grad_b is not None:
                grad_b += dz.sum(0)
            dz_c = dz.to(dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = (dz_c @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (dz_c.t() @ h).float()
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None, None


def head_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    transform: HeadTransform = HeadTransform(),
) -> tuple[Tensor, Tensor, Tensor]:
    """Token log-probs of ``targets`` under the LM head, ``chunk_tokens`` rows at a time.

    Shapes: ``hidden (M, H)`` (the positions to score), ``weight (V, H)``, ``bias (V,)``,
    ``targets (M,)`` long. Returns three ``(M,)`` float32 tensors:

    - ``logp[m] = z[m, targets[m]] - logsumexp_v z[m, v]``, differentiable in hidden, weight, bias;
    - ``mean[m] = (1/V) sum_v z[m, v]`` (TRL's ``logits/*``), no gradient;
    - ``entropy[m] = logsumexp_v z[m, v] - sum_v softmax(z[m])_v z[m, v]`` (nats), no gradient;

    where ``z = transform(hidden @ weight.T + bias)`` in float32. The matmul runs in autocast's
    dtype when autocast is on, else the weight's.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device_type = hidden.device.type
    if not torch.amp.is_autocast_available(device_type):
        return _ChunkedHeadLogps.apply(hidden, weight, bias, targets.long(), chunk_tokens, transform, weight.dtype)
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    # Autocast must not touch the float32 math inside; the matmul dtype is chosen above.
    with torch.autocast(device_type, enabled=False):
        return _ChunkedHeadLogps.apply(hidden, weight, bias, targets.long(), chunk_tokens, transform, dtype)


# --------------------------------------------------------------------------------------------
# Layouts: which positions are scored, padded or packed
# --------------------------------------------------------------------------------------------


def _scored(rows: list[tuple[int, int, int]]) -> tuple[list[int], list[int]]:
    """Flat indices of the positions whose next token is a completion token, and their sequence
    ids. ``rows`` holds ``(start, prompt_len, total_len)`` of each sequence in the flat layout; the
    position ``start + t`` predicts token ``t + 1``, scored when ``t + 1 >= prompt_len``."""
    index: list[int] = []
    segment: list[int] = []
    for seq, (start, p, total) in enumerate(rows):
        first = start + max(p, 1) - 1  # position 0 predicts nothing: a completion token at 0 is not scored
        index.extend(range(first, start + total - 1))
        segment.extend([seq] * (start + total - 1 - first))
    return index, segment


def _finish(input_ids, position_ids, attention_mask, index, segment, n, bounds=None) -> Layout:
    flat = input_ids.reshape(-1)
    idx = torch.as_tensor(index, dtype=torch.long)
    out = {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "score_index": idx,
        "targets": flat[idx + 1],
        "segment": torch.as_tensor(segment, dtype=torch.long),
        "num_sequences": torch.tensor(n),
    }
    if attention_mask is not None:
        out["attention_mask"] = attention_mask
    if bounds is not None:
        out["bounds"] = PackedBounds(tuple(bounds))  # host ints: the scorer never reads them from the device
    return out


def collate(
    prompts: list[np.ndarray] | list[list[int]],
    completions: list[np.ndarray] | list[list[int]],
    pad_id: int,
    *,
    left_pad: bool = False,
) -> Layout:
    """Pad ``prompt + completion`` sequences into ``(N, T)`` rows.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (N, T) long (position ids count
    real tokens only, so left padding gives the same logits as right padding), and the scoring
    layout: ``score_index (M,)`` flat positions in ``N x T`` whose next token is scored,
    ``targets (M,)`` those tokens, ``segment (M,)`` their sequence, ``num_sequences``.
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    rows = []
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        start = width - len(s) if left_pad else 0
        input_ids[i, start : start + len(s)] = torch.as_tensor(s, dtype=torch.long)
        attention[i, start : start + len(s)] = 1
        positions[i, start : start + len(s)] = torch.arange(len(s))
        rows.append((i * width + start, len(p), len(s)))
    index, segment = _scored(rows)
    return _finish(input_ids, positions, attention, index, segment, n)


def pack_rows(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Sequence indices per row: first-fit decreasing into rows of at most ``max_tokens`` tokens
    (one row when None); a sequence longer than ``max_tokens`` gets a row of its own."""
    if max_tokens is None:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(max_tokens - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows


def pack(prompts: list, completions: list, pad_id: int = 0, max_tokens: int | None = None) -> Layout:
    """``prompt + completion`` sequences packed into rows of at most ``max_tokens`` tokens (one row
    when None), without padding between sequences.

    Position ids restart at 0 for each sequence; there is no attention mask. ``bounds`` (a
    :class:`~raydpo.attention.PackedBounds`, host ints, flash-attention's ``cu_seq_lens``) gives the
    sequence boundaries to :mod:`raydpo.attention`: flash-attention's varlen kernel or one causal
    SDPA per sequence, neither computing cross-sequence scores; an eager model gets transformers'
    block-diagonal causal mask, read from the restarting position ids. Rows shorter than the longest
    end in padding that is its own run of positions (a sequence nobody scores). ``max_tokens``
    bounds a row (for an eager model, its O(row^2) mask). Same scoring layout as :func:`collate`.
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    rows = pack_rows([len(s) for s in seqs], max_tokens)
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    starts = [(0, 0, 0)] * len(seqs)
    cu = [0]  # run boundaries over the flattened rows (flash-attention's cu_seq_lens), pad runs included
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            input_ids[r, at : at + n] = torch.as_tensor(seqs[i], dtype=torch.long)
            positions[r, at : at + n] = torch.arange(n)
            starts[i] = (r * width + at, len(prompts[i]), n)
            at += n
            cu.append(r * width + at)
        positions[r, at:] = torch.arange(width - at)
        if at < width:
            cu.append((r + 1) * width)
    index, segment = _scored(starts)
    return _finish(input_ids, positions, None, index, segment, len(seqs), cu)


def pair_batch(
    prompt_ids: list, chosen_ids: list, rejected_ids: list, pad_id: int, *, packed: bool = False,
    max_tokens: int | None = None,
) -> Layout:
    """Chosen sequences then rejected sequences, so one forward serves both: sequence ``i`` is
    pair i's chosen, ``B + i`` its rejected. Padded (:func:`collate`), or ``packed`` into rows of at
    most ``max_tokens`` (:func:`pack`)."""
    prompts, completions = list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids)
    return pack(prompts, completions, pad_id, max_tokens) if packed else collate(prompts, completions, pad_id)


# --------------------------------------------------------------------------------------------
# The model wrapper every forward goes through
# --------------------------------------------------------------------------------------------


class Scores(NamedTuple):
    """Per-sequence sums over completion tokens, all ``(N,)`` float32.

    ``logps`` is differentiable; ``tokens`` counts the scored tokens, ``logit_sums`` sums the mean
    logit over the vocabulary per token, ``entropy_sums`` the entropy per token (nats). A named
    tuple, not a dataclass: DeepSpeed ZeRO-3 hooks a module's backward through the tensors of its
    output, and it sees into tuples, lists and dicts only."""

    logps: Tensor
    tokens: Tensor
    logit_sums: Tensor
    entropy_sums: Tensor


def _head_transform(config) -> HeadTransform:
    scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(config, "logits_scaling", None):  # Granite divides
        scale /= float(config.logits_scaling)
    return HeadTransform(scale=scale, softcap=getattr(config, "final_logit_softcapping", None) or None)


def _compute_dtype(device: torch.device, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a forward's matmuls run in: autocast's when it is on for ``device``, else the weights'."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight_dtype


class PolicyScorer(torch.nn.Module):
    """A causal LM (Hugging Face, optionally PEFT-wrapped) that returns :class:`Scores` instead of
    logits: the decoder runs on the layout, the head only on the scored positions, chunked.

    It is the module the engines wrap (DDP, DeepSpeed), so the head runs inside a module's forward:
    under ZeRO-3, :meth:`register_zero3` tells DeepSpeed to gather the (partitioned) head weight
    around this forward. ``lm`` is the wrapped model; state dict keys carry the ``lm.`` prefix.
    """

    def __init__(self, lm: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # PEFT keeps the HF model inside
        head = base.get_output_embeddings()
        if type(head) is not torch.nn.Linear:
            # A LoRA-wrapped or quantized head has more than weight @ h; calling only its weight would be wrong.
            raise ValueError(f"the output head must be a plain torch.nn.Linear to be chunked, got {type(head).__name__} "
                             "(leave lm_head out of LoRA target_modules)")
        # Plain attributes, not submodules: both already live under ``lm`` (state dict, DDP, ZeRO).
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_decoder", base.get_decoder())
        object.__setattr__(self, "_head", head)
        self.transform = _head_transform(base.config)

    def register_zero3(self) -> None:
        """Under DeepSpeed ZeRO-3: the head weight is used outside ``lm_head.forward``, so ask
        DeepSpeed to gather it whenever this module runs (forward and backward)."""
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        register_external_parameter(self, self._head.weight)
        if self._head.bias is not None:
            register_external_parameter(self, self._head.bias)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        score_index: Tensor,
        targets: Tensor,
        segment: Tensor,
        num_sequences: Tensor | int,
        attention_mask: Tensor | None = None,
        bounds: PackedBounds | None = None,
    ) -> Scores:
        device = input_ids.device
        # The attention for this device and compute dtype (flash varlen on CUDA where installed, else
        # raydpo_varlen; eager stays eager), then the packed rows' boundaries in the form it takes.
        implementation = attention.use(self._base, device, _compute_dtype(device, self._head.weight.dtype))
        with attention.packed(implementation, bounds, device) as varlen:
            hidden = self._decoder(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **varlen
            ).last_hidden_state
        scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, score_index)
        logp, mean, entropy = head_logps(scored, self._head.weight, targets, bias=self._head.bias,
                                         chunk_tokens=self.chunk_tokens, transform=self.transform)
        n = int(num_sequences)

        def per_seq(x: Tensor) -> Tensor:
            return torch.zeros(n, dtype=torch.float32, device=x.device).index_add(0, segment, x)

        return Scores(per_seq(logp), per_seq(torch.ones_like(mean)), per_seq(mean), per_seq(entropy))


def scorer_of(model: torch.nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.nn.Module:
    """``model`` itself when it already returns :class:`Scores` (a scorer, or an engine wrapping
    one), else a :class:`PolicyScorer` around it."""
    inner = getattr(model, "module", model)  # DDP and DeepSpeed keep the wrapped module here
    return model if isinstance(inner, PolicyScorer) else PolicyScorer(model, chunk_tokens)


def to_device(layout: Layout, device: torch.device | str) -> Layout:
    """The layout's tensors on ``device``; ``num_sequences`` and a packed layout's ``bounds`` stay on
    the host. To CUDA each tensor is pinned (page-locked) first and copied with ``non_blocking``: a
    DMA the GPU runs in stream order while the host goes on (the caching host allocator keeps a
    pinned block until the copies that read it are done, so the host tensors may be dropped at
    once). Elsewhere a plain copy: pinned memory exists only with CUDA."""
    device = torch.device(device)
    cuda = device.type == "cuda"

    def move(v: Tensor) -> Tensor:
        return v.pin_memory().to(device, non_blocking=True) if cuda else v.to(device)

    return {k: (move(v) if isinstance(v, Tensor) and k != "num_sequences" else v) for k, v in layout.items()}


@torch.no_grad()
def packed_logps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    batch_tokens: int,
    device: torch.device | str = "cpu",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[np.ndarray, int]:
    """Summed completion log-probs of N sequences, ``(N,)`` float32 in input order, and the tokens
    forwarded, in the trainer's packed layout: first-fit decreasing into rows of at most
    ``batch_tokens`` tokens (a longer sequence gets a row of its own), one row per forward, through
    the same chunked head as training. What the reference actors run.

    Packed attention never crosses a sequence and computes each one on its own, so a sequence's
    log-prob does not depend on its row-mates: at the trainer's precision the reference gives the
    policy's step-0 values (bit for bit on CPU, tests/test_precision.py). Padded windows did not:
    their attention runs at the window's width, with a mask, and under bf16 that moved a SmolLM2
    sequence's log-prob by up to ~0.5 nats, as much as the precision gap itself."""
    scorer = scorer_of(model, chunk_tokens)
    out = np.zeros(len(prompts), dtype=np.float32)
    forwarded = 0
    for row in pack_rows([len(p) + len(c) for p, c in zip(prompts, completions)], batch_tokens):
        layout = pack([prompts[i] for i in row], [completions[i] for i in row], pad_id)
        out[row] = scorer(**to_device(layout, device)).logps.float().cpu().numpy()
        forwarded += layout["input_ids"].numel()
    return out, forwarded


def model_sequence_logps(model: torch.nn.Module, layout: Layout) -> Tensor:
    """Summed completion log-probs ``(N,)`` of a :func:`collate` / :func:`pack` layout."""
    return scorer_of(model)(**layout).logps

