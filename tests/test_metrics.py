"""Tests of ``raydpo.metrics`` (sums vector -> TRL-named global means) and of the sums that
``raydpo.train.step.pair_forward`` produces for it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydpo.losses import LossParams
from raydpo.metrics import SUM_FIELDS, all_reduce_sum, reduce_sums, zeros
from raydpo.models import build_tiny_model, build_tiny_tokenizer
from raydpo.train.step import LossSpec, pair_forward


def vec(**values: float) -> torch.Tensor:
    assert set(values) == set(SUM_FIELDS)
    return torch.tensor([values[k] for k in SUM_FIELDS], dtype=torch.float64)


# Two data-parallel workers' sums (field names with "/" spelled via a dict).
RANK0 = vec(**{
    "pairs": 2, "loss": 1.0, "rewards/chosen": 0.6, "rewards/rejected": -0.2, "rewards/accuracies": 2,
    "logps/chosen": -10, "logps/rejected": -14, "nll_loss": 5.0, "logits/chosen": 3.0, "logits/rejected": 1.0,
    "chosen_tokens": 6, "rejected_tokens": 4, "entropy": 5.0,
})
RANK1 = vec(**{
    "pairs": 1, "loss": 2.0, "rewards/chosen": -0.3, "rewards/rejected": 0.4, "rewards/accuracies": 0,
    "logps/chosen": -8, "logps/rejected": -4, "nll_loss": 4.0, "logits/chosen": -1.5, "logits/rejected": 2.0,
    "chosen_tokens": 3, "rejected_tokens": 2, "entropy": 1.0,
})


def test_reduce_sums_is_the_global_mean_not_rank0s() -> None:
    """All-reduce (sum) of the two workers, then divide by the global counts:

        pairs = 2 + 1 = 3
        loss             = (1.0 + 2.0) / 3          = 1.0        (rank 0 alone: 0.5)
        rewards/chosen   = (0.6 - 0.3) / 3          = 0.1        (rank 0 alone: 0.3)
        rewards/rejected = (-0.2 + 0.4) / 3         = 0.0666667
        rewards/margins  = (0.3 - 0.2) / 3          = 0.0333333  = chosen mean - rejected mean
        rewards/accuracies = (2 + 0) / 3            = 0.6666667  (rank 0 alone: 1.0)
        logps/chosen     = (-10 - 8) / 3            = -6
        logps/rejected   = (-14 - 4) / 3            = -6
        nll_loss         = (5 + 4) / 3              = 3
        logits/chosen    = (3.0 - 1.5) / (6 + 3 tokens) = 0.1666667  (per token, not per pair)
        logits/rejected  = (1.0 + 2.0) / (4 + 2 tokens) = 0.5
        num_tokens       = 9 + 6                    = 15
        entropy          = (5.0 + 1.0) / 15 tokens  = 0.4        (per token)
    """
    got = reduce_sums(RANK0 + RANK1)
    want = {
        "loss": 1.0,
        "rewards/chosen": 0.1,
        "rewards/rejected": 0.2 / 3,
        "rewards/margins": 0.1 / 3,
        "rewards/accuracies": 2 / 3,
        "logps/chosen": -6.0,
        "logps/rejected": -6.0,
        "nll_loss": 3.0,
        "logits/chosen": 1.5 / 9,
        "logits/rejected": 0.5,
        "num_tokens": 15.0,
        "entropy": 0.4,
    }
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
    assert got["rewards/margins"] == pytest.approx(got["rewards/chosen"] - got["rewards/rejected"])
    rank0 = reduce_sums(RANK0)
    assert rank0["loss"] == pytest.approx(0.5) and rank0["rewards/accuracies"] == pytest.approx(1.0)
    assert rank0["loss"] != pytest.approx(got["loss"])


def test_reduce_sums_eval_prefix() -> None:
    plain = reduce_sums(RANK0 + RANK1)
    ev = reduce_sums(RANK0 + RANK1, prefix="eval_")
    assert set(ev) == {"eval_" + k for k in plain}
    assert all(ev["eval_" + k] == v for k, v in plain.items())


def test_reduce_sums_of_nothing_is_zero_not_nan() -> None:
    out = reduce_sums(zeros())
    assert all(v == 0.0 for v in out.values())
    assert zeros().shape == (len(SUM_FIELDS),) and zeros().dtype == torch.float64


def test_all_reduce_sum_single_process_is_identity() -> None:
    assert not torch.distributed.is_initialized()
    torch.testing.assert_close(all_reduce_sum(RANK0), RANK0, rtol=0, atol=0)


# --- pair_forward on the tiny model -----------------------------------------------------------

PAD = 0
PROMPTS = [[4, 10, 11, 12, 2, 5], [4, 13, 2, 5], [4, 14, 15, 2, 5]]
CHOSEN = [[20, 21, 2], [22, 23, 24, 25, 2], [26, 2]]
REJECTED = [[30, 2], [31, 32, 2], [33, 34, 35, 36, 37, 2]]
BETA = 0.5


def logps_alone_f64(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> tuple[float, float, int]:
    """Unpadded forward of one sequence; sum over completion tokens of the float64 log-softmax.
    Also the sum over the same positions of the mean logit (for ``logits/*``) and the token count."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = mean_logit = 0.0
    for t in range(len(prompt), len(prompt) + len(completion)):
        logp += float(torch.log_softmax(logits[t - 1], -1)[ids[0, t]])
        mean_logit += float(logits[t - 1].mean())
    return logp, mean_logit, len(completion)


def entropy_alone_f64(model: torch.nn.Module, prompt: list[int], completion: list[int]) -> float:
    """Sum over completion positions of -sum_v p log p, float64, one unpadded sequence."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(completion)):
        p = torch.softmax(logits[t - 1], -1)
        total += float(-(p * p.log()).sum())
    return total


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    vocab = len(build_tiny_tokenizer())
    policy = build_tiny_model(vocab, hidden_size=32, num_layers=2, num_heads=4, seed=0).eval()
    ref = build_tiny_model(vocab, hidden_size=32, num_layers=2, num_heads=4, seed=1).eval()
    return policy, ref


def test_pair_forward_loss_and_sums(models) -> None:
    """Sums from one padded forward of 2B rows equal per-sequence float64 numbers:

        r_w = beta * (log pi(y_w) - ref_w),  r_l = beta * (log pi(y_l) - ref_l)
        loss_i = -logsigmoid(r_w - r_l)     (sigmoid DPO)
        sums["loss"] / sums["pairs"] == the returned (mean) loss
    """
    policy, ref = models
    pol_c = [logps_alone_f64(policy, p, c) for p, c in zip(PROMPTS, CHOSEN)]
    pol_r = [logps_alone_f64(policy, p, r) for p, r in zip(PROMPTS, REJECTED)]
    ref_c = np.array([logps_alone_f64(ref, p, c)[0] for p, c in zip(PROMPTS, CHOSEN)], dtype=np.float32)
    ref_r = np.array([logps_alone_f64(ref, p, r)[0] for p, r in zip(PROMPTS, REJECTED)], dtype=np.float32)
    batch = {
        "prompt_ids": [np.array(p, dtype=np.int32) for p in PROMPTS],
        "chosen_ids": [np.array(c, dtype=np.int32) for c in CHOSEN],
        "rejected_ids": [np.array(r, dtype=np.int32) for r in REJECTED],
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    spec = LossSpec(weights={"sigmoid": 1.0}, params=LossParams(beta=BETA))
    loss, sums = pair_forward(policy, batch, spec, PAD, torch.device("cpu"))

    assert loss.requires_grad and loss.shape == ()
    assert sums.dtype == torch.float64 and sums.shape == (len(SUM_FIELDS),)
    s = dict(zip(SUM_FIELDS, sums.tolist()))
    assert s["pairs"] == 3
    assert s["loss"] / s["pairs"] == pytest.approx(loss.item(), rel=1e-6)

    r_w = [BETA * (pc[0] - float(rc)) for pc, rc in zip(pol_c, ref_c)]
    r_l = [BETA * (pr[0] - float(rr)) for pr, rr in zip(pol_r, ref_r)]
    losses = [math.log1p(math.exp(-(w - l))) for w, l in zip(r_w, r_l)]
    assert loss.item() == pytest.approx(sum(losses) / 3, rel=1e-5)
    assert s["rewards/chosen"] == pytest.approx(sum(r_w), rel=1e-5, abs=1e-5)
    assert s["rewards/rejected"] == pytest.approx(sum(r_l), rel=1e-5, abs=1e-5)
    assert s["rewards/accuracies"] == sum(w > l for w, l in zip(r_w, r_l))
    assert s["logps/chosen"] == pytest.approx(sum(x[0] for x in pol_c), rel=1e-5)
    assert s["logps/rejected"] == pytest.approx(sum(x[0] for x in pol_r), rel=1e-5)
    assert s["nll_loss"] == pytest.approx(sum(-x[0] / x[2] for x in pol_c), rel=1e-5)
    assert s["chosen_tokens"] == sum(len(c) for c in CHOSEN)
    assert s["rejected_tokens"] == sum(len(r) for r in REJECTED)
    assert s["logits/chosen"] == pytest.approx(sum(x[1] for x in pol_c), rel=1e-5, abs=1e-5)
    assert s["logits/rejected"] == pytest.approx(sum(x[1] for x in pol_r), rel=1e-5, abs=1e-5)

    want_entropy = sum(entropy_alone_f64(policy, p, c) for p, c in zip(PROMPTS * 2, CHOSEN + REJECTED))
    assert s["entropy"] == pytest.approx(want_entropy, rel=1e-5)

    m = reduce_sums(sums)
    assert m["rewards/margins"] == pytest.approx((sum(r_w) - sum(r_l)) / 3, rel=1e-5, abs=1e-5)
    assert m["loss"] == pytest.approx(loss.item(), rel=1e-6)


def test_pair_forward_reference_free_uses_zero_reference(models) -> None:
    """Reference-free: rewards are beta * log pi (a reference log-prob of 0); no ref columns needed."""
    policy, _ = models
    batch = {
        "prompt_ids": [np.array(p, dtype=np.int32) for p in PROMPTS],
        "chosen_ids": [np.array(c, dtype=np.int32) for c in CHOSEN],
        "rejected_ids": [np.array(r, dtype=np.int32) for r in REJECTED],
    }
    spec = LossSpec(weights={"sigmoid": 1.0}, params=LossParams(beta=BETA), reference_free=True)
    loss, sums = pair_forward(policy, batch, spec, PAD, torch.device("cpu"))
    s = dict(zip(SUM_FIELDS, sums.tolist()))
    pol_c = sum(logps_alone_f64(policy, p, c)[0] for p, c in zip(PROMPTS, CHOSEN))
    assert s["rewards/chosen"] == pytest.approx(BETA * pol_c, rel=1e-5)
    assert s["loss"] / 3 == pytest.approx(loss.item(), rel=1e-6)
