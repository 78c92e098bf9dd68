"""One micro-batch of DPO: forward chosen + rejected together, loss, and metric sums."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from raydpo.logprobs import model_sequence_logps, pair_batch
from raydpo.losses import LossParams, PairLogps, bco_batch_reward, combined_loss, rewards
from raydpo.metrics import SUM_FIELDS, all_reduce_sum


@dataclass(frozen=True)
class LossSpec:
    weights: dict[str, float]  # loss name -> weight; a single loss is {name: 1.0}
    params: LossParams
    reference_free: bool = False


@dataclass
class RunningMean:
    """Mean of the implicit rewards of every pair seen so far, over all workers: ``bco_pair``'s
    delta (TRL's ``RunningMoments``). Kept in checkpoints so a resumed run continues it."""

    mean: float = 0.0
    count: float = 0.0

    def update(self, batch_mean: Tensor, n: int) -> float:
        """Fold in one micro-batch per worker (a collective: every worker calls it)."""
        total = all_reduce_sum(torch.tensor([float(batch_mean) * n, float(n)], dtype=torch.float64))
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
) -> tuple[Tensor, Tensor]:
    """Loss (mean over the micro-batch, differentiable) and the metric sums ``(len(SUM_FIELDS),)``.

    ``batch`` holds ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and, unless reference-free,
    ``ref_chosen_logps`` / ``ref_rejected_logps``; B pairs give one forward of 2B sequences.
    ``bco`` (training only) carries ``bco_pair``'s running reward mean; without it delta is
    ``spec.params.bco_delta``.
    """
    n = len(batch["prompt_ids"])
    inputs = {k: v.to(device) for k, v in pair_batch(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], pad_id).items()}
    logps, logits = model_sequence_logps(module, inputs)
    mask = inputs["completion_mask"][:, 1:].float()  # (2B, T-1): positions whose next token is scored
    tokens = mask.sum(-1)
    if spec.reference_free:
        ref_c = ref_r = None
    else:
        # A copy: the batch's arrays may be read-only views of Arrow memory, which torch refuses to share.
        ref_c = torch.tensor(np.asarray(batch["ref_chosen_logps"], dtype=np.float32), device=device)
        ref_r = torch.tensor(np.asarray(batch["ref_rejected_logps"], dtype=np.float32), device=device)
    pair = PairLogps(logps[:n], logps[n:], ref_c, ref_r, tokens[:n], tokens[n:])
    params = spec.params
    if bco is not None and "bco_pair" in spec.weights:
        # TRL updates the running mean with this batch before computing its loss.
        params = replace(params, bco_delta=bco.update(bco_batch_reward(pair, params.beta), n))
    per_pair = combined_loss(pair, params, spec.weights)
    loss = per_pair.mean()

    with torch.no_grad():
        r_c, r_r = rewards(pair, spec.params.beta)
        mean_logit = logits[:, :-1].float().mean(-1)  # (2B, T-1)
        logit_sums = (mean_logit * mask).sum(-1)
        # Row by row: a (T, V) float32 softmax at a time, not (2B, T, V), bounds the memory.
        entropy = sum(
            ((-(lp.exp() * lp).sum(-1)) * m).sum()
            for lp, m in ((torch.log_softmax(logits[i, :-1].float(), -1), mask[i]) for i in range(2 * n))
        )
        values = {
            "pairs": float(n),
            "loss": per_pair.sum(),
            "rewards/chosen": r_c.sum(),
            "rewards/rejected": r_r.sum(),
            "rewards/accuracies": (r_c > r_r).float().sum(),
            "logps/chosen": pair.chosen.sum(),
            "logps/rejected": pair.rejected.sum(),
            "nll_loss": (-pair.chosen / pair.chosen_tokens.clamp(min=1)).sum(),
            "logits/chosen": logit_sums[:n].sum(),
            "logits/rejected": logit_sums[n:].sum(),
            "chosen_tokens": tokens[:n].sum(),
            "rejected_tokens": tokens[n:].sum(),
            "entropy": entropy,
        }
        sums = torch.tensor([float(values[k]) for k in SUM_FIELDS], dtype=torch.float64)
    return loss, sums
