"""Tests of ``raydpo.logprobs``: the chunked head, the layouts, the scorer.

The contract (../shared/ARCHITECTURE.md): a sequence log-prob is the sum over completion tokens of
``log p(token | prefix)``; prompt and padding tokens never count; every layout gives the same number.

The independent computation everything is checked against: full ``(M, V)`` logits in float64,
``log_softmax`` over them, one token at a time (``float64_head``), and for whole models, each
sequence run alone, unpadded, with its full logits in float64 (``float64_alone``).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from raydpo.logprobs import (
    HeadTransform,
    PolicyScorer,
    collate,
    head_logps,
    model_sequence_logps,
    pack,
    pack_rows,
    pair_batch,
    packed_logps,
    to_device,
)
from raydpo.models import build_tiny_model

PAD = 0
VOCAB = 60

# Three (prompt, completion) id lists of different lengths, so padded layouts pad.
PROMPTS = [[4, 10, 11, 12, 13], [4, 14], [4, 15, 16, 17]]
COMPLETIONS = [[5, 30, 31, 2], [5, 32, 33, 34, 35, 36, 37, 2], [5, 38, 2]]


def float64_head(hidden, weight, targets, bias=None, transform=HeadTransform()):
    """The definition, unchunked, in float64: ``(logp, mean logit, entropy)`` per position."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * transform.scale
    if transform.softcap is not None:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    lsm = torch.log_softmax(z, -1)
    logp = torch.stack([lsm[m, int(targets[m])] for m in range(len(targets))])
    return logp, z.mean(-1), -(lsm.exp() * lsm).sum(-1)


def _head_inputs(m: int, h: int, v: int, seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, v, (m,), generator=g)
    grad_out = torch.randn(m, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, grad_out


@pytest.mark.parametrize("chunk", [1, 7, 10_000], ids=["chunk1", "chunk_prime", "chunk_longer"])
@pytest.mark.parametrize(
    "transform,bias",
    [(HeadTransform(), False), (HeadTransform(), True), (HeadTransform(scale=0.5, softcap=3.0), False)],
    ids=["plain", "bias", "scale_softcap"],
)
def test_head_matches_float64_values_and_gradients(chunk: int, transform: HeadTransform, bias: bool) -> None:
    """logp, mean logit and entropy, and d(logp . g)/d(hidden, weight, bias), equal the unchunked
    float64 computation to 1e-5 in float32, whatever the chunk size (1, a prime, longer than M)."""
    hidden, weight, b, targets, g_out = _head_inputs(m=23, h=16, v=41, seed=chunk, bias=bias)
    leaves64 = [t.clone().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    want = float64_head(*leaves64[:2], targets, leaves64[2] if bias else None, transform)
    want_grads = torch.autograd.grad((want[0] * g_out).sum(), leaves64)

    leaves32 = [t.float().requires_grad_() for t in (hidden, weight) + ((b,) if bias else ())]
    got = head_logps(leaves32[0], leaves32[1], targets, bias=leaves32[2] if bias else None,
                     chunk_tokens=chunk, transform=transform)
    assert all(t.dtype == torch.float32 and t.shape == (23,) for t in got)
    for a, w in zip(got, want):
        torch.testing.assert_close(a.double(), w.detach(), rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad((got[0] * g_out.float()).sum(), leaves32)
    for a, w in zip(got_grads, want_grads):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


def test_head_hand_worked_vocab_3() -> None:
    """V = 3, H = 1, weight = [[0], [0], [ln 2]], so z = h * [0, 0, ln 2].

    h = 1, target 2: z = [0, 0, ln 2], p(2) = 2 / (1 + 1 + 2) = 1/2 -> logp = -ln 2;
        mean logit = ln 2 / 3; entropy = -(2 * 1/4 ln 1/4 + 1/2 ln 1/2) = 1.5 ln 2.
    h = 0, target 0: z = [0, 0, 0], p = 1/3 -> logp = -ln 3; mean 0; entropy ln 3.
    """
    ln2, ln3 = math.log(2.0), math.log(3.0)
    logp, mean, entropy = head_logps(torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [0.0], [ln2]]),
                                     torch.tensor([2, 0]), chunk_tokens=1)
    torch.testing.assert_close(logp, torch.tensor([-ln2, -ln3]))
    torch.testing.assert_close(mean, torch.tensor([ln2 / 3, 0.0]))
    torch.testing.assert_close(entropy, torch.tensor([1.5 * ln2, ln3]))


def test_head_bf16_autocast_keeps_float32_log_softmax() -> None:
    """Under bf16 autocast the matmul runs in bf16 but the log-softmax in float32: the result is
    float32 and within bf16 matmul rounding of the float64 definition."""
    hidden, weight, _, targets, _ = _head_inputs(m=9, h=16, v=41, seed=5, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, _, _ = head_logps(hidden.float(), weight.float(), targets, chunk_tokens=4)
    assert logp.dtype == torch.float32
    want = float64_head(hidden, weight, targets)[0]
    torch.testing.assert_close(logp.double(), want, rtol=0, atol=0.1)


# --- layouts ------------------------------------------------------------------------------------


def test_collate_layout_scores_completion_positions_only() -> None:
    """Right and left padding: each sequence sits where expected, position ids count real tokens,
    and the scored positions are exactly those whose next token is a completion token."""
    for left_pad in (False, True):
        b = collate(PROMPTS, COMPLETIONS, PAD, left_pad=left_pad)
        width = max(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))
        assert b["input_ids"].shape == (3, width)
        want_index, want_segment = [], []
        for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS)):
            n = len(p) + len(c)
            start = width - n if left_pad else 0
            assert b["input_ids"][i, start : start + n].tolist() == p + c
            assert b["attention_mask"][i, start : start + n].tolist() == [1] * n
            assert int(b["attention_mask"][i].sum()) == n
            assert b["position_ids"][i, start : start + n].tolist() == list(range(n))
            want_index += [i * width + start + t - 1 for t in range(len(p), n)]
            want_segment += [i] * len(c)
        assert b["score_index"].tolist() == want_index
        assert b["segment"].tolist() == want_segment
        assert b["targets"].tolist() == [t for c in COMPLETIONS for t in c]


def test_pack_layout_one_row_positions_restart() -> None:
    b = pack(PROMPTS, COMPLETIONS)
    seqs = [p + c for p, c in zip(PROMPTS, COMPLETIONS)]
    assert b["input_ids"].tolist() == [sum(seqs, [])]
    assert b["position_ids"].tolist() == [sum((list(range(len(s))) for s in seqs), [])]
    assert "attention_mask" not in b
    assert b["targets"].tolist() == [t for c in COMPLETIONS for t in c]
    assert b["segment"].tolist() == sum(([i] * len(c) for i, c in enumerate(COMPLETIONS)), [])


def test_pack_rows_first_fit_under_the_budget() -> None:
    """Longest first, each into the first row with room; an over-long sequence gets its own row;
    the tail of a short row is a run of padding with its own positions, never scored."""
    assert pack_rows([5, 9, 3, 12, 4], 12) == [[3], [1, 2], [0, 4]]
    assert pack_rows([5, 9], None) == [[0, 1]]
    assert pack_rows([20, 2], 8) == [[0], [1]]
    b = pack([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0, max_tokens=5)
    assert b["input_ids"].tolist() == [[1, 2, 4, 5, 6], [3, 7, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 0, 1, 2]]
    assert b["score_index"].tolist() == [1, 2, 3, 5] and b["segment"].tolist() == [0, 0, 0, 1]


def test_pair_batch_chosen_then_rejected_and_numpy_int32() -> None:
    """Sequence i is pair i's chosen, B + i its rejected; int32 numpy rows (Ray Data) are accepted."""
    prompts = [np.array([4, 10], dtype=np.int32), np.array([4], dtype=np.int32)]
    chosen = [np.array([5, 20, 2], dtype=np.int32), np.array([5, 21, 22, 2], dtype=np.int32)]
    rejected = [np.array([5, 2], dtype=np.int32), np.array([5, 30, 2], dtype=np.int32)]
    for packed in (False, True):
        b = pair_batch(prompts, chosen, rejected, PAD, packed=packed)
        assert int(b["num_sequences"]) == 4
        assert b["input_ids"].dtype == torch.long
        counts = torch.bincount(b["segment"], minlength=4).tolist()
        assert counts == [3, 4, 2, 3]


# --- a real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model() -> torch.nn.Module:
    # 2 heads of 32: the width vLLM's CPU kernels also accept, and SDPA takes the packed mask.
    return build_tiny_model(VOCAB, hidden_size=64, num_layers=2, num_heads=2, seed=0).eval()


def float64_alone(model: torch.nn.Module, prompts, completions) -> torch.Tensor:
    """Each sequence alone, no padding, full logits, float64 log-softmax, token by token."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([list(p) + list(c)])
        lsm = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(lsm[t - 1, int(ids[0, t])] for t in range(max(len(p), 1), ids.shape[1])))
    return torch.stack(out)


LAYOUTS = {
    "right_pad": lambda p, c: collate(p, c, PAD),
    "left_pad": lambda p, c: collate(p, c, PAD, left_pad=True),
    "packed": pack,
    "packed_rows": lambda p, c: pack(p, c, PAD, max_tokens=12),  # rows of 12 + 9 and 5 + pad
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk", [1, 7, 10_000])
def test_model_logps_every_layout_equals_float64_alone(tiny_model, layout: str, chunk: int) -> None:
    with torch.no_grad():
        got = PolicyScorer(tiny_model, chunk)(**LAYOUTS[layout](PROMPTS, COMPLETIONS)).logps
        want = float64_alone(tiny_model, PROMPTS, COMPLETIONS)
    assert got.dtype == torch.float32 and (got < 0).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _param_grads(model: torch.nn.Module, layout: dict, g_out: torch.Tensor, chunk: int) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (PolicyScorer(model, chunk)(**layout).logps * g_out).sum().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_packed_and_padded_gradients_equal(tiny_model) -> None:
    """d(sum_i g_i logp_i)/d(every parameter), tied head included, agrees across layouts and chunk
    sizes to 1e-5, and with the float64 full-logits computation."""
    model = tiny_model.train()
    g_out = torch.tensor([0.7, -1.3, 2.0])
    grads = {name: _param_grads(model, fn(PROMPTS, COMPLETIONS), g_out, chunk)
             for name, fn in LAYOUTS.items() for chunk in (3, 10_000)}
    model.zero_grad(set_to_none=True)
    (float64_alone(model, PROMPTS, COMPLETIONS) * g_out.double()).sum().backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.eval()
    assert set(want) and all(set(g) == set(want) for g in grads.values())
    for g in grads.values():
        for k in want:
            torch.testing.assert_close(g[k], want[k], rtol=1e-5, atol=1e-5)


def test_packed_boundaries_never_leak(tiny_model) -> None:
    """At the sequence boundaries of a pack: changing every token of sequence 1 leaves the log-probs
    of sequences 0 and 2 unchanged (no attention across boundaries, positions restart), a prompt of
    one token scores from position 0, and the first token of the next sequence is never a target."""
    prompts = [[4], [4, 14], [4, 15, 16]]
    completions = [[30, 2], [5, 32, 2], [38]]
    other = [[4], [9, 9, 9, 9, 9, 9], [4, 15, 16]]
    other_c = [[30, 2], [9, 9], [38]]
    with torch.no_grad():
        a = PolicyScorer(tiny_model, 2)(**pack(prompts, completions)).logps
        b = PolicyScorer(tiny_model, 2)(**pack(other, other_c)).logps
        want = float64_alone(tiny_model, prompts, completions)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=0, atol=1e-6)
    assert abs(float(a[1] - b[1])) > 1e-3
    torch.testing.assert_close(a.double(), want, rtol=1e-5, atol=1e-5)
    layout = pack(prompts, completions)
    # Sequences at [0, 3), [3, 8), [8, 12): positions predicting completion tokens, never a
    # sequence's last position (it would predict the next sequence's first token).
    assert layout["score_index"].tolist() == [0, 1, 4, 5, 6, 10]


def test_to_device_moves_tensors_and_keeps_the_host_bounds(tiny_model) -> None:
    """The training step's path: ``to_device`` moves a packed layout's tensors and leaves its
    ``bounds`` (host ints) and ``num_sequences`` alone; the scorer gives float64's log-probs on it."""
    from raydpo.attention import PackedBounds

    layout = pack(PROMPTS, COMPLETIONS, PAD, max_tokens=12)
    moved = to_device(layout, torch.device("cpu"))
    assert set(moved) == set(layout)
    assert moved["bounds"] is layout["bounds"] and isinstance(moved["bounds"], PackedBounds)
    assert moved["num_sequences"] is layout["num_sequences"]
    assert all(isinstance(v, torch.Tensor) for k, v in moved.items() if k != "bounds")
    with torch.no_grad():
        got = PolicyScorer(tiny_model)(**moved).logps
        want = float64_alone(tiny_model, PROMPTS, COMPLETIONS)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_packed_logps_equal_float64_alone(tiny_model) -> None:
    """The reference actors' layout (packed rows under a token budget, a longer sequence alone)
    goes through the same scorer, in input order, forwarding only real tokens."""
    got, forwarded = packed_logps(tiny_model, PROMPTS, COMPLETIONS, PAD, batch_tokens=20, chunk_tokens=5)
    with torch.no_grad():
        want = float64_alone(tiny_model, PROMPTS, COMPLETIONS)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert forwarded == sum(len(p) + len(c) for p, c in zip(PROMPTS, COMPLETIONS))


def test_model_sequence_logps_depend_on_completion(tiny_model) -> None:
    other = [[5, 40, 41, 42, 43, 2], COMPLETIONS[1], COMPLETIONS[2]]  # two more tokens: about -2 ln 60
    with torch.no_grad():
        a = model_sequence_logps(tiny_model, collate(PROMPTS, COMPLETIONS, PAD))
        b = model_sequence_logps(tiny_model, collate(PROMPTS, other, PAD))
    assert abs(float(a[0] - b[0])) > 1e-3
    torch.testing.assert_close(a[1:], b[1:])


def test_scorer_rejects_a_lora_head(tiny_model) -> None:
    """A head that is not a plain Linear (LoRA on lm_head) cannot be chunked by its weight alone."""
    import peft
    import copy

    lm = peft.get_peft_model(copy.deepcopy(tiny_model), peft.LoraConfig(r=2, target_modules=["lm_head", "q_proj"]))
    with pytest.raises(ValueError, match="plain torch.nn.Linear"):
        PolicyScorer(lm)


def test_packed_rows_carry_host_bounds_and_match_the_block_mask(tiny_model) -> None:
    """A packed layout carries its boundaries as host ints (flash-attention's ``cu_seq_lens``); an
    SDPA model is switched to ``raydpo_varlen`` and gives what transformers' own ``sdpa`` with its
    block-diagonal mask (read from the restarting position ids) gives, on the full logits."""
    import copy

    from raydpo.attention import NAME, PackedBounds

    layout = pack(PROMPTS, COMPLETIONS, PAD, max_tokens=12)
    # Lengths 9, 10, 7 under 12: three rows of width 10: [10], [9 + 1 pad], [7 + 3 pad].
    assert layout["bounds"] == PackedBounds((0, 10, 19, 20, 27, 30))
    masked = copy.deepcopy(tiny_model)
    masked.config._attn_implementation = "sdpa"
    with torch.no_grad():
        varlen = PolicyScorer(tiny_model)(**layout).logps
        assert tiny_model.config._attn_implementation == NAME
        logits = masked(input_ids=layout["input_ids"], position_ids=layout["position_ids"]).logits
    lsm = torch.log_softmax(logits.reshape(-1, VOCAB).double(), -1)
    picked = lsm[layout["score_index"], layout["targets"]]
    block = torch.zeros(3, dtype=torch.float64).index_add(0, layout["segment"], picked)
    torch.testing.assert_close(varlen.double(), block, rtol=1e-5, atol=1e-5)
