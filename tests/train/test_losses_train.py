"""Every registered loss pushes a real model's log-probs the way the loss wants, end to end.

The batch is the quickstart's synthetic ``max`` task (prefer ``max(a,b)`` over ``min(a,b)``),
through the pipeline's own ``normalise`` and ``tokenize_pair`` with the tiny character-level
tokenizer and the quickstart's length limits; the model is the quickstart's tiny Llama (hidden 64,
2 layers, seed 0). The reference log-probs come from that same initial model under ``no_grad``, as
the reference actors would give them, so every loss is evaluated at "policy == reference" (h = 0).

One ``pair_forward`` and ``backward`` per loss, through a scorer that keeps its output log-probs,
gives d loss / d log pi for every sequence. What a test shows: the sign of that gradient, per pair,
through the real pieces (layout, scorer, reference columns, ``combined_loss``, the mean over
pairs), i.e. that descent raises every chosen log-prob and lowers every rejected one. The exceptions
at h = 0 are the losses' own (``AT_START``); ``tests/test_losses.py`` checks the same directions on
small tensors and ``tests/test_losses_trl.py`` the values against TRL.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydpo.data.formats import normalise
from raydpo.data.synthetic import max_rows
from raydpo.data.tokenize import TokenizeSettings, tokenize_pair
from raydpo.logprobs import PolicyScorer, Scores, model_sequence_logps, pair_batch
from raydpo.losses import LOSSES, REFERENCE_FREE_LOSSES, LossParams
from raydpo.models import build_tiny_model, build_tiny_tokenizer
from raydpo.train.step import LossSpec, pair_forward

# configs/quickstart.yaml
HIDDEN, LAYERS, HEADS, MODEL_SEED = 64, 2, 4, 0
TOKENIZE = TokenizeSettings(max_length=32, max_prompt_length=24)
BETA = 0.5
PAIRS = 16
DATA_SEED = 0

# Sign of (d loss / d log pi(y_w), d loss / d log pi(y_l)) for every pair at h = 0, where it is not
# (-1, +1): -1 on the chosen and +1 on the rejected mean that descent raises y_w and lowers y_l.
AT_START = {
    "sft": (-1, 0),  # does not read the rejected completion
    # APO-down's chosen gradient is beta * (sigmoid'(beta logratio_w) - sigmoid'(beta h)): 0 at h = 0.
    "apo_down": (0, 1),
    # DiscoPOP (tau = 0.05): d loss / d(beta h) at 0 is (1 - log 2) / (4 tau) - 3/4 > 0, so from
    # policy == reference it lowers the chosen and raises the rejected (tests/test_losses.py).
    "discopop": (1, -1),
}


def _ids(rows: list[list[int]]) -> np.ndarray:
    """A 1-D numpy object array of int64 arrays, as Ray Data hands a list<int> column to a worker."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r, dtype=np.int64) for r in rows]
    return out


def _initial_model() -> torch.nn.Module:
    tok = build_tiny_tokenizer()
    return build_tiny_model(len(tok), hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, seed=MODEL_SEED)


@pytest.fixture(scope="module")
def task() -> tuple[dict, int]:
    """``PAIRS`` pairs of the ``max`` task with the initial model's reference log-probs, and the pad id."""
    tok = build_tiny_tokenizer()
    pairs = []
    for row in max_rows(PAIRS, seed=DATA_SEED):
        norm, reason = normalise(row)
        assert norm is not None, reason
        t = tokenize_pair(tok, norm["prompt"], norm["chosen"], norm["rejected"], TOKENIZE)
        assert not t.drop_reason and not t.truncated, row
        pairs.append(t)
    batch = {
        "prompt_ids": _ids([p.prompt_ids for p in pairs]),
        "chosen_ids": _ids([p.chosen_ids for p in pairs]),
        "rejected_ids": _ids([p.rejected_ids for p in pairs]),
    }
    with torch.no_grad():
        logps = model_sequence_logps(
            _initial_model().eval(),
            pair_batch(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], tok.pad_token_id),
        )
    batch["ref_chosen_logps"] = logps[:PAIRS].numpy().astype(np.float32)
    batch["ref_rejected_logps"] = logps[PAIRS:].numpy().astype(np.float32)
    return batch, tok.pad_token_id


class _KeepLogps(PolicyScorer):
    """The scorer ``pair_forward`` would wrap the model in, keeping its output log-probs (2B,) with
    their gradient retained, so a test reads d loss / d log pi after ``backward``."""

    def forward(self, *args, **kwargs) -> Scores:
        scores = super().forward(*args, **kwargs)
        scores.logps.retain_grad()
        self.logps = scores.logps
        return scores


def _logp_grads(task: tuple[dict, int], weights: dict[str, float], params: LossParams) -> tuple[np.ndarray, np.ndarray]:
    """d loss / d log pi of each chosen and each rejected sequence, from the initial model.

    A run of only reference-free losses gets a batch without the reference columns, so it also
    shows that ``pair_forward`` does not read them then."""
    batch, pad_id = task
    reference_free = all(name in REFERENCE_FREE_LOSSES for name in weights)
    if reference_free:
        batch = {k: v for k, v in batch.items() if not k.startswith("ref_")}
    scorer = _KeepLogps(_initial_model())
    loss, sums = pair_forward(scorer, batch, LossSpec(weights, params, reference_free), pad_id, torch.device("cpu"))
    assert torch.isfinite(loss) and torch.isfinite(sums).all(), sums
    loss.backward()
    grad = scorer.logps.grad.double().numpy()
    return grad[:PAIRS], grad[PAIRS:]


def _assert_sign(grad: np.ndarray, sign: int, scale: float) -> None:
    """Every entry has ``sign``; 0 means below 1e-6 of ``scale`` (the other side's largest)."""
    if sign == 0:
        assert np.abs(grad).max() <= 1e-6 * scale, grad
    else:
        assert (np.sign(grad) == sign).all(), grad


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_each_loss_pushes_chosen_up_and_rejected_down(task, name: str) -> None:
    g_c, g_r = _logp_grads(task, {name: 1.0}, LossParams(beta=BETA))
    sign_c, sign_r = AT_START.get(name, (-1, 1))
    scale = max(np.abs(g_c).max(), np.abs(g_r).max())
    assert scale > 0
    _assert_sign(g_c, sign_c, scale)
    _assert_sign(g_r, sign_r, scale)


def test_weighted_combination_pushes_chosen_up_and_rejected_down(task) -> None:
    """A ``loss.weights`` mix, TRL's MPO example ``{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}``
    (``bco_delta`` 0: no running mean is passed here)."""
    g_c, g_r = _logp_grads(task, {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, LossParams(beta=BETA))
    assert (g_c < 0).all() and (g_r > 0).all(), (g_c, g_r)
