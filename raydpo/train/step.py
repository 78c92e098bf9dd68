"""One optimizer step of DPO: per micro-batch, forward chosen + rejected together, loss and metric
sums; then backward, the update, and the metrics reduced over every worker.

Every tensor a collective sees lives on the training device (``engine.device``): nccl has no CPU
tensors. Nothing here imports Ray, so the step runs and is measured without a cluster.

A micro-batch is laid out on the host and copied to a CUDA device from pinned (page-locked) memory
without blocking (:func:`raydpo.logprobs.to_device`): the copy is a DMA the GPU runs in stream
order, so the host goes on to the next Python work instead of waiting for it.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from raydpo.config import LossConfig
from raydpo.logprobs import pair_batch, scorer_of, to_device
from raydpo.losses import LossParams, PairLogps, bco_batch_reward, combined_loss, rewards
from raydpo.metrics import SUM_FIELDS, all_reduce_sum, reduce_sums, zeros


@dataclass(frozen=True)
class LossSpec:
    weights: dict[str, float]  # loss name -> weight; a single loss is {name: 1.0}
    params: LossParams
    reference_free: bool = False

    @classmethod
    def from_config(cls, loss: LossConfig) -> LossSpec:
        return cls(loss.weight_map(), loss.params(), not loss.needs_reference())


@dataclass
class RunningMean:
    """Mean of the implicit rewards of every pair seen so far, over all workers: ``bco_pair``'s
    delta (the BCO paper's running reward mean; TRL 1.16 has none, see docs/losses.md). Kept in
    checkpoints so a resumed run continues it."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, batch_mean: Tensor, n: int) -> float:
        """Fold in one micro-batch per worker (a collective: every worker calls it). The sums
        travel on ``batch_mean``'s device, the training device, which nccl needs."""
        local = torch.stack([batch_mean.detach().double() * n, torch.tensor(float(n), dtype=torch.float64, device=batch_mean.device)])
        total = all_reduce_sum(local)
        s, k = total.tolist()
        self.count += k
        self.mean += (s - self.mean * k) / self.count
        return self.mean


def pair_forward(
    module: torch.nn.Module,
    batch: dict[str, np.ndarray],
    spec: LossSpec,
    pad_id: int,
    device: torch.device,
    bco: RunningMean | None = None,
    *,
    packed: bool = False,
    max_tokens: int | None = None,
    margins: list[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """Loss (mean over the micro-batch, differentiable) and the metric sums ``(len(SUM_FIELDS),)``
    float64 on ``device`` (ready for a collective on the training device).

    ``batch`` holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and, unless reference-free,
    ``ref_chosen_logps`` / ``ref_rejected_logps``; B pairs give one forward of 2B sequences, padded
    or ``packed`` into one row. ``module`` is a :class:`~raydpo.logprobs.PolicyScorer` (or an engine
    wrapping one; a plain causal LM gets wrapped). Packed rows hold at most ``max_tokens`` tokens. ``bco`` (training only) carries ``bco_pair``'s
    running reward mean; without it delta is ``spec.params.bco_delta``. ``margins``, when given,
    gets each pair's reward margin ``r_chosen - r_rejected`` (for the eval histogram).
    """
    n = len(batch["prompt_ids"])
    layout = pair_batch(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], pad_id, packed=packed,
                        max_tokens=max_tokens)
    scores = scorer_of(module)(**to_device(layout, device))
    logps, tokens = scores.logps, scores.tokens
    if spec.reference_free:
        ref_c = ref_r = None
    else:
        # A copy: the batch's arrays may be read-only views of Arrow memory, which torch refuses to share.
        ref_c = torch.tensor(np.asarray(batch["ref_chosen_logps"], dtype=np.float32), device=device)
        ref_r = torch.tensor(np.asarray(batch["ref_rejected_logps"], dtype=np.float32), device=device)
    pair = PairLogps(logps[:n], logps[n:], ref_c, ref_r, tokens[:n], tokens[n:])
    params = spec.params
    if bco is not None and "bco_pair" in spec.weights:
        # The running mean takes this batch in before its loss is computed (as TRL's RunningMoments did).
        params = replace(params, bco_delta=bco.update(bco_batch_reward(pair, params.beta), n))
    per_pair = combined_loss(pair, params, spec.weights)
    loss = per_pair.mean()

    with torch.no_grad():
        r_c, r_r = rewards(pair, spec.params.beta)
        if margins is not None:
            margins.extend((r_c - r_r).double().cpu().tolist())
        values = {
            "pairs": torch.tensor(float(n), device=device),
            "loss": per_pair.sum(),
            "rewards/chosen": r_c.sum(),
            "rewards/rejected": r_r.sum(),
            "rewards/accuracies": (r_c > r_r).float().sum(),
            "logps/chosen": pair.chosen.sum(),
            "logps/rejected": pair.rejected.sum(),
            "nll_loss": (-pair.chosen / pair.chosen_tokens.clamp(min=1)).sum(),
            # Mean logit over the vocabulary and entropy, summed over completion tokens: from the
            # head's own chunks, no second pass over the vocabulary.
            "logits/chosen": scores.logit_sums[:n].sum(),
            "logits/rejected": scores.logit_sums[n:].sum(),
            "chosen_tokens": tokens[:n].sum(),
            "rejected_tokens": tokens[n:].sum(),
            "entropy": scores.entropy_sums.sum(),
        }
        sums = torch.stack([values[k].double() for k in SUM_FIELDS])
    return loss, sums


def _autocast(engine):
    """The engine's forward precision context (bf16 autocast for DDP with ``train.bf16``)."""
    return engine.autocast() if hasattr(engine, "autocast") else nullcontext()


def train_step(
    engine,
    micro_batches: Iterable[dict[str, np.ndarray]],
    spec: LossSpec,
    pad_id: int,
    bco: RunningMean | None = None,
    *,
    packed: bool = False,
    max_tokens: int | None = None,
) -> dict[str, float]:
    """One optimizer update over ``engine.grad_accum_steps`` micro-batches of this worker; returns
    the global-batch metrics (TRL's names) with ``grad_norm`` and the next ``learning_rate``."""
    sums = zeros(engine.device)
    for micro in micro_batches:
        with _autocast(engine):
            loss, s = pair_forward(engine.module, micro, spec, pad_id, engine.device, bco, packed=packed,
                                   max_tokens=max_tokens)
        engine.backward(loss)
        sums += s
    grad_norm = engine.step()
    metrics = reduce_sums(all_reduce_sum(sums))
    return metrics | {"grad_norm": grad_norm, "learning_rate": engine.learning_rate()}


def evaluate(
    engine, batches: Iterable[dict[str, np.ndarray]], spec: LossSpec, pad_id: int, *, packed: bool = False,
    max_tokens: int | None = None,
    margins: list[float] | None = None,
) -> dict[str, float]:
    """``eval_``-prefixed metrics over this worker's eval batches, summed over every worker.
    ``margins``, when given, gets every eval pair's reward margin from every worker."""
    engine.module.eval()
    sums = zeros(engine.device)
    local: list[float] | None = [] if margins is not None else None
    with torch.no_grad():
        for batch in batches:
            with _autocast(engine):
                _, s = pair_forward(engine.module, batch, spec, pad_id, engine.device, packed=packed,
                                    max_tokens=max_tokens, margins=local)
            sums += s
    engine.module.train()
    if margins is not None:
        margins.extend(_gather_lists(local))
    return reduce_sums(all_reduce_sum(sums), prefix="eval_")


def _gather_lists(local: list[float]) -> list[float]:
    """Every worker's list, concatenated in rank order (a collective; pickled objects travel on
    the backend's device, which ``all_gather_object`` handles for nccl and gloo alike)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(local)
    parts: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [m for part in parts for m in (part or [])]
