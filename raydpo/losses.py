"""Preference losses: one pure function per loss, chosen once from ``LOSSES``.

Every loss takes a :class:`PairLogps` (all fields shape ``(B,)``) and a :class:`LossParams`
and returns the per-pair loss, shape ``(B,)``; the caller takes the mean. Sequence log-probs are
sums over completion tokens (see ``raydpo.logprobs``), in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs of a batch of pairs. Shape: every tensor is ``(B,)``."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor | None  # None for a reference-free loss
    ref_rejected: Tensor | None
    chosen_tokens: Tensor  # completion token counts, >= 1
    rejected_tokens: Tensor


@dataclass(frozen=True)
class LossParams:
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO epsilon: probability that a label is flipped


LossFn = Callable[[PairLogps, LossParams], Tensor]


def _ref_or_zero(ref: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if ref is None else ref


def logratios(logps: PairLogps) -> tuple[Tensor, Tensor]:
    """Implicit-reward log-ratios ``log pi(y|x) - log pi_ref(y|x)`` for chosen and rejected, ``(B,)``.

    A reference-free batch (``ref_* is None``) uses a reference of log-prob 0.
    """
    return (
        logps.chosen - _ref_or_zero(logps.ref_chosen, logps.chosen),
        logps.rejected - _ref_or_zero(logps.ref_rejected, logps.rejected),
    )


def sigmoid(logps: PairLogps, params: LossParams) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), with cDPO label smoothing eps (Mitchell 2023).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)

    Shapes: every input ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    h = params.beta * (chosen - rejected)
    eps = params.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
}


def combined_loss(logps: PairLogps, params: LossParams, weights: dict[str, float]) -> Tensor:
    """Weighted sum of registered losses, ``(B,)``: ``sum_k w_k * LOSSES[k](logps, params)``."""
    return sum(w * LOSSES[name](logps, params) for name, w in weights.items())  # type: ignore[return-value]
