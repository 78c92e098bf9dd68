"""Tests of ``raydpo.logprobs``.

The contract (../shared/ARCHITECTURE.md): a sequence log-prob is the sum over completion tokens of
``log p(token | prefix)``; prompt and padding tokens never count; every layout gives the same number.

``sequence_logps`` is checked against ``reference_logps``, an independent float64 loop written from
that definition: for each row i and position t >= 1 with ``completion_mask[i, t] == 1``, add
``log_softmax(logits[i, t - 1] as float64)[ids[i, t]]``.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydpo.logprobs import collate, model_sequence_logps, pair_batch, sequence_logps
from raydpo.models import build_tiny_model, build_tiny_tokenizer

PAD = 0

# Three pairs of (prompt, completion) id lists of different lengths, so both layouts pad.
PROMPTS = [[4, 10, 11, 12, 13], [4, 14], [4, 15, 16, 17]]
COMPLETIONS = [[5, 30, 31, 2], [5, 32, 33, 34, 35, 36, 37, 2], [5, 38, 2]]


def reference_logps(logits: torch.Tensor, ids: torch.Tensor, completion_mask: torch.Tensor) -> list[float]:
    """The definition, one token at a time, in float64."""
    out = []
    for i in range(ids.shape[0]):
        total = 0.0
        for t in range(1, ids.shape[1]):
            if int(completion_mask[i, t]) == 1:
                row = torch.log_softmax(logits[i, t - 1].to(torch.float64), dim=-1)
                total += float(row[int(ids[i, t])])
        out.append(total)
    return out


def random_logits(batch: dict[str, torch.Tensor], vocab: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, t = batch["input_ids"].shape
    return torch.randn(n, t, vocab, generator=g) * scale


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sequence_logps_matches_float64_loop(left_pad: bool, seed: int) -> None:
    batch = collate(PROMPTS, COMPLETIONS, PAD, left_pad=left_pad)
    logits = random_logits(batch, vocab=50, seed=seed)
    got = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    want = reference_logps(logits, batch["input_ids"], batch["completion_mask"])
    assert got.shape == (3,)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_collate_layouts() -> None:
    """Right padding puts the sequence at the start, left padding at the end; position ids count
    real tokens only; the completion mask has exactly len(completion) ones, on the completion."""
    for left_pad in (False, True):
        b = collate(PROMPTS, COMPLETIONS, PAD, left_pad=left_pad)
        width = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))
        assert b["input_ids"].shape == (3, width)
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            n = len(p) + len(c)
            start = width - n if left_pad else 0
            assert b["input_ids"][i, start : start + n].tolist() == p + c
            assert b["attention_mask"][i].sum() == n
            assert b["attention_mask"][i, start : start + n].tolist() == [1] * n
            assert b["position_ids"][i, start : start + n].tolist() == list(range(n))
            assert b["completion_mask"][i].sum() == len(c)
            assert b["completion_mask"][i, start + len(p) : start + n].tolist() == [1] * len(c)
            pads = [t for t in range(width) if not start <= t < start + n]
            assert all(int(b["input_ids"][i, t]) == PAD for t in pads)


@pytest.mark.parametrize("left_pad", [False, True], ids=["right_pad", "left_pad"])
def test_prompt_and_pad_positions_never_count(left_pad: bool) -> None:
    """Scrambling every logit row whose next token is a prompt or pad token, and every id that is
    not a completion token, leaves the result unchanged; changing one completion-target logit does not."""
    batch = collate(PROMPTS, COMPLETIONS, PAD, left_pad=left_pad)
    logits = random_logits(batch, vocab=50, seed=3)
    ids, mask = batch["input_ids"], batch["completion_mask"]
    base = sequence_logps(logits, ids, mask)

    g = torch.Generator().manual_seed(4)
    scrambled_logits = logits.clone()
    scrambled_ids = ids.clone()
    n, width = ids.shape
    scrambled_rows = 0
    for i in range(n):
        for t in range(width):
            if t >= 1 and int(mask[i, t]) == 0:
                # logits[t-1] predicts ids[t], a prompt or pad token.
                scrambled_logits[i, t - 1] = torch.randn(50, generator=g) * 10
                scrambled_rows += 1
            if int(mask[i, t]) == 0:
                scrambled_ids[i, t] = int(torch.randint(0, 50, (1,), generator=g))
        scrambled_logits[i, width - 1] = torch.randn(50, generator=g) * 10  # the last row predicts nothing
    assert scrambled_rows > 0
    assert not torch.equal(scrambled_ids, ids)
    torch.testing.assert_close(sequence_logps(scrambled_logits, scrambled_ids, mask), base, rtol=0, atol=0)

    # A completion target does count: raise the logit of row 1's first completion token.
    i = 1
    t = int(mask[i].nonzero()[0])
    changed = logits.clone()
    changed[i, t - 1, int(ids[i, t])] += 2.0
    after = sequence_logps(changed, ids, mask)
    assert after[i] > base[i] + 1e-3
    torch.testing.assert_close(after[[0, 2]], base[[0, 2]], rtol=0, atol=0)


def test_hand_worked_vocab_3() -> None:
    """Vocabulary of 3, one right-padded batch of two sequences built by ``collate``.

    Row 0: prompt [0], completion [1, 2] -> ids [0, 1, 2], completion_mask [0, 1, 1].
        logits[0] = [0, 0, 0]           -> p(1) = 1/3
        logits[1] = [0, 0, ln 2]        -> p(2) = 2 / (1 + 1 + 2) = 1/2
        logits[2] = [9, 9, 9] (predicts nothing)
        expected = ln(1/3) + ln(1/2) = -ln 6 = -1.791759469228055
    Row 1: prompt [2, 0], completion [1] -> ids [2, 0, 1], completion_mask [0, 0, 1].
        logits[0] = [5, -5, 5] (predicts the prompt token 0: does not count)
        logits[1] = [ln 3, 0, 0]        -> p(1) = 1 / (3 + 1 + 1) = 1/5
        expected = ln(1/5) = -1.6094379124341003
    """
    batch = collate([[0], [2, 0]], [[1, 2], [1]], pad_id=0)
    assert batch["input_ids"].tolist() == [[0, 1, 2], [2, 0, 1]]
    assert batch["completion_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [0.0, 0.0, ln2], [9.0, 9.0, 9.0]],
            [[5.0, -5.0, 5.0], [ln3, 0.0, 0.0], [9.0, 9.0, 9.0]],
        ]
    )
    got = sequence_logps(logits, batch["input_ids"], batch["completion_mask"])
    torch.testing.assert_close(got, torch.tensor([-1.791759469228055, -1.6094379124341003]), rtol=1e-6, atol=1e-6)


def test_bf16_logits_give_float32_close_to_upcast() -> None:
    """bf16 logits: the result is float32 and equals the float64 definition applied to the same
    bf16 values upcast (so no bf16 log-softmax happens inside)."""
    batch = collate(PROMPTS, COMPLETIONS, PAD, left_pad=True)
    logits16 = random_logits(batch, vocab=50, seed=5).to(torch.bfloat16)
    got = sequence_logps(logits16, batch["input_ids"], batch["completion_mask"])
    assert got.dtype == torch.float32
    upcast = sequence_logps(logits16.float(), batch["input_ids"], batch["completion_mask"])
    torch.testing.assert_close(got, upcast, rtol=1e-6, atol=1e-6)
    want = torch.tensor(reference_logps(logits16, batch["input_ids"], batch["completion_mask"]), dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # A bf16 log-softmax would be far off: the upcast is what keeps the error small.
    ids, mask = batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:]
    bf16_lsm = torch.log_softmax(logits16[:, :-1], dim=-1).gather(2, ids.unsqueeze(-1)).squeeze(-1)
    bf16_sum = (bf16_lsm.double() * mask).sum(-1)
    assert (bf16_sum - want).abs().max() > (got.double() - want).abs().max()


def test_pair_batch_chosen_rows_then_rejected_rows() -> None:
    prompts = [[4, 10, 11], [4, 12]]
    chosen = [[5, 20, 2], [5, 21, 22, 23, 2]]
    rejected = [[5, 30, 31, 32, 2], [5, 2]]
    b = pair_batch(prompts, chosen, rejected, PAD)
    assert b["input_ids"].shape[0] == 4
    rows = [p + c for p, c in zip(prompts, chosen)] + [p + r for p, r in zip(prompts, rejected)]
    completions = chosen + rejected
    for i, (row, comp) in enumerate(zip(rows, completions)):
        assert b["input_ids"][i, : len(row)].tolist() == row
        assert int(b["completion_mask"][i].sum()) == len(comp)
        assert b["completion_mask"][i, len(row) - len(comp) : len(row)].tolist() == [1] * len(comp)


def test_pair_batch_accepts_numpy_int32_rows() -> None:
    """Tokenized rows arrive from Ray Data as int32 numpy arrays."""
    prompts = [np.array([4, 10], dtype=np.int32)]
    chosen = [np.array([5, 20, 2], dtype=np.int32)]
    rejected = [np.array([5, 2], dtype=np.int32)]
    b = pair_batch(prompts, chosen, rejected, PAD)
    assert b["input_ids"].dtype == torch.long
    assert b["input_ids"].tolist() == [[4, 10, 5, 20, 2], [4, 10, 5, 2, PAD]]
    assert b["completion_mask"].sum(-1).tolist() == [3, 2]


# --- a real forward ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), hidden_size=32, num_layers=2, num_heads=4, seed=0)
    model.eval()
    return model


def test_model_logps_same_for_left_right_padding_and_alone(tiny_model: torch.nn.Module) -> None:
    """Left- and right-padded batches give the same per-sequence log-probs (position ids count real
    tokens), and both equal running each sequence alone, unpadded, scored by the float64 loop."""
    with torch.no_grad():
        right, _ = model_sequence_logps(tiny_model, collate(PROMPTS, COMPLETIONS, PAD, left_pad=False))
        left, _ = model_sequence_logps(tiny_model, collate(PROMPTS, COMPLETIONS, PAD, left_pad=True))
        alone = []
        for p, c in zip(PROMPTS, COMPLETIONS):
            b = collate([p], [c], PAD)
            assert int(b["attention_mask"].sum()) == len(p) + len(c)  # no padding at all
            logits = tiny_model(input_ids=b["input_ids"]).logits
            alone.append(reference_logps(logits, b["input_ids"], b["completion_mask"])[0])
    assert torch.isfinite(left).all() and torch.isfinite(right).all()
    assert (right < 0).all()
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right.double(), torch.tensor(alone, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_model_logps_depend_on_completion(tiny_model: torch.nn.Module) -> None:
    """Sanity for the test above: a different completion gives a different log-prob."""
    other = [[5, 40, 41, 2], COMPLETIONS[1], COMPLETIONS[2]]
    with torch.no_grad():
        a, _ = model_sequence_logps(tiny_model, collate(PROMPTS, COMPLETIONS, PAD))
        b, _ = model_sequence_logps(tiny_model, collate(PROMPTS, other, PAD))
    assert abs(float(a[0] - b[0])) > 1e-3
