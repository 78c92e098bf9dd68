"""The chunked head under DeepSpeed ZeRO-3: the head weight is partitioned, so the scorer asks
DeepSpeed to gather it around its own forward (``register_zero3``). Log-probs and gradients equal
the unpartitioned float64 computation, for chunk sizes 1, a prime and longer than the sequence."""
from __future__ import annotations

import copy

import pytest
import torch

from raydpo.logprobs import PolicyScorer, collate, pack
from raydpo.models import build_tiny_model
from raydpo.train.engine import OptimConfig, build_engine

PROMPTS = [[4, 10, 11, 12, 13], [4, 14], [4, 15, 16, 17]]
COMPLETIONS = [[5, 30, 31, 2], [5, 32, 33, 34, 35, 36, 37, 2], [5, 38, 2]]
G_OUT = torch.tensor([0.7, -1.3, 2.0])


def _float64_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each sequence alone, full logits, float64 log-softmax; d(sum g_i logp_i)/d(params)."""
    model = copy.deepcopy(model)
    out = []
    for p, c in zip(PROMPTS, COMPLETIONS):
        ids = torch.tensor([p + c])
        lsm = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(lsm[t - 1, int(ids[0, t])] for t in range(len(p), ids.shape[1])))
    logps = torch.stack(out)
    (logps * G_OUT.double()).sum().backward()
    return logps.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("chunk,layout", [(1, "padded"), (7, "left_padded"), (10_000, "packed")])
def test_zero3_logps_and_gradients_equal_float64(chunk: int, layout: str) -> None:
    from deepspeed.utils import safe_get_full_grad

    model = build_tiny_model(60, hidden_size=64, num_layers=2, num_heads=2, seed=0)  # tied head
    want_logps, want_grads = _float64_grads(model)
    scorer = PolicyScorer(model, chunk)
    engine = build_engine("deepspeed", scorer, OptimConfig(lr=0.0), grad_accum_steps=1, micro_batch_size=3,
                          zero_stage=3)
    scorer.register_zero3()
    head = model.get_output_embeddings().weight
    assert head.ds_numel == 60 * 64 and head.numel() == 0  # partitioned: this rank holds no full copy

    batch = {"padded": collate(PROMPTS, COMPLETIONS, 0), "left_padded": collate(PROMPTS, COMPLETIONS, 0, left_pad=True),
             "packed": pack(PROMPTS, COMPLETIONS)}[layout]
    logps = engine.module(**batch).logps
    torch.testing.assert_close(logps.detach().double(), want_logps, rtol=1e-5, atol=1e-5)
    engine.backward((logps * G_OUT).sum())
    for name, param in model.named_parameters():
        torch.testing.assert_close(safe_get_full_grad(param).double(), want_grads[name].double(), rtol=1e-5, atol=1e-5)
