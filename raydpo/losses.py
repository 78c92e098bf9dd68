"""Preference losses: one pure function per loss, chosen once from ``LOSSES``.

Every loss takes a :class:`PairLogps` (all fields shape ``(B,)``) and a :class:`LossParams`
and returns the per-pair loss, shape ``(B,)``; the caller takes the mean. Sequence log-probs are
sums over completion tokens (see ``raydpo.logprobs``), in float32.

Names and math follow TRL's ``DPOTrainer`` ``loss_type`` values (plus ``simpo`` from TRL's
``CPOTrainer``, ``orpo`` from TRL's ``ORPOTrainer`` and ``dpop`` from its paper, which TRL does not
have). Where TRL's convention differs from the paper, the docstring says so and says which one is
followed; docs/losses.md lists every difference from TRL 1.16.0 and its reason.

Conventions shared by every loss:

* ``h`` is the DPO margin ``(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``.
* Reference-free: ``ref_* is None`` means a reference log-prob of 0 (see :func:`logratios`).
  ``simpo``, ``orpo`` and ``sft`` never read the reference at all.
* Length-normalised losses divide summed log-probs by the completion token counts, clamped to
  ``>= 1`` so that a malformed batch (0 tokens) gives a finite loss, never NaN/inf.
* ``logsigmoid`` is used throughout, never ``log(sigmoid(.))``.
"""
from __future__ import annotations

import math
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
    chosen_tokens: Tensor  # completion token counts; 0 (malformed batch) is clamped to 1
    rejected_tokens: Tensor


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters of every loss; each loss reads only the fields it needs. The one definition
    of their names and defaults: the config's ``loss.<field>`` keys are these fields (but
    ``bco_delta``), with bounds added (``raydpo.config.LossConfig``).

    beta: KL-strength / inverse temperature of the implicit reward (TRL ``beta``).
    label_smoothing: cDPO epsilon, probability that a label is flipped (``sigmoid``, ``robust``,
        ``aot``, ``aot_pair``, ``simpo``, ``exo_pair``; TRL ``label_smoothing``).
    simpo_gamma: SimPO target margin gamma, in reward units (TRL ``CPOConfig.simpo_gamma``).
        The SimPO reference code's ``gamma_beta_ratio`` maps to ``simpo_gamma = gamma_beta_ratio * beta``.
    orpo_lambda: weight of the ORPO odds-ratio term (TRL ``ORPOConfig.beta``, default 0.1).
    bco_delta: running mean of the implicit rewards for ``bco_pair``; maintained by the caller
        (TRL keeps it in a ``RunningMoments``; see :func:`bco_batch_reward`).
    discopop_tau: temperature of the DiscoPOP mixing sigmoid (TRL ``discopop_tau``).
    dpop_lambda: DPO-Positive penalty weight lambda (Pal et al. 2024 use 50).
    """

    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO epsilon: probability that a label is flipped
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    bco_delta: float = 0.0
    discopop_tau: float = 0.05
    dpop_lambda: float = 50.0


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


def _tokens(count: Tensor, like: Tensor) -> Tensor:
    """Token counts as ``like``'s dtype, clamped to >= 1 (a 0-token completion must not give NaN)."""
    return count.to(device=like.device, dtype=like.dtype).clamp(min=1.0)


def _length_normalised(logps: PairLogps) -> PairLogps:
    """Every log-prob (policy and reference) divided by its completion's token count, ``(B,)``.

    TRL computes ``ipo``/``simpo``/``orpo`` log-probs as per-token averages (``average_log_prob``);
    dividing the sums by the clamped counts is the same thing.
    """
    lc = _tokens(logps.chosen_tokens, logps.chosen)
    lr = _tokens(logps.rejected_tokens, logps.rejected)
    return PairLogps(
        chosen=logps.chosen / lc,
        rejected=logps.rejected / lr,
        ref_chosen=None if logps.ref_chosen is None else logps.ref_chosen / lc,
        ref_rejected=None if logps.ref_rejected is None else logps.ref_rejected / lr,
        chosen_tokens=torch.ones_like(lc),
        rejected_tokens=torch.ones_like(lr),
    )


def _smoothed_logistic(z: Tensor, eps: float) -> Tensor:
    """cDPO smoothed logistic loss ``-(1 - eps) logsigmoid(z) - eps logsigmoid(-z)``."""
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable near 0 and for very negative x (Maechler 2012).

    ``x`` is clamped to ``<= -finfo.eps`` so that ``x = 0`` (a certain completion, or an empty
    one) gives a large finite negative value instead of ``-inf``.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sigmoid(logps: PairLogps, params: LossParams) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7), with cDPO label smoothing eps (Mitchell 2023).

    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))
    loss = -(1 - eps) * logsigmoid(beta * h) - eps * logsigmoid(-beta * h)

    Same as TRL ``loss_type="sigmoid"`` at eps = 0; TRL 1.16 dropped the smoothing from sigmoid
    (ours keeps cDPO, as earlier TRL releases). Shapes: every input ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    h = params.beta * (chosen - rejected)
    eps = params.label_smoothing
    return -(1.0 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)


def robust(logps: PairLogps, params: LossParams) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 9), noise rate eps.

    loss = ( -(1 - eps) * logsigmoid(beta * h) + eps * logsigmoid(-beta * h) ) / (1 - 2 eps)

    An unbiased estimate of the clean DPO loss under label flips with probability eps; requires
    ``label_smoothing < 0.5``. Same as TRL ``loss_type="robust"``. Inputs ``(B,)``; returns ``(B,)``.
    """
    eps = params.label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    chosen, rejected = logratios(logps)
    z = params.beta * (chosen - rejected)
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def ipo(logps: PairLogps, params: LossParams) -> Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", eq. 17), tau = beta.

    h = (lbar(y_w) - lbar_ref(y_w)) - (lbar(y_l) - lbar_ref(y_l)),  lbar = log-prob / token count
    loss = (h - 1 / (2 beta))^2

    The paper's h uses summed log-probs; TRL (``loss_type="ipo"``) averages the log-probs of policy
    and reference over completion tokens before forming h. We follow TRL (length-averaged).
    The minimum is at h = 1/(2 beta). Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(_length_normalised(logps))
    return (chosen - rejected - 1.0 / (2.0 * params.beta)) ** 2


def hinge(logps: PairLogps, params: LossParams) -> Tensor:
    """SLiC-HF hinge loss (Zhao et al. 2023, eq. 2 with the reference log-ratio, as in TRL).

    loss = relu(1 - beta * h)

    SLiC's margin delta is 1/beta here (TRL ``loss_type="hinge"``: beta is the inverse margin).
    Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    return torch.relu(1.0 - params.beta * (chosen - rejected))


def sft(logps: PairLogps, params: LossParams) -> Tensor:
    """Length-normalised NLL of the chosen completion (the RPO term, Pang et al. 2024, eq. 3).

    loss = -log pi(y_w) / |y_w|

    Add it to a preference loss with :func:`combined_loss` (RPO: ``{"sigmoid": 1, "sft": alpha}``).
    TRL's ``"sft"`` / ``rpo_alpha`` NLL is the cross-entropy averaged over all chosen tokens of the
    batch (token-weighted); here it is per pair (the mean of the returned ``(B,)`` is a per-sequence
    average). ``params`` is unused. Inputs ``(B,)``; returns ``(B,)``.
    """
    del params
    return -logps.chosen / _tokens(logps.chosen_tokens, logps.chosen)


def simpo(logps: PairLogps, params: LossParams) -> Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free and length-normalised, with cDPO smoothing.

    z = beta * (log pi(y_w) / |y_w| - log pi(y_l) / |y_l|) - gamma
    loss = -(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z)

    gamma is ``params.simpo_gamma`` as an absolute margin, as TRL's ``CPOConfig.simpo_gamma``
    (TRL computes ``beta * (logits - simpo_gamma / beta)``). The SimPO code's ``gamma_beta_ratio``
    is gamma / beta, i.e. ``simpo_gamma = gamma_beta_ratio * beta``. Label smoothing as in TRL
    (the paper has none: eps = 0). ``ref_*`` are ignored. Inputs ``(B,)``; returns ``(B,)``.
    """
    lc = logps.chosen / _tokens(logps.chosen_tokens, logps.chosen)
    lr = logps.rejected / _tokens(logps.rejected_tokens, logps.rejected)
    z = params.beta * (lc - lr) - params.simpo_gamma
    return _smoothed_logistic(z, params.label_smoothing)


def orpo(logps: PairLogps, params: LossParams) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 4, 6, 7): NLL plus odds-ratio term, reference-free.

    lc, lr = log pi(y_w) / |y_w|, log pi(y_l) / |y_l|  (length-averaged log-probs)
    log_odds = (lc - lr) - (log(1 - exp(lc)) - log(1 - exp(lr)))
    loss = -lc - lambda * logsigmoid(log_odds)

    lambda is ``params.orpo_lambda`` (TRL's ``ORPOConfig.beta``; default 0.1 as there), a separate
    field so that ``beta`` keeps its DPO meaning. ``log(1 - exp(x))`` is computed stably (clamped
    below 0). TRL's NLL term is the cross-entropy of prompt and chosen tokens, token-weighted over
    the batch; here it is the chosen completion's, per pair (as :func:`sft`). ``ref_*`` are ignored.
    Inputs ``(B,)``; returns ``(B,)``.
    """
    lc = logps.chosen / _tokens(logps.chosen_tokens, logps.chosen)
    lr = logps.rejected / _tokens(logps.rejected_tokens, logps.rejected)
    log_odds = (lc - lr) - (_log1mexp(lc) - _log1mexp(lr))
    return -lc - params.orpo_lambda * F.logsigmoid(log_odds)


def bco_pair(logps: PairLogps, params: LossParams) -> Tensor:
    """Paired BCO (Jung et al. 2024, "Binary Classifier Optimization", eq. 5 on pairs).

    r_w, r_l = beta * logratio(y_w), beta * logratio(y_l)
    loss = -logsigmoid(r_w - delta) - logsigmoid(-(r_l - delta))

    delta is ``params.bco_delta``: the BCO paper's reward shift, a running mean of the batch means
    of ``cat(r_w, r_l)``, updated with the current batch *before* the loss (as earlier TRL releases
    did with a ``RunningMoments``). Here the loss is pure: the caller maintains delta (see
    :func:`bco_batch_reward`). TRL 1.16's ``loss_type="bco_pair"`` has no delta: it is this at
    delta = 0. Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    d = params.bco_delta
    return -F.logsigmoid(params.beta * chosen - d) - F.logsigmoid(-(params.beta * rejected - d))


def nca_pair(logps: PairLogps, params: LossParams) -> Tensor:
    """Paired NCA (Chen et al. 2024, "Noise Contrastive Alignment", eq. 12 with K = 1).

    r_w, r_l = beta * logratio(y_w), beta * logratio(y_l)
    loss = -logsigmoid(r_w) - 0.5 * logsigmoid(-r_w) - 0.5 * logsigmoid(-r_l)

    Same as TRL ``loss_type="nca_pair"``. Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    rw, rl = params.beta * chosen, params.beta * rejected
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def apo_zero(logps: PairLogps, params: LossParams) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", eq. 7).

    loss = (1 - sigmoid(beta * logratio(y_w))) + sigmoid(beta * logratio(y_l))

    Raises the chosen likelihood and lowers the rejected one. Same as TRL ``loss_type="apo_zero"``.
    Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    return (1.0 - torch.sigmoid(params.beta * chosen)) + torch.sigmoid(params.beta * rejected)


def apo_down(logps: PairLogps, params: LossParams) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8).

    loss = sigmoid(beta * logratio(y_w)) + (1 - sigmoid(beta * h))

    Lowers the chosen likelihood and the rejected one more. Same as TRL ``loss_type="apo_down"``.
    Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    return torch.sigmoid(params.beta * chosen) + (1.0 - torch.sigmoid(params.beta * (chosen - rejected)))


def exo_pair(logps: PairLogps, params: LossParams) -> Tensor:
    """Paired EXO (Ji et al. 2024, "Towards Efficient Exact Optimization...", eq. 16, K = 2).

    z = beta * h,  eps = label_smoothing, or 1e-3 where label_smoothing == 0
    loss = sigmoid(z) * (logsigmoid(z) - log(1 - eps)) + sigmoid(-z) * (logsigmoid(-z) - log(eps))

    The reverse KL between the model's pair distribution and the eps-smoothed label. eps = 0
    would be log(0): TRL 1.16 refuses it; we use the paper's 1e-3 then (as earlier TRL releases),
    without changing ``params``. Same as TRL ``loss_type="exo_pair"`` for eps > 0.
    Inputs ``(B,)``; returns ``(B,)``.
    """
    eps = params.label_smoothing if params.label_smoothing != 0.0 else 1e-3
    chosen, rejected = logratios(logps)
    z = params.beta * (chosen - rejected)
    return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1.0 - eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )


def aot(logps: PairLogps, params: LossParams) -> Tensor:
    """AOT (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport").

    u = sort_batch(log pi(y_w) - log pi(y_l)),  v = sort_batch(log ref(y_w) - log ref(y_l))
    loss_i = -(1 - eps) * logsigmoid(beta * (u_i - v_i)) - eps * logsigmoid(-beta * (u_i - v_i))

    The unpaired-in-batch ("aot") variant of TRL: the policy's and the reference's log-ratios are
    sorted separately (first-order stochastic dominance via 1-D optimal transport), so element i
    of the result belongs to the i-th quantile, not to pair i: the loss couples the batch. Only its
    mean is meaningful per batch. Same as TRL ``loss_type="aot"``. Inputs ``(B,)``; returns ``(B,)``.
    """
    ref_c = _ref_or_zero(logps.ref_chosen, logps.chosen)
    ref_r = _ref_or_zero(logps.ref_rejected, logps.rejected)
    u, _ = torch.sort(logps.chosen - logps.rejected, dim=0)
    v, _ = torch.sort(ref_c - ref_r, dim=0)
    return _smoothed_logistic(params.beta * (u - v), params.label_smoothing)


def aot_pair(logps: PairLogps, params: LossParams) -> Tensor:
    """AOT, paired variant (Melnyk et al. 2024), as TRL ``loss_type="aot_unpaired"`` (TRL 1.16's
    name; earlier ``"aot_pair"``).

    u = sort_batch(logratio(y_w)),  v = sort_batch(logratio(y_l))
    loss_i = -(1 - eps) * logsigmoid(beta * (u_i - v_i)) - eps * logsigmoid(-beta * (u_i - v_i))

    Couples the batch like :func:`aot`. Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    u, _ = torch.sort(chosen, dim=0)
    v, _ = torch.sort(rejected, dim=0)
    return _smoothed_logistic(params.beta * (u - v), params.label_smoothing)


def discopop(logps: PairLogps, params: LossParams) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference
    Optimization Algorithms with and for LLMs", eq. 5), tau = ``params.discopop_tau``.

    z = beta * h,  m = sigmoid(z / tau)
    loss = -logsigmoid(z) * (1 - m) + exp(-z) * m

    Same as TRL ``loss_type="discopop"``, except that ``exp(-z) * m`` is evaluated as
    ``exp(-z + logsigmoid(z / tau))`` (equal, but finite for very negative z where TRL's product
    is ``inf * 0``). Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    z = params.beta * (chosen - rejected)
    tau = params.discopop_tau
    logistic = -F.logsigmoid(z) * torch.sigmoid(-z / tau)
    exponential = torch.exp(-z + F.logsigmoid(z / tau))
    return logistic + exponential


def sppo_hard(logps: PairLogps, params: LossParams) -> Tensor:
    """SPPO with hard win probabilities (Wu et al. 2024, "Self-Play Preference Optimization", eq. 4.7
    with P(y_w > y_l) = 1 and P(y_l > y_w) = 0).

    loss = (logratio(y_w) - 1 / (2 beta))^2 + (logratio(y_l) + 1 / (2 beta))^2

    The paper's beta is eta (SPPO's step size) and its targets are eta * (P - 1/2); TRL writes
    them as +-0.5 / beta. Same as TRL ``loss_type="sppo_hard"``. Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    half = 0.5 / params.beta
    return (chosen - half) ** 2 + (rejected + half) ** 2


def dpop(logps: PairLogps, params: LossParams) -> Tensor:
    """DPO-Positive (Pal et al. 2024, "Smaug", eq. 3), lambda = ``params.dpop_lambda``.

    loss = -logsigmoid(beta * (h - lambda * relu(log ref(y_w) - log pi(y_w))))

    Penalises the policy for lowering the chosen likelihood below the reference. Not a TRL
    DPOTrainer loss_type; follows the paper (no label smoothing). Reference-free (``ref_chosen``
    None) means a reference log-prob of 0 as everywhere, so the penalty is ``lambda * (-log pi(y_w))``.
    Inputs ``(B,)``; returns ``(B,)``.
    """
    chosen, rejected = logratios(logps)
    penalty = torch.relu(-chosen)  # relu(log ref(y_w) - log pi(y_w))
    return -F.logsigmoid(params.beta * (chosen - rejected - params.dpop_lambda * penalty))


LOSSES: dict[str, LossFn] = {
    "sigmoid": sigmoid,
    "robust": robust,
    "ipo": ipo,
    "hinge": hinge,
    "sft": sft,
    "simpo": simpo,
    "orpo": orpo,
    "bco_pair": bco_pair,
    "nca_pair": nca_pair,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "exo_pair": exo_pair,
    "aot": aot,
    "aot_pair": aot_pair,
    "discopop": discopop,
    "sppo_hard": sppo_hard,
    "dpop": dpop,
}


def combined_loss(logps: PairLogps, params: LossParams, weights: dict[str, float]) -> Tensor:
    """Weighted sum of registered losses, ``(B,)``: ``sum_k w_k * LOSSES[k](logps, params)``.

    Raises ``KeyError`` (naming the known losses) for an unknown name and ``ValueError`` for an
    empty ``weights``.
    """
    if not weights:
        raise ValueError(f"combined_loss needs at least one weight; known losses: {sorted(LOSSES)}")
    unknown = [name for name in weights if name not in LOSSES]
    if unknown:
        raise KeyError(f"unknown loss(es) {unknown}; known losses: {sorted(LOSSES)}")
    total: Tensor | None = None
    for name, w in weights.items():
        term = w * LOSSES[name](logps, params)
        total = term if total is None else total + term
    assert total is not None
    return total


def rewards(logps: PairLogps, beta: float) -> tuple[Tensor, Tensor]:
    """TRL's ``chosen_rewards`` / ``rejected_rewards``: ``beta * logratio``, detached, each ``(B,)``.

    For the ``rewards/*`` metrics (accuracy = chosen > rejected, margin = chosen - rejected).
    Uses summed log-probs, as TRL's DPOTrainer for every loss type (TRL's CPO and ORPO trainers
    report rewards on averaged log-probs; pass a length-normalised :class:`PairLogps` for that).
    """
    chosen, rejected = logratios(logps)
    return (beta * chosen).detach(), (beta * rejected).detach()


def bco_batch_reward(logps: PairLogps, beta: float) -> Tensor:
    """Scalar mean of ``cat(chosen_rewards, rejected_rewards)``, detached: the value earlier TRL
    releases fed a ``RunningMoments`` for ``bco_pair``. The caller folds it into its running mean
    and passes that as ``LossParams.bco_delta`` (updated before the loss of the same batch)."""
    c, r = rewards(logps, beta)
    return torch.cat((c, r), 0).mean()


# Losses that never read the reference log-probs: a run of only these needs no reference model.
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo", "sft"})
