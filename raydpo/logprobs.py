"""Per-sequence log-probs from logits.

A sequence log-prob is ``sum_t mask[t] * log p(ids[t] | ids[<t])`` over completion tokens only;
prompt and padding tokens never count. Computed in float32 whatever the logits' dtype, because
bf16/fp16 log-softmax loses the small differences DPO feeds on.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def sequence_logps(logits: Tensor, input_ids: Tensor, completion_mask: Tensor) -> Tensor:
    """Summed completion log-probs.

    Shapes: ``logits (N, T, V)``, ``input_ids (N, T)``, ``completion_mask (N, T)`` (1 where the
    token at that position is a completion token). Returns ``(N,)`` float32. The logit at
    position t predicts the token at t + 1, so position 0 is never scored.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(-1)


def collate(
    prompts: list[np.ndarray] | list[list[int]],
    completions: list[np.ndarray] | list[list[int]],
    pad_id: int,
    *,
    left_pad: bool = False,
) -> dict[str, Tensor]:
    """Pad ``prompt + completion`` sequences into a batch.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask``, ``position_ids`` (N, T) long.
    Position ids count real tokens only, so left padding gives the same logits as right padding.
    """
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    comp = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        start = width - len(s) if left_pad else 0
        end = start + len(s)
        input_ids[i, start:end] = torch.as_tensor(s, dtype=torch.long)
        attention[i, start:end] = 1
        comp[i, start + len(p) : end] = 1
        positions[i, start:end] = torch.arange(len(s))
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": comp, "position_ids": positions}


def pair_batch(prompt_ids: list, chosen_ids: list, rejected_ids: list, pad_id: int) -> dict[str, Tensor]:
    """Chosen rows then rejected rows in one batch of 2B, so one forward serves both."""
    return collate(list(prompt_ids) * 2, list(chosen_ids) + list(rejected_ids), pad_id)


def model_sequence_logps(model: torch.nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Forward ``model`` on a collated batch; returns ``(logps (N,), logits (N, T, V))``."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return sequence_logps(out.logits, batch["input_ids"], batch["completion_mask"]), out.logits


def length_batches(lengths: list[int], batch_tokens: int, max_padding: float = 1.05) -> list[list[int]]:
    """Indices into ``lengths``, longest first, cut into batches of at most ``batch_tokens`` padded
    tokens (rows x the batch's longest) and at most ``max_padding`` padded tokens per real token;
    a sequence longer than the budget is a batch of its own.

    Sorting first keeps each batch's lengths close; the padding cap closes a batch where the next
    (shorter) sequence would make it waste more than ``max_padding - 1`` of its compute, so the
    whole input never computes more than ``max_padding`` x its real tokens.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    real = 0  # real tokens of the open batch
    for i in order:
        if batches:
            rows, longest = len(batches[-1]) + 1, lengths[batches[-1][0]]  # the first row is the longest
            if rows * longest <= batch_tokens and rows * longest <= max_padding * (real + lengths[i]):
                batches[-1].append(i)
                real += lengths[i]
                continue
        batches.append([i])
        real = lengths[i]
    return batches


@torch.no_grad()
def budgeted_logps(
    model: torch.nn.Module,
    prompts: list[list[int]],
    completions: list[list[int]],
    pad_id: int,
    batch_tokens: int,
    device: torch.device | str = "cpu",
    max_padding: float = 1.05,
) -> tuple[np.ndarray, int]:
    """Summed completion log-probs of N sequences, forwarded in length-sorted batches under a token
    budget and a padding cap (``length_batches``). Returns ``(logps (N,) float32 in input order,
    padded tokens forwarded)``."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    out = np.zeros(len(lengths), dtype=np.float32)
    padded = 0
    for idx in length_batches(lengths, batch_tokens, max_padding):
        batch = collate([prompts[i] for i in idx], [completions[i] for i in idx], pad_id)
        logps, _ = model_sequence_logps(model, {k: v.to(device) for k, v in batch.items()})
        out[idx] = logps.float().cpu().numpy()
        padded += batch["input_ids"].numel()
    return out, padded
