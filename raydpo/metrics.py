"""Metric names (TRL's) and their reduction over the global batch.

Each step produces a vector of sums over the pairs (and tokens) it saw; workers all-reduce the
vector by summing, and :func:`reduce_sums` divides by the global counts. So every metric is a mean
over the global batch, never rank 0's shard.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Order of the sums vector. Pair-level sums are divided by "pairs", token-level by "tokens".
SUM_FIELDS = (
    "pairs",
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "nll_loss",
    "logits/chosen",  # summed over completion tokens of the mean logit over the vocabulary
    "logits/rejected",
    "chosen_tokens",
    "rejected_tokens",
    "entropy",  # policy entropy (nats), summed over all completion tokens of chosen and rejected
)


def reduce_sums(sums: Tensor, prefix: str = "") -> dict[str, float]:
    """Global sums ``(len(SUM_FIELDS),)`` -> TRL-named means, with ``prefix`` (e.g. ``eval_``)."""
    s = dict(zip(SUM_FIELDS, sums.double().tolist()))
    pairs = max(s["pairs"], 1.0)
    out = {
        "loss": s["loss"] / pairs,
        "rewards/chosen": s["rewards/chosen"] / pairs,
        "rewards/rejected": s["rewards/rejected"] / pairs,
        "rewards/margins": (s["rewards/chosen"] - s["rewards/rejected"]) / pairs,
        "rewards/accuracies": s["rewards/accuracies"] / pairs,
        "logps/chosen": s["logps/chosen"] / pairs,
        "logps/rejected": s["logps/rejected"] / pairs,
        "nll_loss": s["nll_loss"] / pairs,
        "logits/chosen": s["logits/chosen"] / max(s["chosen_tokens"], 1.0),
        "logits/rejected": s["logits/rejected"] / max(s["rejected_tokens"], 1.0),
        "num_tokens": s["chosen_tokens"] + s["rejected_tokens"],
        "entropy": s["entropy"] / max(s["chosen_tokens"] + s["rejected_tokens"], 1.0),
    }
    return {prefix + k: v for k, v in out.items()}


def all_reduce_sum(sums: Tensor) -> Tensor:
    """Sum over data-parallel workers (a no-op in a single process).

    ``sums`` must live on the training device: nccl (GPU workers) has no CPU tensors, gloo (CPU
    workers) no CUDA ones, and the training device is what each backend was set up with."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sums = sums.clone()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    return sums


def zeros(device: torch.device | str = "cpu") -> Tensor:
    """An empty sums vector on the training ``device`` (float64: sums of many float32 values)."""
    return torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=device)
