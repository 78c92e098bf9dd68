"""Packed attention on CPU: three ways to run causal attention over sequences packed into one row.

Every variant gets the same inputs: ``q (1, H, T, D)``, ``k``/``v`` ``(1, Hkv, T, D)`` over the T
tokens of a packed micro-batch, and the sequence boundaries as host integers (computed once per
micro-batch, as the scorer does). Two passes are timed: forward+backward (the update step) and
forward alone (no_grad: eval, reference scoring); the per-micro-batch set-up (padding index,
BlockMask) and the compile are timed apart.

- ``per_sequence`` (what raydpo runs, :func:`raydpo.attention.per_sequence_attention`): one causal
  SDPA per sequence over ``split`` pieces, outputs concatenated.
- ``sliced``: the same over slices, the loop raydpo ran before (each slice's backward writes a
  zero tensor of the whole row).
- ``padded``: the sequences gathered
  into an ``(N, H, Lmax, D)`` batch, one causal SDPA (right padding needs no mask under a causal
  mask), scattered back.
- ``flex_eager`` / ``flex_compiled``: torch's FlexAttention over the whole row with a
  block-causal-document BlockMask, eager (unfused: materialises the T x T scores) and under
  ``torch.compile``. torch 2.13 has no FlexAttention backward on CPU: forward only.

Prints one JSON object: per shape and pass, each variant's tokens/s (median of ``--repeats``, the
variants taking turns) and its ratio to ``per_sequence``; the set-up and compile times in seconds.

    CI=true nice .venv/bin/python bench/packed_attention.py --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # no compile worker pool competing with the timings
import torch  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from raydpo.attention import PackedBounds, per_sequence_attention  # noqa: E402

SHAPES = {
    # SmolLM2-135M's attention: 9 query heads of 64, 3 KV heads; 16 sequences of 100-500 tokens.
    "smollm2_16x100-500": dict(heads=9, kv_heads=3, head_dim=64, sequences=16, shortest=100, longest=500),
    # The tests' tiny model: 2 heads of 32; 6 sequences of 5-12 tokens.
    "tiny_6x5-12": dict(heads=2, kv_heads=2, head_dim=32, sequences=6, shortest=5, longest=12),
}


def _inputs(heads: int, kv_heads: int, head_dim: int, sequences: int, shortest: int, longest: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (sequences,), generator=g).tolist()
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    t = bounds[-1]
    q = torch.randn(1, heads, t, head_dim, generator=g)
    k = torch.randn(1, kv_heads, t, head_dim, generator=g)
    v = torch.randn(1, kv_heads, t, head_dim, generator=g)
    grad = torch.randn(1, heads, t, head_dim, generator=g)
    return PackedBounds(tuple(bounds)), q, k, v, grad


def padding_index(bounds: PackedBounds) -> tuple[torch.Tensor, torch.Tensor]:
    """``gather (N x Lmax,)`` picks each run's tokens into ``N`` rows of ``Lmax`` slots (a slot past a
    run's end repeats its last token: under a causal mask no real query sees it); ``scatter (T,)``
    picks the real slots back in token order. Built once per micro-batch."""
    n, longest = len(bounds.lengths), bounds.longest
    starts = torch.tensor(bounds.bounds[:-1]).unsqueeze(1)  # (N, 1)
    lengths = torch.tensor(bounds.lengths).unsqueeze(1)
    j = torch.arange(longest).unsqueeze(0)  # (1, Lmax)
    gather = torch.minimum(starts + j, starts + lengths - 1).reshape(-1)
    scatter = (torch.arange(n).unsqueeze(1) * longest + j)[j < lengths]
    return gather, scatter


def padded_attention(query, key, value, bounds: PackedBounds, index: tuple[torch.Tensor, torch.Tensor]):
    """The runs gathered into one right-padded ``(N, H, Lmax, D)`` batch, one causal SDPA (a causal
    mask already hides the padding from every real query), the real slots scattered back."""
    gather, scatter = index
    n, longest = len(bounds.lengths), bounds.longest

    def batch(x):  # (1, H, T, D) -> (N, H, Lmax, D)
        return x[0].index_select(1, gather).view(x.shape[1], n, longest, x.shape[3]).transpose(0, 1)

    out = F.scaled_dot_product_attention(batch(query), batch(key), batch(value), is_causal=True,
                                         enable_gqa=key.shape[1] != query.shape[1])
    h, d = out.shape[1], out.shape[3]
    return out.transpose(0, 1).reshape(h, n * longest, d).index_select(1, scatter).unsqueeze(0)


def sliced_attention(query, key, value, bounds: PackedBounds):
    """The loop raydpo ran before (slices of the row; each slice's backward writes a zero tensor of
    the whole row), fed host bounds."""
    gqa = key.shape[1] != query.shape[1]
    b = bounds.bounds
    return torch.cat([F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                                                     is_causal=True, enable_gqa=gqa)
                      for s, e in zip(b[:-1], b[1:])], dim=2)


def _flex_setup(bounds: PackedBounds, t: int):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = torch.repeat_interleave(torch.arange(len(bounds.lengths)), torch.tensor(bounds.lengths))

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    return create_block_mask(mask_mod, None, None, t, t, device="cpu")


def _time(steps: dict[str, Callable[[], None]], repeats: int) -> dict[str, float | str]:
    """Median seconds per step, the variants taking turns in each repeat (so a load change on this
    shared machine hits them all alike); a variant that raises NotImplementedError gets its message."""
    times: dict[str, list[float]] = {}
    out: dict[str, float | str] = {}
    for name, step in steps.items():
        try:
            step()  # warm-up
            times[name] = []
        except NotImplementedError as e:  # FlexAttention has no CPU backward (torch 2.13)
            out[name] = f"unsupported: {str(e).split('. ')[0]}"
    for _ in range(repeats):
        for name in times:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    out.update({name: statistics.median(t) for name, t in times.items()})
    return out


def run_shape(spec: dict, repeats: int, compiled: bool) -> dict:
    bounds, q0, k0, v0, grad = _inputs(**spec)
    t = q0.shape[2]
    gqa = q0.shape[1] != k0.shape[1]
    out: dict = {"tokens": t, "lengths": list(bounds.lengths), "setup_s": {}}

    variants: dict[str, Callable] = {}
    variants["per_sequence"] = lambda q, k, v: per_sequence_attention(q, k, v, bounds)
    variants["sliced"] = lambda q, k, v: sliced_attention(q, k, v, bounds)
    start = time.perf_counter()
    index = padding_index(bounds)
    out["setup_s"]["padded_index"] = time.perf_counter() - start
    variants["padded"] = lambda q, k, v: padded_attention(q, k, v, bounds, index)

    from torch.nn.attention.flex_attention import flex_attention

    start = time.perf_counter()
    block_mask = _flex_setup(bounds, t)
    out["setup_s"]["flex_block_mask"] = time.perf_counter() - start
    variants["flex_eager"] = lambda q, k, v: flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    if compiled:
        flex_c = torch.compile(flex_attention, dynamic=False)
        start = time.perf_counter()
        with torch.no_grad():
            flex_c(q0, k0, v0, block_mask=block_mask, enable_gqa=gqa)
        out["setup_s"]["flex_compile"] = time.perf_counter() - start
        variants["flex_compiled"] = lambda q, k, v: flex_c(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    with torch.no_grad():  # same answer first (float32, against per_sequence), then the timings
        want = per_sequence_attention(q0, k0, v0, bounds)
        out["max_abs_diff_vs_per_sequence"] = {
            name: float((fn(q0, k0, v0) - want).abs().max()) for name, fn in variants.items() if name != "per_sequence"}

    def forward(attend: Callable) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                attend(q0, k0, v0)
        return step

    def forward_backward(attend: Callable) -> Callable[[], None]:
        def step() -> None:
            q, k, v = (x.detach().requires_grad_() for x in (q0, k0, v0))
            attend(q, k, v).backward(grad)
        return step

    for name, make in (("forward+backward", forward_backward), ("forward", forward)):
        seconds = _time({variant: make(fn) for variant, fn in variants.items()}, repeats)
        rates = {v: (round(t / x, 1) if isinstance(x, float) else x) for v, x in seconds.items()}
        base = rates["per_sequence"]
        out[name] = {"tokens_per_s": rates, "ratio_to_per_sequence": {
            v: round(r / base, 3) for v, r in rates.items() if isinstance(r, float)}}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip flex_compiled (torch.compile)")
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="default: every shape")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(),
              "shapes": {name: run_shape(SHAPES[name], args.repeats, not args.no_compile)
                         for name in (args.shape or SHAPES)}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
