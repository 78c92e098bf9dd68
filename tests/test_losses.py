"""Tests of ``raydpo.losses``.

Each loss is checked:

1. against a float64 value worked out by hand on a three-pair batch (the arithmetic is in the
   test's docstring), one ``test_hand_<loss>`` per loss, registered with ``@by_hand``;
2. for the direction of its gradient: descent raises the chosen log-prob and lowers the rejected
   one (with the exceptions each loss's paper gives, in ``DIRECTION``);
3. against TRL 1.16.0's own code, or its documented difference from TRL, in ``test_losses_trl.py``.

Plus identities between losses, and finiteness on empty / extreme batches.

The hand batch ``HAND`` (beta = 0.5 unless a test says otherwise)::

    chosen     = [-4, -6, -9]   ref_chosen   = [-5, -6, -8]   -> logratio_w = [ 1, 0, -1]
    rejected   = [-8, -7, -6]   ref_rejected = [-7, -7, -7]   -> logratio_l = [-1, 0,  1]
    h = logratio_w - logratio_l = [2, 0, -2];  beta * h = [1, 0, -1]
    chosen_tokens = [2, 3, 3]   rejected_tokens = [4, 7, 2]
    chosen / |y_w| = [-2, -2, -3]   rejected / |y_l| = [-2, -1, -3]

Constants used: logsigmoid(1) = -log(1 + e^-1) = -0.31326168751822286,
logsigmoid(0) = -log 2 = -0.6931471805599453, logsigmoid(-1) = -1.3132616875182228
(logsigmoid(x) - logsigmoid(-x) = x), sigmoid(1) = 0.7310585786300049, sigmoid(0.5) = 0.6224593312018546.
"""
from __future__ import annotations

import math
import random
from typing import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from raydpo.losses import (
    LOSSES,
    LossParams,
    PairLogps,
    bco_batch_reward,
    combined_loss,
    logratios,
    rewards,
    sigmoid,
)

F64 = torch.float64
LN2 = math.log(2.0)
LS1 = -0.31326168751822286  # logsigmoid(1)
LSM1 = -1.3132616875182228  # logsigmoid(-1)


def make(chosen, rejected, ref_chosen, ref_rejected, ct, rt, dtype=F64) -> PairLogps:
    return PairLogps(
        chosen=torch.as_tensor(chosen, dtype=dtype),
        rejected=torch.as_tensor(rejected, dtype=dtype),
        ref_chosen=None if ref_chosen is None else torch.as_tensor(ref_chosen, dtype=dtype),
        ref_rejected=None if ref_rejected is None else torch.as_tensor(ref_rejected, dtype=dtype),
        chosen_tokens=torch.as_tensor(ct, dtype=torch.long),
        rejected_tokens=torch.as_tensor(rt, dtype=torch.long),
    )


HAND = make([-4.0, -6.0, -9.0], [-8.0, -7.0, -6.0], [-5.0, -6.0, -8.0], [-7.0, -7.0, -7.0], [2, 3, 3], [4, 7, 2])
B05 = LossParams(beta=0.5)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 1. By-hand values
# ---------------------------------------------------------------------------------------------

HAND_CHECKED: set[str] = set()


def by_hand(name: str) -> Callable:
    def register(fn: Callable) -> Callable:
        HAND_CHECKED.add(name)
        return fn

    return register


@by_hand("sigmoid")
def test_hand_sigmoid() -> None:
    """beta*h = [1, 0, -1]. eps = 0: loss = -logsigmoid(beta h) = [0.31326.., log 2, 1.31326..].
    eps = 0.25: loss = -0.75 logsig(z) - 0.25 logsig(-z)
      z=1:  0.75*0.313262 + 0.25*1.313262 = 0.313262 + 0.25 = 0.56326168751822286
      z=0:  log 2
      z=-1: 0.75*1.313262 + 0.25*0.313262 = 1.313262 - 0.25 = 1.0632616875182228
    """
    close(LOSSES["sigmoid"](HAND, B05), [-LS1, LN2, -LSM1])
    close(LOSSES["sigmoid"](HAND, LossParams(beta=0.5, label_smoothing=0.25)), [-LS1 + 0.25, LN2, -LSM1 - 0.25])


@by_hand("robust")
def test_hand_robust() -> None:
    """eps = 0.25, 1 - 2 eps = 0.5: loss = (-0.75 logsig(z) + 0.25 logsig(-z)) / 0.5
                                         = -1.5 logsig(z) + 0.5 logsig(-z), z = beta h = [1, 0, -1]
      z=1:  -1.5 LS1 + 0.5 (LS1 - 1) = -LS1 - 0.5 = -0.18673831248177714
      z=0:  -1.5 (-log 2) + 0.5 (-log 2) = log 2
      z=-1: -1.5 LSM1 + 0.5 (LSM1 + 1) = -LSM1 + 0.5 = 1.8132616875182228
    """
    close(LOSSES["robust"](HAND, LossParams(beta=0.5, label_smoothing=0.25)), [-LS1 - 0.5, LN2, -LSM1 + 0.5])


@by_hand("ipo")
def test_hand_ipo() -> None:
    """Length-averaged log-ratios: logratio_w / |y_w| = [1/2, 0, -1/3], logratio_l / |y_l| = [-1/4, 0, 1/2]
    h = [3/4, 0, -5/6];  1/(2 beta) = 1;  loss = (h - 1)^2 = [1/16, 1, 121/36]
    """
    close(LOSSES["ipo"](HAND, B05), [1 / 16, 1.0, 121 / 36])


@by_hand("hinge")
def test_hand_hinge() -> None:
    """loss = relu(1 - beta h) = relu([0, 1, 2]) = [0, 1, 2]."""
    close(LOSSES["hinge"](HAND, B05), [0.0, 1.0, 2.0])


@by_hand("sft")
def test_hand_sft() -> None:
    """loss = -chosen / |y_w| = -[-4/2, -6/3, -9/3] = [2, 2, 3]."""
    close(LOSSES["sft"](HAND, B05), [2.0, 2.0, 3.0])


@by_hand("simpo")
def test_hand_simpo() -> None:
    """lc - lr = [-2, -2, -3] - [-2, -1, -3] = [0, -1, 0]; gamma = 0.5
    z = 0.5 * [0, -1, 0] - 0.5 = [-0.5, -1, -0.5]
    eps = 0: loss = -logsig(z) = softplus(-z) = [log(1+e^0.5), log(1+e^1), log(1+e^0.5)]
                                              = [0.9740769841801067, 1.3132616875182228, 0.9740769841801067]
    (references ignored: the same with ref_* = None)
    """
    sp05 = math.log1p(math.exp(0.5))
    close(LOSSES["simpo"](HAND, B05), [sp05, -LSM1, sp05])
    close(LOSSES["simpo"](HAND, B05), LOSSES["simpo"](make(HAND.chosen, HAND.rejected, None, None, [2, 3, 3], [4, 7, 2]), B05))


@by_hand("orpo")
def test_hand_orpo() -> None:
    """lc = [-2, -2, -3], lr = [-2, -1, -3], lambda = 0.1.
    Pairs 0, 2: lc = lr -> log_odds = 0 -> logsig = -log 2 -> loss = -lc + 0.1 log 2 = [2.0693.., 3.0693..]
    Pair 1: log_odds = (-2 + 1) - (log(1 - e^-2) - log(1 - e^-1))
                     = -1 - log((1 - e^-2)/(1 - e^-1)) = -1 - log(1 + e^-1) = logsig(-1) = -1.3132616875182228
            logsig(-1.3132616875182228) = -1.551444713932051
            loss = 2 + 0.1 * 1.551444713932051 = 2.1551444713932053
    """
    close(LOSSES["orpo"](HAND, LossParams(beta=0.5, orpo_lambda=0.1)), [2 + 0.1 * LN2, 2.1551444713932053, 3 + 0.1 * LN2])


@by_hand("bco_pair")
def test_hand_bco_pair() -> None:
    """r_w = 0.5 * [1, 0, -1], r_l = 0.5 * [-1, 0, 1], delta = 0.5
    loss = -logsig(r_w - 0.5) - logsig(-(r_l - 0.5)) = -logsig([0, -0.5, -1]) - logsig([1, 0.5, 0])
      pair 0: log 2 + 0.313262 = 1.0064088680781682
      pair 1: softplus(0.5) + softplus(-0.5) = 0.974077 + 0.474077 = 1.4481539683602134
      pair 2: 1.313262 + log 2 = 2.006408868078168
    """
    close(LOSSES["bco_pair"](HAND, LossParams(beta=0.5, bco_delta=0.5)), [LN2 - LS1, 1.4481539683602134, LN2 - LSM1])


@by_hand("nca_pair")
def test_hand_nca_pair() -> None:
    """r_w = [0.5, 0, -0.5], r_l = -r_w, so loss = -logsig(r_w) - 0.5 logsig(-r_w) - 0.5 logsig(r_w)
                                               = -1.5 logsig(r_w) - 0.5 logsig(-r_w)
      pair 0: 1.5 * 0.474077 + 0.5 * 0.974077 = 1.1981539683602134
      pair 1: 2 log 2 = 1.3862943611198906
      pair 2: 1.5 * 0.974077 + 0.5 * 0.474077 = 1.6981539683602134
    """
    close(LOSSES["nca_pair"](HAND, B05), [1.1981539683602134, 2 * LN2, 1.6981539683602134])


@by_hand("apo_zero")
def test_hand_apo_zero() -> None:
    """loss = 1 - sig(0.5 lr_w) + sig(0.5 lr_l) = 1 - sig([.5, 0, -.5]) + sig([-.5, 0, .5]) = 2 - 2 sig([.5, 0, -.5])
      = [2 - 2*0.622459, 1, 2 - 2*0.377541] = [0.7550813375962908, 1, 1.2449186624037092]
    """
    s = 0.6224593312018546
    close(LOSSES["apo_zero"](HAND, B05), [2 - 2 * s, 1.0, 2 * s])


@by_hand("apo_down")
def test_hand_apo_down() -> None:
    """loss = sig(0.5 lr_w) + 1 - sig(0.5 h) = sig([.5, 0, -.5]) + 1 - sig([1, 0, -1])
      pair 0: 0.622459 + 1 - 0.731059 = 0.8914007525718496
      pair 1: 0.5 + 1 - 0.5 = 1
      pair 2: 0.377541 + 1 - 0.268941 = 1.1085992474281503
    """
    s5, s1 = 0.6224593312018546, 0.7310585786300049
    close(LOSSES["apo_down"](HAND, B05), [s5 + 1 - s1, 1.0, (1 - s5) + s1])


@by_hand("exo_pair")
def test_hand_exo_pair() -> None:
    """eps = 0 -> 1e-3 (TRL); log(1 - eps) = -0.0010005003335835344, log(eps) = -6.907755278982137
    loss = sig(z) (logsig(z) - log(1-eps)) + sig(-z) (logsig(-z) - log eps), z = [1, 0, -1]
      z=1:  0.731059 (-0.313262 + 0.0010005) + 0.268941 (-1.313262 + 6.907755) = 1.2763098386691134
      z=0:  0.5 (-0.693147 + 0.0010005) + 0.5 (-0.693147 + 6.907755)        = 2.761230709097915
      z=-1: 0.268941 (-1.313262 + 0.0010005) + 0.731059 (-0.313262 + 6.907755) = 4.468039722870171
    Same with label_smoothing = 1e-3 explicitly.
    """
    expected = [1.2763098386691134, 2.761230709097915, 4.468039722870171]
    close(LOSSES["exo_pair"](HAND, B05), expected)
    close(LOSSES["exo_pair"](HAND, LossParams(beta=0.5, label_smoothing=1e-3)), expected)


@by_hand("aot")
def test_hand_aot() -> None:
    """policy chosen - rejected = [4, 1, -3] -> sorted [-3, 1, 4]
    ref chosen - rejected = [2, 1, -1] -> sorted [-1, 1, 2]
    delta = [-2, 0, 2], beta delta = [-1, 0, 1], loss = -logsig = [1.313262, log 2, 0.313262]
    """
    close(LOSSES["aot"](HAND, B05), [-LSM1, LN2, -LS1])


@by_hand("aot_pair")
def test_hand_aot_pair() -> None:
    """sorted logratio_w = sort([1, 0, -1]) = [-1, 0, 1]; sorted logratio_l = sort([-1, 0, 1]) = [-1, 0, 1]
    delta = 0 -> loss = log 2 each. With ref_rejected = [-7, -7, -9]: logratio_l = [-1, 0, 3] -> sorted
    [-1, 0, 3], delta = [0, 0, -2], beta delta = [0, 0, -1] -> [log 2, log 2, 1.313262].
    """
    close(LOSSES["aot_pair"](HAND, B05), [LN2, LN2, LN2])
    other = make(HAND.chosen, HAND.rejected, HAND.ref_chosen, [-7.0, -7.0, -9.0], [2, 3, 3], [4, 7, 2])
    close(LOSSES["aot_pair"](other, B05), [LN2, LN2, -LSM1])


@by_hand("discopop")
def test_hand_discopop() -> None:
    """z = beta h = [1, 0, -1], tau = 0.05, m = sig(z / tau) = sig([20, 0, -20])
    loss = -logsig(z) (1 - m) + exp(-z) m
      z=1:  0.313262 * sig(-20) + e^-1 * sig(20) = 0.3678794410588667  (sig(-20) = 2.06e-9)
      z=0:  log 2 * 0.5 + 1 * 0.5 = 0.8465735902799727
      z=-1: 1.313262 * sig(20) + e * sig(-20) = 1.3132616904141852
    """
    s20 = 1.0 / (1.0 + math.exp(-20.0))
    expected = [-LS1 * (1 - s20) + math.exp(-1) * s20, 0.5 * (LN2 + 1), -LSM1 * s20 + math.e * (1 - s20)]
    close(LOSSES["discopop"](HAND, B05), expected)
    close(torch.tensor(expected, dtype=F64), [0.3678794410588667, 0.8465735902799727, 1.3132616904141852])


@by_hand("sppo_hard")
def test_hand_sppo_hard() -> None:
    """a = logratio_w = [1, 0, -1], b = logratio_l = [-1, 0, 1], 0.5 / beta = 1
    loss = (a - 1)^2 + (b + 1)^2 = [0 + 0, 1 + 1, 4 + 4] = [0, 2, 8]
    """
    close(LOSSES["sppo_hard"](HAND, B05), [0.0, 2.0, 8.0])


@by_hand("dpop")
def test_hand_dpop() -> None:
    """lambda = 2: relu(ref_chosen - chosen) = relu([-1, 0, 1]) = [0, 0, 1]
    h - 2 * [0, 0, 1] = [2, 0, -4]; beta * that = [1, 0, -2]
    loss = -logsig([1, 0, -2]) = [0.313262, log 2, log(1 + e^2) = 2.1269280110429727]
    """
    close(LOSSES["dpop"](HAND, LossParams(beta=0.5, dpop_lambda=2.0)), [-LS1, LN2, 2.1269280110429727])


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_has_a_by_hand_test(name: str) -> None:
    assert name in HAND_CHECKED, f"loss {name!r} has no @by_hand test"


# ---------------------------------------------------------------------------------------------
# 2. Direction: gradient descent raises the chosen log-prob and lowers the rejected one
# ---------------------------------------------------------------------------------------------

# Signs of (d loss / d log pi(y_w), d loss / d log pi(y_l)) for the three pairs of HAND at beta = 0.25:
# beta h = [0.5, 0, -0.5], and pair 1 is "policy == reference". -1 on the chosen and +1 on the rejected
# mean descent raises y_w and lowers y_l. Losses with a target (ipo at h = 1 / (2 beta) = 2, sppo_hard
# at logratios +-2, hinge at beta h = 1, nca_pair at beta logratio_w = log 2, exo_pair at
# beta h = log((1 - eps) / eps)) stop or turn back past it; HAND is short of every target.
DESCENT = ([-1, -1, -1], [1, 1, 1])
DIRECTION = {
    # sft does not read the rejected completion.
    "sft": ([-1, -1, -1], [0, 0, 0]),
    # APO-down (eq. 8) lowers the chosen too where |logratio_w| < |h| (pairs 0 and 2): its chosen
    # gradient is beta * (sigmoid'(beta logratio_w) - sigmoid'(beta h)), 0 at policy == reference.
    "apo_down": ([1, 0, 1], [1, 1, 1]),
    # DiscoPOP (tau = 0.05) is not monotone near beta h = 0 (test_discopop_slope_at_policy_equals_reference):
    # at pair 1 it lowers the chosen and raises the rejected; at |beta h| = 0.5 it is as DPO.
    "discopop": ([-1, 1, -1], [1, -1, 1]),
}


def _grads(name: str, lp: PairLogps, params: LossParams) -> tuple[torch.Tensor, torch.Tensor]:
    """d (sum of the loss) / d chosen and / d rejected; zeros for an input the loss does not read."""
    chosen, rejected = lp.chosen.clone().requires_grad_(True), lp.rejected.clone().requires_grad_(True)
    lp = PairLogps(chosen, rejected, lp.ref_chosen, lp.ref_rejected, lp.chosen_tokens, lp.rejected_tokens)
    g_c, g_r = torch.autograd.grad(LOSSES[name](lp, params).sum(), (chosen, rejected), allow_unused=True)
    return g_c, torch.zeros_like(rejected) if g_r is None else g_r


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_raises_chosen_and_lowers_rejected(name: str) -> None:
    g_c, g_r = _grads(name, HAND, LossParams(beta=0.25))
    assert (torch.sign(g_c).tolist(), torch.sign(g_r).tolist()) == DIRECTION.get(name, DESCENT), (g_c, g_r)


@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_discopop_slope_at_policy_equals_reference(tau: float) -> None:
    """loss(z) = -logsig(z) (1 - m) + e^-z m, m = sig(z / tau), z = beta h. At z = 0 (sig = 1/2,
    m' = 1 / (4 tau)): d loss / dz = -(1/2)(1/2) - log 2 / (4 tau) - 1/2 + 1 / (4 tau)
    = (1 - log 2) / (4 tau) - 3/4: +0.7843 at the paper's tau = 0.05 (the chosen goes down, towards
    a local minimum near z = -0.12), -0.5966 at tau = 0.5. d loss / d logp_w = beta * that (HAND's pair 1)."""
    g_c, g_r = _grads("discopop", HAND, LossParams(beta=0.25, discopop_tau=tau))
    slope = (1 - LN2) / (4 * tau) - 0.75
    close(g_c[1], 0.25 * slope)
    close(g_r[1], -0.25 * slope)


Row = dict  # keys: c, r, rc, rr (ref, 0.0 when reference-free), lc, lr (token counts)


def random_rows(rng: random.Random, n: int, reference_free: bool = False) -> list[Row]:
    rows = []
    for _ in range(n):
        lc, lr = rng.randint(1, 12), rng.randint(1, 12)
        c, r = lc * rng.uniform(-3.0, -0.05), lr * rng.uniform(-3.0, -0.05)
        rc = 0.0 if reference_free else c + rng.uniform(-2.0, 2.0)
        rr = 0.0 if reference_free else r + rng.uniform(-2.0, 2.0)
        rows.append({"c": c, "r": r, "rc": rc, "rr": rr, "lc": lc, "lr": lr})
    return rows


def rows_to_logps(rows: list[Row], reference_free: bool = False, dtype=F64) -> PairLogps:
    col = lambda k: [x[k] for x in rows]  # noqa: E731
    return make(
        col("c"), col("r"), None if reference_free else col("rc"), None if reference_free else col("rr"),
        col("lc"), col("lr"), dtype=dtype,
    )



# ---------------------------------------------------------------------------------------------
# Identities
# ---------------------------------------------------------------------------------------------


def test_cdpo_with_zero_eps_is_plain_dpo_and_robust_agrees() -> None:
    """cDPO (sigmoid, eps = 0) is -logsigmoid(beta h); robust with eps = 0 is the same."""
    lp = rows_to_logps(random_rows(random.Random(1), 9))
    c, r = logratios(lp)
    plain = -torch.nn.functional.logsigmoid(0.3 * (c - r))
    close(sigmoid(lp, LossParams(beta=0.3, label_smoothing=0.0)), plain)
    close(LOSSES["robust"](lp, LossParams(beta=0.3, label_smoothing=0.0)), plain)


def test_cdpo_is_expected_dpo_under_label_flips() -> None:
    """cDPO(eps) = (1 - eps) DPO(y_w, y_l) + eps DPO(y_l, y_w)."""
    lp = rows_to_logps(random_rows(random.Random(2), 9))
    swapped = PairLogps(lp.rejected, lp.chosen, lp.ref_rejected, lp.ref_chosen, lp.rejected_tokens, lp.chosen_tokens)
    p0 = LossParams(beta=0.4)
    close(sigmoid(lp, LossParams(beta=0.4, label_smoothing=0.3)), 0.7 * sigmoid(lp, p0) + 0.3 * sigmoid(swapped, p0))


def test_robust_is_unbiased_under_label_flips() -> None:
    """E_flip[robust] = clean DPO: (1 - eps) robust(w, l) + eps robust(l, w) = DPO(w, l)."""
    lp = rows_to_logps(random_rows(random.Random(3), 9))
    swapped = PairLogps(lp.rejected, lp.chosen, lp.ref_rejected, lp.ref_chosen, lp.rejected_tokens, lp.chosen_tokens)
    p = LossParams(beta=0.4, label_smoothing=0.2)
    expected = 0.8 * LOSSES["robust"](lp, p) + 0.2 * LOSSES["robust"](swapped, p)
    torch.testing.assert_close(expected, sigmoid(lp, LossParams(beta=0.4)))


def test_robust_rejects_half_noise() -> None:
    with pytest.raises(ValueError):
        LOSSES["robust"](HAND, LossParams(label_smoothing=0.5))


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_ipo_minimum_at_half_inverse_beta(beta: float) -> None:
    hs = torch.linspace(-10.0, 10.0, 20001, dtype=F64)  # step 1e-3
    zeros = torch.zeros_like(hs)
    ones = torch.ones_like(hs, dtype=torch.long)
    lp = PairLogps(hs, zeros, zeros, zeros, ones, ones)
    loss = LOSSES["ipo"](lp, LossParams(beta=beta))
    assert abs(hs[loss.argmin()].item() - 1 / (2 * beta)) <= 1e-3
    assert loss.min().item() <= 1e-6


def test_simpo_with_zero_gamma_is_reference_free_length_normalised_dpo() -> None:
    rows = random_rows(random.Random(4), 9)
    lp = rows_to_logps(rows)
    lc, lr = lp.chosen_tokens.to(F64), lp.rejected_tokens.to(F64)
    normalised = PairLogps(lp.chosen / lc, lp.rejected / lr, None, None, torch.ones_like(lc), torch.ones_like(lr))
    for eps in (0.0, 0.1):
        p = LossParams(beta=2.5, simpo_gamma=0.0, label_smoothing=eps)
        close(LOSSES["simpo"](lp, p), sigmoid(normalised, p))


def test_sft_is_mean_token_nll_of_chosen() -> None:
    g = torch.Generator().manual_seed(0)
    per_token = torch.log_softmax(torch.randn(4, 6, 11, generator=g, dtype=F64), -1)[..., 0]  # (B, T)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]], dtype=F64)
    summed = (per_token * mask).sum(-1)
    lp = PairLogps(summed, summed - 1.0, None, None, mask.sum(-1).long(), mask.sum(-1).long())
    nll = torch.stack([-per_token[i][mask[i] > 0].mean() for i in range(4)])
    close(LOSSES["sft"](lp, LossParams()), nll)
    close(combined_loss(lp, LossParams(), {"sft": 1.0}), nll)


def test_combined_loss_by_hand() -> None:
    """{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0} on HAND, beta = 0.5, delta = 0.5, from the by-hand tests:
    sigmoid = [-LS1, log 2, -LSM1], bco_pair = [log 2 - LS1, 1.4481539683602134, log 2 - LSM1],
    sft = [2, 2, 3]; total = 0.8 sigmoid + 0.2 bco_pair + sft."""
    sig, bco, sft = [-LS1, LN2, -LSM1], [LN2 - LS1, 1.4481539683602134, LN2 - LSM1], [2.0, 2.0, 3.0]
    expected = [0.8 * a + 0.2 * b + c for a, b, c in zip(sig, bco, sft)]
    weights = {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}
    close(combined_loss(HAND, LossParams(beta=0.5, bco_delta=0.5), weights), expected)


def test_combined_loss_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError) as info:
        combined_loss(HAND, B05, {"sigmoid": 1.0, "dpo": 1.0})
    msg = str(info.value)
    assert "'dpo'" in msg and all(name in msg for name in LOSSES)
    with pytest.raises(ValueError):
        combined_loss(HAND, B05, {})


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_reference_free_means_reference_zero(name: str) -> None:
    rows = random_rows(random.Random(6), 5)
    lp = rows_to_logps(rows)
    zero = torch.zeros_like(lp.chosen)
    free = PairLogps(lp.chosen, lp.rejected, None, None, lp.chosen_tokens, lp.rejected_tokens)
    zeros = PairLogps(lp.chosen, lp.rejected, zero, zero, lp.chosen_tokens, lp.rejected_tokens)
    p = LossParams(beta=0.2, dpop_lambda=1.0)
    close(LOSSES[name](free, p), LOSSES[name](zeros, p))


def test_rewards_are_detached_beta_logratios() -> None:
    lp = PairLogps(*(x.clone().requires_grad_(True) for x in (HAND.chosen, HAND.rejected, HAND.ref_chosen, HAND.ref_rejected)),
                   HAND.chosen_tokens, HAND.rejected_tokens)
    c, r = rewards(lp, 0.5)
    assert not c.requires_grad and not r.requires_grad
    close(c, [0.5, 0.0, -0.5])
    close(r, [-0.5, 0.0, 0.5])
    close(bco_batch_reward(lp, 0.5), 0.0)
    c, r = rewards(PairLogps(HAND.chosen, HAND.rejected, None, None, HAND.chosen_tokens, HAND.rejected_tokens), 0.5)
    close(c, [-2.0, -3.0, -4.5])


def test_params_are_not_mutated_by_exo_pair() -> None:
    p = LossParams(beta=0.5)
    LOSSES["exo_pair"](HAND, p)
    assert p.label_smoothing == 0.0


# ---------------------------------------------------------------------------------------------
# Numerical safety
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_empty_mask_is_finite(name: str) -> None:
    """tokens = 0 and log-probs = 0 (a fully masked completion): finite loss and finite gradients,
    in float32 and float64, with and without a reference."""
    for dtype in (torch.float32, F64):
        for reference_free in (False, True):
            z = [torch.zeros(3, dtype=dtype, requires_grad=True) for _ in range(4)]
            zt = torch.zeros(3, dtype=torch.long)
            lp = PairLogps(z[0], z[1], None if reference_free else z[2], None if reference_free else z[3], zt, zt)
            loss = LOSSES[name](lp, LossParams())
            assert loss.shape == (3,) and loss.dtype == dtype and torch.isfinite(loss).all(), loss
            loss.sum().backward()
            for x in z:
                assert x.grad is None or torch.isfinite(x.grad).all()


def test_extreme_grid_is_finite() -> None:
    """float32, every combination of log-probs in {0, -1e-8, -1e-3, -1, -50, -1e4} (policy and reference,
    chosen and rejected) and token counts in {0, 1, 4096}, beta in {0.01, 10}: every loss and gradient finite."""
    vals = torch.tensor([0.0, -1e-8, -1e-3, -1.0, -50.0, -1e4])
    toks = torch.tensor([0.0, 1.0, 4096.0])
    grid = torch.meshgrid(vals, vals, vals, vals, toks, toks, indexing="ij")
    c, r, rc, rr, tc, tr = (g.reshape(-1) for g in grid)
    pc, pr = c.clone().requires_grad_(True), r.clone().requires_grad_(True)
    lp = PairLogps(pc, pr, rc, rr, tc.long(), tr.long())
    for beta in (0.01, 10.0):
        for name, fn in LOSSES.items():
            loss = fn(lp, LossParams(beta=beta))
            assert torch.isfinite(loss).all(), (name, beta)
            gc, gr = torch.autograd.grad(loss.sum(), (pc, pr), allow_unused=True)
            for g in (gc, gr):
                assert g is None or torch.isfinite(g).all(), (name, beta)


@settings(max_examples=8, deadline=None)
@given(
    st.lists(st.floats(-1e4, 0.0), min_size=16, max_size=16),
    st.lists(st.integers(0, 4096), min_size=8, max_size=8),
    st.floats(0.01, 10.0),
)
def test_random_extreme_inputs_are_finite(vals, toks, beta) -> None:
    """float32, 4 pairs with log-probs anywhere in [-1e4, 0] and token counts in [0, 4096]."""
    v = torch.tensor(vals).reshape(4, 4)
    c, r = v[0].clone().requires_grad_(True), v[1].clone().requires_grad_(True)
    lp = PairLogps(c, r, v[2], v[3], torch.tensor(toks[:4]), torch.tensor(toks[4:]))
    for name, fn in LOSSES.items():
        loss = fn(lp, LossParams(beta=beta))
        assert torch.isfinite(loss).all(), (name, loss)
        gc, gr = torch.autograd.grad(loss.sum(), (c, r), allow_unused=True)
        for g in (gc, gr):
            assert g is None or torch.isfinite(g).all(), (name, g)
