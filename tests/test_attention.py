"""Tests of ``raydpo.attention``: packed attention that keeps sequences apart, reads nothing back
from the device inside a layer, and builds no ``L x L`` mask.

The independent computation: causal softmax attention written out in float64, one sequence at a
time (``float64_attention``). Model-level log-probs and gradients against float64 are in
tests/test_logprobs.py (every layout, packed included, goes through this module there).
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.utils.checkpoint
from transformers import LlamaConfig, LlamaForCausalLM

from raydpo import attention
from raydpo.attention import FLASH, NAME, PackedBounds, choose, per_sequence_attention
from raydpo.logprobs import PolicyScorer, collate, pack

VOCAB = 60
PROMPTS = [[4, 10, 11, 12, 13], [4, 14], [4, 15, 16, 17], [4]]
COMPLETIONS = [[5, 30, 31, 2], [5, 32, 33, 34, 35, 36, 37, 2], [5, 38, 2], [7]]


def float64_attention(q, k, v, bounds: tuple[int, ...], scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal) v per run, float64, query head h reading KV head h // (H / Hkv)."""
    h, hk = q.shape[1], k.shape[1]
    out = torch.zeros(q.shape[1:], dtype=torch.float64)
    for s, e in zip(bounds[:-1], bounds[1:]):
        for head in range(h):
            kv = head // (h // hk)
            scores = q[0, head, s:e].double() @ k[0, kv, s:e].double().t() * scale
            causal = torch.ones(e - s, e - s, dtype=torch.bool).tril()
            weights = torch.softmax(scores.masked_fill(~causal, -math.inf), -1)
            out[head, s:e] = weights @ v[0, kv, s:e].double()
    return out.unsqueeze(0)


def test_packed_bounds_by_hand() -> None:
    """Runs of 3, 1, 2 tokens; bounds that do not start at 0 or do not increase are refused."""
    b = PackedBounds((0, 3, 4, 6))
    assert b.lengths == (3, 1, 2) and b.longest == 3
    for bad in ((0,), (1, 3), (0, 3, 3), (0, 4, 2)):
        with pytest.raises(ValueError, match="strictly increase"):
            PackedBounds(bad)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_per_sequence_attention_equals_float64_values_and_gradients(heads: int, kv_heads: int) -> None:
    """Runs of 5, 1, 7, 3 tokens (a one-token run included): outputs and d(out . g)/d(q, k, v) equal
    per-sequence causal attention in float64 to 1e-5, and a run's output depends on that run only."""
    bounds = (0, 5, 6, 13, 16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 16, 8, generator=g, dtype=torch.float64) for n in (heads, kv_heads, kv_heads))
    grad = torch.randn(1, heads, 16, 8, generator=g, dtype=torch.float64)
    scale = 0.3
    leaves64 = [x.clone().requires_grad_() for x in (q, k, v)]
    want = float64_attention(*leaves64, bounds, scale)
    want_grads = torch.autograd.grad((want * grad).sum(), leaves64)

    leaves32 = [x.float().requires_grad_() for x in (q, k, v)]
    got = per_sequence_attention(*leaves32, PackedBounds(bounds), scale=scale)
    assert got.shape == (1, heads, 16, 8) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for a, w in zip(torch.autograd.grad((got * grad.float()).sum(), leaves32), want_grads):
        torch.testing.assert_close(a.double(), w, rtol=1e-5, atol=1e-5)


def _model(num_heads: int = 4, num_kv_heads: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=num_heads, num_key_value_heads=num_kv_heads, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _float64_alone(model, prompts, completions) -> torch.Tensor:
    """Each sequence alone, unpadded, full logits, float64 log-softmax."""
    out = []
    for p, c in zip(prompts, completions):
        ids = torch.tensor([p + c])
        lsm = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        out.append(sum(lsm[t - 1, ids[0, t]] for t in range(max(len(p), 1), ids.shape[1])))
    return torch.stack(out)


SYNCS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def no_sync_in_layers(layers: torch.nn.ModuleList):
    """While any module of a decoder layer runs (its forward, and its recomputation under gradient
    checkpointing, which calls the layer's submodules again), each of ``SYNCS`` on a tensor raises:
    on a GPU each is a device-to-host read that stalls the host until the device catches up."""
    depth = [0]
    calls: list[str] = []

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    def guard(name, original):
        def method(self, *args, **kwargs):
            if depth[0] > 0:
                calls.append(name)
                raise AssertionError(f"Tensor.{name} inside a decoder layer")
            return original(self, *args, **kwargs)
        return method

    handles = [h for layer in layers for m in layer.modules()
               for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, guard(name, original))
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
        for h in handles:
            h.remove()


def test_packed_forward_backward_reads_nothing_back_inside_a_layer() -> None:
    """A packed forward and backward with gradient checkpointing on: no ``tolist`` / ``item`` /
    ``bool`` / ... on a tensor inside any decoder layer (the boundaries are host ints), the layers
    get no attention mask (no ``L x L`` mask is built),
    and the guard itself is live: the same call outside the layers still works."""
    model = _model().train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    scorer = PolicyScorer(model, chunk_tokens=5)
    layout = pack(PROMPTS, COMPLETIONS, max_tokens=12)
    masks, attention_calls = [], []
    model.model.layers[0].register_forward_pre_hook(
        lambda _m, _a, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: attention_calls.append(1))
    # Early stop would end a recomputation mid-layer, before its modules' forward hooks run.
    with no_sync_in_layers(model.model.layers) as calls, torch.utils.checkpoint.set_checkpoint_early_stop(False):
        scorer(**layout).logps.sum().backward()
        assert torch.tensor([1, 2]).tolist() == [1, 2]  # outside a layer: allowed
    assert calls == []
    assert len(attention_calls) == 2  # the forward and its recomputation, both guarded
    assert model.config._attn_implementation == NAME
    assert masks == [None]
    assert all(p.grad is not None for p in model.parameters())


def test_the_guard_catches_a_read_back_inside_a_layer() -> None:
    """The guard fails a forward whose layer reads a tensor back (here transformers' own eager
    attention with a padded batch reads nothing, so a layer hook does the reading)."""
    model = _model()
    model.model.layers[1].mlp.register_forward_hook(lambda _m, _i, out: out.sum().item())
    with no_sync_in_layers(model.model.layers) as calls, pytest.raises(AssertionError, match="Tensor.item"):
        PolicyScorer(model)(**pack(PROMPTS, COMPLETIONS))
    assert calls == ["item"]


def test_gqa_model_packed_equals_padded_float64_gradients() -> None:
    """A grouped-query model (4 query heads, 2 KV heads): packed rows and a padded batch give the
    same log-probs and parameter gradients to 1e-5 as each sequence alone in float64."""
    model = _model().train()
    g_out = torch.tensor([0.7, -1.3, 2.0, 0.5])

    def grads(layout) -> tuple[torch.Tensor, dict]:
        model.zero_grad(set_to_none=True)
        logps = PolicyScorer(model, chunk_tokens=3)(**layout).logps
        (logps * g_out).sum().backward()
        return logps.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    want = _float64_alone(model, PROMPTS, COMPLETIONS)
    (want * g_out.double()).sum().backward()
    want_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    for layout in (pack(PROMPTS, COMPLETIONS), pack(PROMPTS, COMPLETIONS, max_tokens=12),
                   collate(PROMPTS, COMPLETIONS, 0)):
        logps, got = grads(layout)
        torch.testing.assert_close(logps.double(), want.detach(), rtol=1e-5, atol=1e-5)
        for k in want_grads:
            torch.testing.assert_close(got[k], want_grads[k].float(), rtol=1e-5, atol=1e-5)


def test_an_eager_model_stays_eager_and_packs_by_the_block_mask() -> None:
    """An eager model (as Gemma 2 loads, for its attention softcap) is left eager by the scorer; its
    packed rows go through transformers' block-diagonal mask and equal each sequence alone."""
    model = _model()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        got = PolicyScorer(model)(**pack(PROMPTS, COMPLETIONS, max_tokens=12)).logps
        want = _float64_alone(model, PROMPTS, COMPLETIONS)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_choose_the_implementation() -> None:
    """Flash varlen only on CUDA, in bf16/fp16, with flash_attn importable; else raydpo_varlen; an
    eager model (Gemma 2's softcap) stays eager."""
    model = _model()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose(model, cpu, torch.float32) == NAME
    assert choose(model, cpu, torch.bfloat16) == NAME
    flash_importable = attention.is_flash_attn_2_available
    try:
        attention.is_flash_attn_2_available = lambda: True  # the machine's install, not the logic under test
        assert choose(model, cuda, torch.bfloat16) == FLASH
        assert choose(model, cuda, torch.float16) == FLASH
        assert choose(model, cuda, torch.float32) == NAME  # flash-attn takes half precision only
        assert choose(model, cpu, torch.bfloat16) == NAME
        attention.is_flash_attn_2_available = lambda: False
        assert choose(model, cuda, torch.bfloat16) == NAME
    finally:
        attention.is_flash_attn_2_available = flash_importable
    model.config._attn_implementation = "eager"
    assert choose(model, cpu, torch.float32) == "eager"


def test_flash_keywords_are_device_ints_and_host_maxima() -> None:
    """For flash varlen: ``cu_seq_lens_q/k`` int32 tensors equal to the bounds, ``max_length_q/k``
    Python ints (transformers then calls the varlen kernel straight, reading nothing back); an eager
    model and a padded layout get no keywords."""
    bounds = PackedBounds((0, 3, 10, 12))
    with attention.packed(FLASH, bounds, torch.device("cpu")) as kw:
        assert kw["cu_seq_lens_q"] is kw["cu_seq_lens_k"]
        assert kw["cu_seq_lens_q"].dtype == torch.int32 and kw["cu_seq_lens_q"].tolist() == [0, 3, 10, 12]
        assert kw["max_length_q"] == kw["max_length_k"] == 7 and type(kw["max_length_q"]) is int
    with attention.packed("eager", bounds, torch.device("cpu")) as kw:
        assert kw == {}
    with attention.packed(NAME, None, torch.device("cpu")) as kw:
        assert kw == {}


def test_a_short_sliding_window_or_a_softcap_is_refused() -> None:
    """Each sequence runs plain causal SDPA: a model whose window is shorter than a packed sequence,
    or whose attention has a softcap, would compute something else, so it fails naming the fix."""
    bounds = PackedBounds((0, 6, 9))
    q = torch.randn(1, 2, 9, 4)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="train.packing off"):
        attention.varlen_sdpa_forward(module, q, q, q, None, sliding_window=4, raydpo_packing=bounds)
    with pytest.raises(ValueError, match="eager attention"):
        attention.varlen_sdpa_forward(module, q, q, q, None, softcap=50.0, raydpo_packing=bounds)
    out, _ = attention.varlen_sdpa_forward(module, q, q, q, None, sliding_window=6, raydpo_packing=bounds)
    assert out.shape == (1, 9, 2, 4)
