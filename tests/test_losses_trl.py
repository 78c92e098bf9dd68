"""Parity of ``raydpo.losses`` with TRL 1.16.0, computed by TRL's own code (docs/losses.md).

No expected value here re-derives a TRL formula: TRL computes it. How TRL is called:

* DPO losses live inside ``DPOTrainer._compute_loss`` (1.16 has no separate ``dpo_loss``). It is
  called unbound on a stand-in ``self`` (:func:`_dpo_self`) that holds only what it reads:
  ``model.training`` (picks the "train" metrics), ``accelerator`` (``device``; ``gather`` and
  ``gather_for_metrics`` return their argument, as in one process), ``aux_loss_enabled=False``,
  ``precompute_ref_logps=True`` (reference log-probs come in the batch, no reference model),
  ``ld_alpha=None``, ``f_divergence_type="reverse_kl"``, ``loss_types``, ``loss_weights``,
  ``beta``, ``label_smoothing``, ``use_weighting=False``, ``args.discopop_tau``, ``_metrics``,
  ``_total_train_tokens``, ``_tp_size``. The batch comes from TRL's ``DataCollatorForPreference``.
  The model is either :class:`_GivenLogps` (TRL's ``FusedCausalLMOutput`` with per-token log-probs
  that sum to given sequence log-probs, so both sides see the same numbers, in float64), or the
  project's tiny Llama with TRL's ``add_fused_lm_head``, against our ``pair_forward`` on the same
  weights (loss, weight gradients, and the metrics TRL logs).
* SimPO: ``CPOTrainer.cpo_loss`` (trl.experimental.cpo); stand-in ``self``: ``alpha``, ``beta``,
  ``simpo_gamma``, ``label_smoothing``, ``loss_type``, ``accelerator``.
* ORPO: ``ORPOTrainer.odds_ratio_loss`` (trl.experimental.orpo); stand-in ``self``: ``beta``,
  ``accelerator``. Both take length-averaged log-probs, which the tests form as ``sum / tokens``.

Where we differ on purpose, the test names the difference and checks ours against its documented
formula, written out with ``math`` in float64.
"""
from __future__ import annotations

import math
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # before the trl.experimental imports

import trl  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_config import DPOConfig  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput, add_fused_lm_head  # noqa: E402

from raydpo.logprobs import model_sequence_logps, pair_batch  # noqa: E402
from raydpo.losses import LOSSES, LossParams, PairLogps, combined_loss, rewards  # noqa: E402
from raydpo.metrics import reduce_sums  # noqa: E402
from raydpo.models import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from raydpo.train.step import LossSpec, RunningMean, pair_forward  # noqa: E402

F64 = torch.float64
TRL_VERSION = "1.16.0"

# Our loss -> TRL 1.16 DPOTrainer loss_type computing the same loss, rewards and gradient.
SAME_AS_DPO_TRAINER = {
    "sigmoid": "sigmoid",  # at label_smoothing 0: TRL 1.16's sigmoid has no smoothing (see below)
    "robust": "robust",
    "ipo": "ipo",
    "hinge": "hinge",
    "bco_pair": "bco_pair",  # at bco_delta 0: TRL 1.16 has no running delta (see below)
    "nca_pair": "nca_pair",
    "apo_zero": "apo_zero",
    "apo_down": "apo_down",
    "exo_pair": "exo_pair",  # at label_smoothing > 0: TRL refuses 0 (see below)
    "aot": "aot",
    "aot_pair": "aot_unpaired",  # TRL renamed it; the formula is ours
    "discopop": "discopop",
    "sppo_hard": "sppo_hard",
}
SAME_AS_OTHER_TRAINER = {
    "simpo": "CPOTrainer (loss_type='simpo', cpo_alpha=0)",
    "orpo": "ORPOTrainer (the odds-ratio term)",
}
DIFFERS = {"sft": "per-pair length-averaged NLL; TRL's is token-weighted over the batch"}
NOT_IN_TRL = {"dpop": "DPO-Positive (Pal et al. 2024); no TRL trainer has it"}
TRL_ONLY = {"sigmoid_norm": "not implemented here"}

PARAMS = [
    LossParams(beta=0.1),
    LossParams(beta=0.5, label_smoothing=0.25, discopop_tau=0.5),
    LossParams(beta=2.0, label_smoothing=2.0**-10),  # smoothing exact in float32, as TRL holds it
]


# ---------------------------------------------------------------------------------------------
# Batches and the two sides
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Summed completion log-probs of pairs (float64) and their token counts."""

    chosen: list[float]
    rejected: list[float]
    ref_chosen: list[float]
    ref_rejected: list[float]
    chosen_tokens: list[int]
    rejected_tokens: list[int]

    def ours(self) -> PairLogps:
        """Our input, the policy log-probs as fresh leaves (``.grad`` is d loss / d logp)."""
        leaf = lambda xs: torch.tensor(xs, dtype=F64, requires_grad=True)  # noqa: E731
        return PairLogps(leaf(self.chosen), leaf(self.rejected), torch.tensor(self.ref_chosen, dtype=F64),
                         torch.tensor(self.ref_rejected, dtype=F64), torch.tensor(self.chosen_tokens),
                         torch.tensor(self.rejected_tokens))

    def trl_inputs(self) -> dict[str, torch.Tensor]:
        """TRL's collated batch: prompt + completion ids (ids are not read by ``_GivenLogps``).
        The collator stores the reference log-probs as float32; the float64 values go back in."""
        examples = [{"prompt_ids": [5] * (1 + i % 3), "chosen_ids": [6] * c, "rejected_ids": [7] * r}
                    for i, (c, r) in enumerate(zip(self.chosen_tokens, self.rejected_tokens))]
        inputs = DataCollatorForPreference(pad_token_id=0)(examples)
        inputs["ref_chosen_logps"] = torch.tensor(self.ref_chosen, dtype=F64)
        inputs["ref_rejected_logps"] = torch.tensor(self.ref_rejected, dtype=F64)
        return inputs


def random_batch(seed: int, n: int = 6) -> Batch:
    """n pairs: 1-12 completion tokens, -0.05 to -3 nats per token, reference within 2 nats."""
    g = random.Random(seed)
    ct, rt = [g.randint(1, 12) for _ in range(n)], [g.randint(1, 12) for _ in range(n)]
    c, r = [k * g.uniform(-3.0, -0.05) for k in ct], [k * g.uniform(-3.0, -0.05) for k in rt]
    return Batch(c, r, [x + g.uniform(-2.0, 2.0) for x in c], [x + g.uniform(-2.0, 2.0) for x in r], ct, rt)


def object_array(rows: list[list[int]]) -> np.ndarray:
    """A 1-D numpy object array of id arrays, as Ray Data hands a list column to ``pair_forward``."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r, dtype=np.int64) for r in rows]
    return out


class _Accelerator:
    """What TRL reads from ``self.accelerator``: one process, so a gather is the identity."""

    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _dpo_self(loss_types: list[str], weights: list[float], params: LossParams) -> SimpleNamespace:
    """A stand-in ``DPOTrainer`` holding only the attributes ``_compute_loss`` reads."""
    return SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=None,
        f_divergence_type="reverse_kl",
        loss_types=loss_types,
        loss_weights=weights,
        beta=params.beta,
        label_smoothing=params.label_smoothing,
        use_weighting=False,
        args=SimpleNamespace(discopop_tau=params.discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


class _GivenLogps:
    """Stands in for a model with TRL's fused head: each sequence's completion tokens (the labels
    that are not -100, shifted as TRL scores them) get ``logps[i] / count`` each, so TRL's sum over
    tokens is ``logps[i]``; entropy and mean logits are 0."""

    def __init__(self, logps: torch.Tensor) -> None:
        self.logps = logps

    def __call__(self, *, labels: torch.Tensor, **_) -> FusedCausalLMOutput:
        mask = (labels[:, 1:] != -100).to(self.logps.dtype)
        per_token = self.logps[:, None] * mask / mask.sum(1, keepdim=True)
        zeros = torch.zeros_like(mask)
        return FusedCausalLMOutput(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


@dataclass
class Result:
    loss: torch.Tensor  # the batch's loss (a scalar)
    grad_chosen: torch.Tensor  # d loss / d chosen log-prob, (B,)
    grad_rejected: torch.Tensor
    metrics: dict[str, float]


def trl_dpo(batch: Batch, weights: dict[str, float], params: LossParams) -> Result:
    """TRL's ``DPOTrainer._compute_loss`` on ``batch`` (``weights`` keyed by TRL loss_type)."""
    logps = torch.tensor(batch.chosen + batch.rejected, dtype=F64, requires_grad=True)
    trainer = _dpo_self(list(weights), list(weights.values()), params)
    loss = DPOTrainer._compute_loss(trainer, _GivenLogps(logps), batch.trl_inputs(), return_outputs=False)
    loss.backward()
    n = len(batch.chosen)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return Result(loss.detach(), logps.grad[:n], logps.grad[n:], metrics)


def ours(batch: Batch, weights: dict[str, float], params: LossParams) -> Result:
    """Our ``combined_loss``, mean over pairs (as ``pair_forward`` takes it)."""
    lp = batch.ours()
    loss = combined_loss(lp, params, weights).mean()
    loss.backward()
    grad_rejected = torch.zeros_like(lp.rejected) if lp.rejected.grad is None else lp.rejected.grad  # sft
    return Result(loss.detach(), lp.chosen.grad, grad_rejected, {})


def assert_same(got: Result, want: Result, tol: float = 1e-10) -> None:
    for field in ("loss", "grad_chosen", "grad_rejected"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=tol, atol=tol, msg=field)


# float64 formulas, for our documented differences (math module, element by element)
def m_logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def cdpo(z: float, eps: float) -> float:
    """cDPO: -(1 - eps) logsigmoid(z) - eps logsigmoid(-z)."""
    return -(1 - eps) * m_logsig(z) - eps * m_logsig(-z)


def close_to(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual.detach(), torch.tensor(expected, dtype=actual.dtype), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Which losses are compared with what
# ---------------------------------------------------------------------------------------------


def test_trl_is_the_version_the_docs_describe() -> None:
    """docs/losses.md and the tables above describe TRL 1.16.0; another version needs a re-read."""
    assert trl.__version__ == TRL_VERSION


def test_every_loss_is_classified_and_every_trl_loss_type_is_accounted_for() -> None:
    groups = [SAME_AS_DPO_TRAINER, SAME_AS_OTHER_TRAINER, DIFFERS, NOT_IN_TRL]
    assert sorted(n for g in groups for n in g) == sorted(LOSSES)
    # TRL's own list of DPO loss types, from DPOConfig's help text.
    trl_types = set(re.findall(r"`'(\w+)'`", DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]))
    assert trl_types == set(SAME_AS_DPO_TRAINER.values()) | set(DIFFERS) | set(TRL_ONLY)


# ---------------------------------------------------------------------------------------------
# Same as TRL's DPOTrainer: loss, gradient, rewards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAME_AS_DPO_TRAINER))
def test_same_as_trl_dpo_trainer(name: str) -> None:
    """Loss and d loss / d logp of every pair equal TRL's, on random batches for three settings."""
    for i, params in enumerate(PARAMS):
        if name == "sigmoid":
            params = replace(params, label_smoothing=0.0)
        if name == "exo_pair" and params.label_smoothing == 0.0:
            continue  # test_exo_pair_without_smoothing_uses_the_papers_1e_3
        batch = random_batch(seed=100 * i + len(name))
        # exo_pair: TRL takes log(eps) and log1p(-eps) of a float32 tensor, ~1e-8 from float64.
        tol = 1e-7 if name == "exo_pair" else 1e-10
        assert_same(ours(batch, {name: 1.0}, params), trl_dpo(batch, {SAME_AS_DPO_TRAINER[name]: 1.0}, params), tol)


def test_weighted_mix_same_as_trl_loss_weights() -> None:
    """TRL's MPO example, loss_type [sigmoid, bco_pair, sft] with loss_weights [0.8, 0.2, 1.0], equals
    ``combined_loss`` with the same weights. Every chosen completion has 4 tokens here: then our
    per-pair NLL equals TRL's token-weighted one (test_sft_is_per_pair_where_trl_weights_tokens)."""
    batch = replace(random_batch(seed=7), chosen_tokens=[4] * 6)
    weights = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
    assert_same(ours(batch, weights, LossParams(beta=0.3)), trl_dpo(batch, weights, LossParams(beta=0.3)))


def test_rewards_same_as_trl() -> None:
    """``rewards`` (beta * log-ratio, summed log-probs) gives TRL's ``rewards/*``, whatever the loss
    (TRL 1.16 reports the same rewards for ipo too)."""
    batch = random_batch(seed=3)
    for loss_type in ("sigmoid", "ipo"):
        trl_metrics = trl_dpo(batch, {loss_type: 1.0}, LossParams(beta=0.3)).metrics
        c, r = rewards(batch.ours(), 0.3)
        assert trl_metrics["rewards/chosen"] == pytest.approx(c.mean().item(), rel=1e-12)
        assert trl_metrics["rewards/rejected"] == pytest.approx(r.mean().item(), rel=1e-12)
        assert trl_metrics["rewards/accuracies"] == pytest.approx((c > r).double().mean().item())


# ---------------------------------------------------------------------------------------------
# Same as TRL's CPOTrainer (SimPO) and ORPOTrainer
# ---------------------------------------------------------------------------------------------


def _averaged(lp: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    """Length-averaged log-probs, TRL's ``average_log_prob=True`` input; differentiable in ours."""
    return lp.chosen / lp.chosen_tokens, lp.rejected / lp.rejected_tokens


@pytest.mark.parametrize("params", PARAMS, ids=["beta0.1", "beta0.5-eps", "beta2-eps"])
def test_simpo_same_as_trl_cpo_trainer(params: LossParams) -> None:
    """Per-pair loss and gradient equal ``CPOTrainer.cpo_loss`` with loss_type "simpo" (TRL divides
    gamma by beta and multiplies back: the margin is simpo_gamma in reward units, as ours).
    TRL's CPO adds ``cpo_alpha`` (default 1.0) times an NLL on top; pure SimPO is cpo_alpha = 0.
    Rewards differ (docs/losses.md, Metrics): TRL's are beta * the averaged log-prob, the training
    step's are ``rewards`` of the summed log-probs with reference 0, i.e. TRL's times the token count."""
    params = replace(params, simpo_gamma=0.7)
    cpo = SimpleNamespace(alpha=0.0, beta=params.beta, simpo_gamma=params.simpo_gamma,
                          label_smoothing=params.label_smoothing, loss_type="simpo", accelerator=_Accelerator())
    mine, theirs = random_batch(seed=11).ours(), random_batch(seed=11).ours()
    got = LOSSES["simpo"](mine, params)
    want, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(cpo, *_averaged(theirs))
    free = PairLogps(mine.chosen, mine.rejected, None, None, mine.chosen_tokens, mine.rejected_tokens)
    step_chosen, step_rejected = rewards(free, params.beta)
    torch.testing.assert_close(step_chosen, trl_chosen * mine.chosen_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step_rejected, trl_rejected * mine.rejected_tokens, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(mine.chosen.grad, theirs.chosen.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mine.rejected.grad, theirs.rejected.grad, rtol=1e-12, atol=1e-12)


def test_orpo_is_trl_odds_ratio_term_plus_per_pair_nll() -> None:
    """Ours: loss_i = -logp_w,i / |y_w,i| - lambda * logsigmoid(log_odds_i). The odds-ratio term is
    TRL's: ``ORPOTrainer.odds_ratio_loss`` returns ``losses = beta * logsigmoid(log_odds)`` (in
    float32; TRL's loss is ``nll - losses.mean()``). The NLL term is our documented difference: TRL's
    is the cross-entropy of prompt and chosen tokens, token-weighted over the batch; ours is the
    chosen completion's per pair, written out here in float64 (its gradient: -1 / |y_w|)."""
    params = LossParams(orpo_lambda=0.25)
    orpo = SimpleNamespace(beta=params.orpo_lambda, accelerator=_Accelerator())
    batch = random_batch(seed=12)
    mine, theirs = batch.ours(), batch.ours()
    got = LOSSES["orpo"](mine, params)
    losses, _, _, _, _ = ORPOTrainer.odds_ratio_loss(orpo, *_averaged(theirs))
    nll = torch.tensor([-c / n for c, n in zip(batch.chosen, batch.chosen_tokens)], dtype=F64)
    torch.testing.assert_close(got, nll - losses.double(), rtol=1e-5, atol=1e-6)
    got.sum().backward()
    (-losses).sum().backward()
    nll_grad = torch.tensor([-1.0 / n for n in batch.chosen_tokens], dtype=F64)
    torch.testing.assert_close(mine.chosen.grad, nll_grad + theirs.chosen.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.rejected.grad, theirs.rejected.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Documented differences: TRL's side shown by TRL, ours checked against its formula in float64
# ---------------------------------------------------------------------------------------------


def test_sigmoid_label_smoothing_is_cdpo_which_trl_dropped() -> None:
    """TRL 1.16's sigmoid ignores label_smoothing (only robust and exo_pair read it); ours keeps
    cDPO: loss = -(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)."""
    batch, p = random_batch(seed=21), LossParams(beta=0.5, label_smoothing=0.25)
    unsmoothed = replace(p, label_smoothing=0.0)
    assert trl_dpo(batch, {"sigmoid": 1.0}, p).loss == trl_dpo(batch, {"sigmoid": 1.0}, unsmoothed).loss
    rows = zip(batch.chosen, batch.rejected, batch.ref_chosen, batch.ref_rejected)
    h = [(c - rc) - (r - rr) for c, r, rc, rr in rows]
    close_to(LOSSES["sigmoid"](batch.ours(), p), [cdpo(0.5 * x, 0.25) for x in h])


def test_bco_pair_delta_is_ours_trl_has_none() -> None:
    """TRL 1.16's bco_pair is ``-logsigmoid(r_w) - logsigmoid(-r_l)``: delta 0 (test_same_as_trl_dpo_trainer).
    Ours takes delta (the BCO paper's running reward mean): -logsigmoid(r_w - d) - logsigmoid(-(r_l - d))."""
    batch, beta, d = random_batch(seed=22), 0.4, 0.3
    rw = [beta * (c - rc) for c, rc in zip(batch.chosen, batch.ref_chosen)]
    rl = [beta * (r - rr) for r, rr in zip(batch.rejected, batch.ref_rejected)]
    close_to(LOSSES["bco_pair"](batch.ours(), LossParams(beta=beta, bco_delta=d)),
             [-m_logsig(w - d) - m_logsig(-(x - d)) for w, x in zip(rw, rl)])


def test_bco_running_delta_in_the_training_step() -> None:
    """``pair_forward`` with a :class:`RunningMean` (mean 0.3 over 6 pairs so far) folds this batch in
    before its loss (the BCO paper's reward shift, a running mean of the rewards):
    delta = (0.3 * 6 + mean(r_w, r_l) * B) / (6 + B), B = 2 pairs; then
    loss = mean_i[-logsigmoid(r_w,i - delta) - logsigmoid(-(r_l,i - delta))], in float64 from the
    policy's log-probs (our scorer, under no_grad) and the batch's reference log-probs."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=1).eval()
    batch = {"prompt_ids": object_array([[4, 7, 8], [4, 9]]), "chosen_ids": object_array([[10, 2], [11, 12, 2]]),
             "rejected_ids": object_array([[13, 2], [14, 15, 16, 2]]),
             "ref_chosen_logps": np.array([-9.0, -12.0], dtype=np.float32),
             "ref_rejected_logps": np.array([-8.0, -10.0], dtype=np.float32)}
    beta, bco = 0.5, RunningMean(mean=0.3, count=6)
    with torch.no_grad():
        loss, _ = pair_forward(model, batch, LossSpec({"bco_pair": 1.0}, LossParams(beta=beta)),
                               tok.pad_token_id, torch.device("cpu"), bco)
        logps = model_sequence_logps(model, pair_batch(batch["prompt_ids"], batch["chosen_ids"],
                                                       batch["rejected_ids"], tok.pad_token_id)).double().tolist()
    rw = [beta * (logps[i] - float(batch["ref_chosen_logps"][i])) for i in range(2)]
    rl = [beta * (logps[2 + i] - float(batch["ref_rejected_logps"][i])) for i in range(2)]
    delta = (0.3 * 6 + (sum(rw) + sum(rl)) / 4 * 2) / 8
    assert bco.mean == pytest.approx(delta, rel=1e-6) and bco.count == 8
    expected = sum(-m_logsig(w - delta) - m_logsig(-(x - delta)) for w, x in zip(rw, rl)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_sft_is_per_pair_where_trl_weights_tokens() -> None:
    """TRL's sft is the NLL of every chosen token of the batch: sum(-logp_w) / sum(|y_w|), here
    (2 + 6 + 20) / (1 + 3 + 4) = 3.5. Ours is per pair, -logp_w / |y_w| = [2, 2, 5], mean 3.
    With equal lengths the two agree."""
    batch = Batch([-2.0, -6.0, -20.0], [-1.0, -1.0, -1.0], [-2.0, -6.0, -20.0], [-1.0] * 3, [1, 3, 4], [1, 1, 1])
    assert trl_dpo(batch, {"sft": 1.0}, LossParams()).loss.item() == pytest.approx(3.5, rel=1e-12)
    close_to(LOSSES["sft"](batch.ours(), LossParams()), [2.0, 2.0, 5.0])
    same = replace(batch, chosen_tokens=[4, 4, 4])
    assert_same(ours(same, {"sft": 1.0}, LossParams()), trl_dpo(same, {"sft": 1.0}, LossParams()))


def test_exo_pair_without_smoothing_uses_the_papers_1e_3() -> None:
    """TRL's exo_pair at label_smoothing 0 is log(0): infinite (its __init__ refuses 0). Ours uses
    the EXO paper's 1e-3 then, i.e. TRL at 1e-3 (up to TRL's float32 log(eps), ~1e-8)."""
    batch = random_batch(seed=24)
    assert math.isinf(trl_dpo(batch, {"exo_pair": 1.0}, LossParams(beta=0.5)).loss.item())
    assert_same(ours(batch, {"exo_pair": 1.0}, LossParams(beta=0.5)),
                trl_dpo(batch, {"exo_pair": 1.0}, LossParams(beta=0.5, label_smoothing=1e-3)), tol=1e-7)


def test_dpop_formula() -> None:
    """Not in TRL. Pal et al. 2024 eq. 3: -logsigmoid(beta (h - lambda relu(ref_w - logp_w)))."""
    batch, beta, lam = random_batch(seed=25), 0.3, 5.0
    expected = []
    for c, r, rc, rr in zip(batch.chosen, batch.rejected, batch.ref_chosen, batch.ref_rejected):
        expected.append(-m_logsig(beta * ((c - rc) - (r - rr) - lam * max(0.0, rc - c))))
    close_to(LOSSES["dpop"](batch.ours(), LossParams(beta=beta, dpop_lambda=lam)), expected)


# ---------------------------------------------------------------------------------------------
# End to end: TRL's _compute_loss with the tiny Llama against our pair_forward, same weights
# ---------------------------------------------------------------------------------------------

PROMPTS = [[4, 7, 8], [4, 9], [4, 10, 11, 12]]
CHOSEN = [[20, 21, 2], [22, 2], [23, 24, 25, 2]]
REJECTED = [[30, 2], [31, 32, 33, 2], [34, 2]]
REF_CHOSEN, REF_REJECTED = [-13.0, -8.5, -17.0], [-9.0, -19.5, -8.0]


@pytest.mark.parametrize("name", ["sigmoid", "ipo"])
def test_trl_compute_loss_on_a_model_matches_pair_forward(name: str) -> None:
    """Same tiny Llama weights: TRL (its collator, its fused head with the metric outputs its
    trainer asks for, ``_compute_loss``) and ours (``pair_forward``, ``reduce_sums``) give the same
    loss, the same weight gradients, and the same value for every metric both log.

    Names only one side logs: TRL's ``mean_token_accuracy`` (we do not log it); our ``nll_loss``
    (TRL's DPO does not) and ``loss`` (TRL's Trainer logs it outside ``_compute_loss``).
    ``num_tokens`` differs in meaning: TRL's is every non-pad token seen so far (prompt twice, as it
    is in both sequences, cumulative over steps); ours is this step's completion tokens."""
    tok = build_tiny_tokenizer()
    params = LossParams(beta=0.5)
    theirs, mine = build_tiny_model(len(tok), seed=3), build_tiny_model(len(tok), seed=3)
    add_fused_lm_head(theirs, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))

    examples = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "ref_chosen_logps": rc, "ref_rejected_logps": rr}
                for p, c, r, rc, rr in zip(PROMPTS, CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]
    trainer = _dpo_self([name], [1.0], params)
    trl_loss = DPOTrainer._compute_loss(trainer, theirs, DataCollatorForPreference(tok.pad_token_id)(examples), False)
    trl_loss.backward()
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    batch = {"prompt_ids": object_array(PROMPTS), "chosen_ids": object_array(CHOSEN),
             "rejected_ids": object_array(REJECTED),
             "ref_chosen_logps": np.array(REF_CHOSEN, dtype=np.float32),
             "ref_rejected_logps": np.array(REF_REJECTED, dtype=np.float32)}
    loss, sums = pair_forward(mine, batch, LossSpec({name: 1.0}, params), tok.pad_token_id, torch.device("cpu"))
    loss.backward()
    metrics = reduce_sums(sums)

    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for (key, a), (_, b) in zip(mine.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=key)
    assert set(trl_metrics) - set(metrics) == {"mean_token_accuracy"}
    assert set(metrics) - set(trl_metrics) == {"loss", "nll_loss"}
    for key in sorted(set(metrics) & set(trl_metrics) - {"num_tokens"}):
        assert metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key
    completions = sum(map(len, CHOSEN + REJECTED))
    assert metrics["num_tokens"] == completions
    assert trl_metrics["num_tokens"] == completions + 2 * sum(map(len, PROMPTS))
