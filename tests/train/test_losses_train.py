"""Every registered loss trains: a short single-process run on the quickstart's task lowers it.

The task is the quickstart's synthetic ``max`` task (prefer ``max(a,b)`` over ``min(a,b)``),
tokenized with the tiny character-level tokenizer and the quickstart's length limits, and the
model is the quickstart's tiny Llama (hidden 64, 2 layers, seed 0). The reference log-probs are
computed once, under ``no_grad``, from that same initial model, as the reference actors would.
Training goes through the real pieces: ``build_engine("ddp", ...)`` (AdamW, constant LR,
clipping at 1.0) and ``pair_forward`` on batches shaped like the pipeline's (numpy object arrays
of token-id arrays, float reference log-probs).

What a test shows: that ``loss -> backward -> step`` with that loss moves the model the way the
loss wants, i.e. its gradient has the right sign end to end (not only in ``raydpo.losses``'s unit
tests), and that it stays finite. It does not show that the loss learns the task well.

Settings are the quickstart's (lr 3e-3, beta 0.5, batch 32) with 20 steps; the few per-loss
exceptions are in ``OVERRIDES`` with the reason. They were checked to pass on data seeds 0-7
(``max_rows(seed=...)``), not only on ``DATA_SEED``. Torch runs on one thread here: on a busy
2-core machine two threads per process made each step ~20x slower (oversubscription).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydpo.data.formats import normalise
from raydpo.data.synthetic import max_rows
from raydpo.data.tokenize import TokenizeSettings, tokenize_pair
from raydpo.logprobs import model_sequence_logps, pair_batch
from raydpo.losses import LOSSES, REFERENCE_FREE_LOSSES, LossParams
from raydpo.models import build_tiny_model, build_tiny_tokenizer
from raydpo.train.engine import OptimConfig, build_engine
from raydpo.train.step import LossSpec, pair_forward

# configs/quickstart.yaml
HIDDEN, LAYERS, HEADS, MODEL_SEED = 64, 2, 4, 0
TOKENIZE = TokenizeSettings(max_length=32, max_prompt_length=24)
LR = 3e-3
BETA = 0.5
BATCH = 32

STEPS = 20  # ~1 s per loss on one CPU thread; every loss's fall is clear by then
WINDOW = 5  # compare the mean loss of the first WINDOW steps with that of the last WINDOW
DATA_SEED = 0

# Per-loss departures from (LR, BETA, LossParams defaults), keyed by loss name.
OVERRIDES: dict[str, dict[str, float]] = {
    # nca_pair falls slowly at beta 0.5 (last/first ~0.93-0.96 over 20 steps): its rewards enter
    # only through beta * logratio and the chosen term saturates near 1.04. beta 2 gives a clear
    # fall (~0.82-0.90) at the same step count.
    "nca_pair": {"beta": 2.0},
    # dpop with the paper's lambda = 50 is spiky at beta 0.5: each 0.1 nat the chosen log-prob
    # dips below the reference takes 2.5 off the logit, so single batches jump (to 3.7 from ~0.4
    # at step 15 on data seed 5) and the last-5 mean rose on one of six seeds (and barely fell on
    # another). lambda = 5 keeps the penalty active and falls steadily (~0.62-0.71).
    "dpop": {"dpop_lambda": 5.0},
}

# Losses that do not fall on this task with any sane setting: none at present.
# Mark one with pytest.mark.xfail(strict=True, reason=...) here rather than loosening the test.
XFAIL: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for this module (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(rows: list[list[int]]) -> np.ndarray:
    """A 1-D numpy object array of int64 arrays, as Ray Data hands a list<int> column to a worker."""
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r, dtype=np.int64) for r in rows]
    return out


def _initial_model() -> torch.nn.Module:
    tok = build_tiny_tokenizer()
    return build_tiny_model(len(tok), hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS, seed=MODEL_SEED)


@pytest.fixture(scope="module")
def task() -> tuple[list[dict], int]:
    """``STEPS`` batches of ``BATCH`` pairs of the ``max`` task, with reference log-probs, and the pad id.

    Rows go through the pipeline's own ``normalise`` and ``tokenize_pair``; none is dropped.
    """
    tok = build_tiny_tokenizer()
    pad_id = tok.pad_token_id
    pairs = []
    for row in max_rows(STEPS * BATCH, seed=DATA_SEED):
        norm, reason = normalise(row)
        assert norm is not None, reason
        t = tokenize_pair(tok, norm["prompt"], norm["chosen"], norm["rejected"], TOKENIZE)
        assert not t.drop_reason and not t.truncated, row
        pairs.append(t)

    reference = _initial_model().eval()
    batches = []
    for start in range(0, len(pairs), BATCH):
        chunk = pairs[start : start + BATCH]
        batch = {
            "prompt_ids": _ids([p.prompt_ids for p in chunk]),
            "chosen_ids": _ids([p.chosen_ids for p in chunk]),
            "rejected_ids": _ids([p.rejected_ids for p in chunk]),
        }
        with torch.no_grad():
            logps = model_sequence_logps(
                reference, pair_batch(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], pad_id)
            )
        batch["ref_chosen_logps"] = logps[: len(chunk)].numpy().astype(np.float32)
        batch["ref_rejected_logps"] = logps[len(chunk) :].numpy().astype(np.float32)
        batches.append(batch)
    return batches, pad_id


def _train(task: tuple[list[dict], int], weights: dict[str, float], params: LossParams, lr: float) -> list[float]:
    """One optimizer step per batch from the initial model; returns every step's loss.

    A run of only reference-free losses gets batches without the reference columns, so it also
    shows that ``pair_forward`` does not read them then.
    """
    batches, pad_id = task
    reference_free = all(name in REFERENCE_FREE_LOSSES for name in weights)
    if reference_free:
        batches = [{k: v for k, v in b.items() if not k.startswith("ref_")} for b in batches]
    engine = build_engine(
        "ddp", _initial_model(), OptimConfig(lr=lr, schedule="constant"), grad_accum_steps=1, micro_batch_size=BATCH
    )
    spec = LossSpec(weights, params, reference_free=reference_free)
    losses = []
    for batch in batches:
        loss, sums = pair_forward(engine.module, batch, spec, pad_id, engine.device)
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
        assert torch.isfinite(sums).all(), sums
    return losses


def _assert_finite_and_falls(losses: list[float]) -> None:
    curve = [round(x, 4) for x in losses]
    assert all(math.isfinite(x) for x in losses), curve
    first, last = np.mean(losses[:WINDOW]), np.mean(losses[-WINDOW:])
    assert last < first, f"mean of last {WINDOW} steps {last:.4f} >= first {WINDOW} {first:.4f}; losses {curve}"


def _param(name: str):
    marks = [pytest.mark.xfail(strict=True, reason=XFAIL[name])] if name in XFAIL else []
    return pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", [_param(n) for n in sorted(LOSSES)])
def test_each_loss_falls_when_training_on_max_task(task, name: str) -> None:
    """Training on loss ``name`` alone keeps every step's loss finite and lowers it.

    Reference-free losses run without reference log-probs; the others use those of the initial
    model, so every loss starts from its value at "policy == reference".
    """
    overrides = dict(OVERRIDES.get(name, {}))
    lr = overrides.pop("lr", LR)
    beta = overrides.pop("beta", BETA)
    losses = _train(task, {name: 1.0}, LossParams(beta=beta, **overrides), lr)
    assert len(losses) == STEPS
    _assert_finite_and_falls(losses)


def test_weighted_combination_falls_when_training_on_max_task(task) -> None:
    """A ``loss.weights`` mix, TRL's MPO example ``{sigmoid: 0.8, bco_pair: 0.2, sft: 1.0}``, trains:
    its weighted loss stays finite and falls, with the quickstart's lr and beta and no per-term
    tuning (``bco_delta`` stays 0, as no caller updates it here)."""
    losses = _train(task, {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0}, LossParams(beta=BETA), LR)
    _assert_finite_and_falls(losses)
