"""Step-0 DPO rewards with bf16 on: the policy = the reference, so every reward
``beta * (policy_logp - ref_logp)`` should be 0 up to rounding. Before issue 24 the reference
actors ran plain float32 while the policy ran bf16; after, they run at the trainer's precision
(``raydpo.precision``).

    python bench/step0_rewards.py [--model FOLDER] [--pairs 16] [--beta 0.1] [--json]

Both sides through their real paths: the policy's packed micro-batch (``pair_batch(packed=True)``
through the trainer's scorer, under the trainer's precision), the reference's actor
(``ReferenceLogps``: its window packed into rows under a token budget, into its cache, read
back). No Ray: the actor class runs in this process. For each trainer precision (DDP + bf16:
float32 weights under bf16 autocast; DeepSpeed + bf16: bfloat16 weights) it prints max and mean
|reward| with the reference ``before`` (float32, no autocast, the actor's path), ``padded`` (the
trainer's precision, but length-sorted padded windows: the reference's layout
before it packed) and ``after`` (the trainer's precision, the actor's path). ``--model`` defaults
to the tiny random Llama; pairs are random token ids (seeded).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actors.reference import ReferenceLogps  # noqa: E402
from raydpo.data.refcache import Cache, CacheKey, sequence_keys  # noqa: E402
from raydpo.logprobs import collate, pair_batch, scorer_of, to_device  # noqa: E402
from raydpo.models import load_model, load_tokenizer, write_tiny  # noqa: E402
from raydpo.precision import Precision  # noqa: E402

TRAINERS = {"ddp+bf16": Precision("float32", "bfloat16"), "deepspeed+bf16": Precision("bfloat16")}
BEFORE = Precision("float32")  # the reference before issue 24: float32 weights, no autocast


def random_pairs(n: int, vocab: int, max_total: int, seed: int) -> list[tuple[list[int], list[int], list[int]]]:
    """``n`` (prompt, chosen, rejected) of random ids in [3, vocab), each sequence at most ``max_total``."""
    rng = np.random.default_rng(seed)
    third = max_total // 3
    ids = lambda k: rng.integers(3, vocab, size=int(k)).tolist()  # noqa: E731
    return [(ids(rng.integers(4, third)), ids(rng.integers(2, third)), ids(rng.integers(2, third))) for _ in range(n)]


def policy_logps(model_path: str, precision: Precision, pairs, pad_id: int) -> np.ndarray:
    """(2B,) summed completion log-probs, chosen then rejected: the trainer's packed micro-batch."""
    model = load_model(model_path, precision.weights).eval()
    layout = pair_batch([p for p, _, _ in pairs], [c for _, c, _ in pairs], [r for _, _, r in pairs], pad_id,
                        packed=True)
    with torch.no_grad(), precision.autocast(torch.device("cpu")):
        return scorer_of(model)(**layout).logps.float().numpy()


def reference_logps(model_path: str, precision: Precision, pairs, cache_dir: str, batch_tokens: int) -> np.ndarray:
    """(2B,) the same sequences through the reference actor's path, read back from its cache."""
    prompts = [p for p, _, _ in pairs] * 2
    completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    cache = Cache(cache_dir, CacheKey("bench", "bench", {}, precision.key))
    cache.init()
    table = pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                      "completion_ids": pa.array(completions, pa.list_(pa.int32()))})
    keys = sequence_keys(table["prompt_ids"].combine_chunks(), table["completion_ids"].combine_chunks())
    actor = ReferenceLogps(cache, model_path, precision=precision, batch_tokens=batch_tokens)
    actor(table.append_column("key", keys))
    index, _, _ = cache.read_index()
    found = dict(zip(index["key"].to_pylist(), index["logp"].to_pylist()))
    return np.array([found[k] for k in keys.to_pylist()], dtype=np.float64)


def padded_reference_logps(model_path: str, precision: Precision, pairs, pad_id: int, batch_tokens: int) -> np.ndarray:
    """(2B,) at ``precision`` in the reference's layout before issue 24: length-sorted padded
    windows of at most ``batch_tokens`` padded tokens and 1.05 padded tokens per real one."""
    model = load_model(model_path, precision.weights).eval()
    prompts = [p for p, _, _ in pairs] * 2
    completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    batches: list[list[int]] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        rows, longest = (len(batches[-1]) + 1, lengths[batches[-1][0]]) if batches else (0, 0)
        if batches and rows * longest <= batch_tokens and rows * longest <= 1.05 * (real + lengths[i]):
            batches[-1].append(i)
            real += lengths[i]
        else:
            batches.append([i])
            real = lengths[i]
    out = np.zeros(len(lengths))
    scorer = scorer_of(model)
    with torch.no_grad(), precision.autocast(torch.device("cpu")):
        for idx in batches:
            layout = collate([prompts[i] for i in idx], [completions[i] for i in idx], pad_id)
            out[idx] = scorer(**to_device(layout, "cpu")).logps.double().numpy()
    return out


def measure(model_path: str, n_pairs: int, beta: float, max_total: int, batch_tokens: int, seed: int) -> dict:
    tok = load_tokenizer(model_path)
    pairs = random_pairs(n_pairs, len(tok), max_total, seed)
    out: dict = {"pairs": n_pairs, "beta": beta, "tokens": sum(len(p) * 2 + len(c) + len(r) for p, c, r in pairs)}
    with tempfile.TemporaryDirectory() as tmp:
        refs = {p.key: reference_logps(model_path, p, pairs, f"{tmp}/{i}", batch_tokens)
                for i, p in enumerate({BEFORE, *TRAINERS.values()})}
        for name, precision in TRAINERS.items():
            policy = policy_logps(model_path, precision, pairs, tok.pad_token_id)
            padded = padded_reference_logps(model_path, precision, pairs, tok.pad_token_id, batch_tokens)
            for when, ref in (("before", refs[BEFORE.key]), ("padded", padded), ("after", refs[precision.key])):
                rewards = np.abs(beta * (policy - ref))
                out[f"{name}/{when}"] = {"max_abs_reward": float(rewards.max()),
                                         "mean_abs_reward": float(rewards.mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="an HF folder (default: the tiny random Llama)")
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--max-total", type=int, default=None, help="longest sequence (default 120 tiny, 384 else)")
    ap.add_argument("--batch-tokens", type=int, default=512, help="the reference's padded-token budget per forward")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    ns = ap.parse_args()
    torch.manual_seed(ns.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model = ns.model or str(write_tiny(Path(tmp) / "tiny", seed=3))
        max_total = ns.max_total or (384 if ns.model else 120)
        result = {"model": ns.model or "tiny", **measure(model, ns.pairs, ns.beta, max_total, ns.batch_tokens, ns.seed)}
    if ns.json:
        print(json.dumps(result))
        return
    print(f"model {result['model']}: {result['pairs']} pairs, {result['tokens']} tokens, beta {result['beta']}")
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"  {key:24s} max |reward| {value['max_abs_reward']:.3e}   "
                  f"mean |reward| {value['mean_abs_reward']:.3e}")


if __name__ == "__main__":
    main()
