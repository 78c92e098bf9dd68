"""raydpo.precision: the trainer's precision, defined once, and the contexts it gives."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.reference import ReferenceLogps
from raydpo.config import load_config
from raydpo.data.refcache import Cache, CacheKey, sequence_keys
from raydpo.logprobs import pair_batch, scorer_of
from raydpo.models import load_model, load_tokenizer, write_tiny
from raydpo.precision import Precision, allow_tf32

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.parametrize("engine, bf16, dtype, expected", [
    ("ddp", True, "float32", Precision("float32", "bfloat16")),  # float32 masters, bf16 matmuls
    ("deepspeed", True, "bfloat16", Precision("bfloat16")),  # DeepSpeed keeps float32 masters itself
    ("deepspeed", True, "float32", Precision("bfloat16")),  # DeepSpeed casts the module to bf16 anyway
    ("ddp", False, "float32", Precision("float32")),
    ("deepspeed", False, "float32", Precision("float32")),
])
def test_of_trainer(engine: str, bf16: bool, dtype: str, expected: Precision) -> None:
    assert Precision.of_trainer(dtype, engine, bf16) == expected


def test_key_and_compute_dtype() -> None:
    assert Precision("float32").key == "float32"  # as the cache key's dtype read before autocast was part of it
    assert Precision("float32", "bfloat16").key == "float32+autocast:bfloat16"
    assert Precision("float32", "bfloat16").compute_dtype == "bfloat16"
    assert Precision("bfloat16").compute_dtype == "bfloat16" and Precision("float32").compute_dtype == "float32"
    with pytest.raises(ValueError, match="float64"):
        Precision("float64")


def test_autocast_context_runs_matmuls_in_bf16_on_cpu() -> None:
    a = torch.randn(4, 4)
    with Precision("float32", "bfloat16").autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.bfloat16
    with Precision("float32").autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32


def test_allow_tf32_leaves_cpu_alone() -> None:
    before = torch.backends.cuda.matmul.fp32_precision
    allow_tf32(torch.device("cpu"))
    assert torch.backends.cuda.matmul.fp32_precision == before


# ---------------------------------------------------------------------------------------------
# Step 0 with bf16 on: the policy = the reference, so every reward beta * (policy - reference) is 0
# up to the rounding of the two batch layouts (the trainer's packed micro-batch, the reference
# actor's padded windows).
# ---------------------------------------------------------------------------------------------

BETA = 0.1


def _pairs(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(3, vocab, size=int(k)).tolist()  # noqa: E731
    return [(ids(rng.integers(4, 40)), ids(rng.integers(2, 40)), ids(rng.integers(2, 40))) for _ in range(n)]


def _policy_logps(path: str, precision: Precision, pairs, pad_id: int) -> np.ndarray:
    """(2B,) chosen then rejected, as the trainer scores them: one packed micro-batch under the
    trainer's precision."""
    model = load_model(path, precision.weights).eval()
    prompts, chosen, rejected = ([p[i] for p in pairs] for i in range(3))
    with torch.no_grad(), precision.autocast(torch.device("cpu")):
        return scorer_of(model)(**pair_batch(prompts, chosen, rejected, pad_id, packed=True)).logps.double().numpy()


def _token_error(path: str, precision: Precision, pairs) -> float:
    """u_tok: the largest error of one completion token's log-prob at ``precision`` against float64,
    over every token of ``pairs``; independent of the scorer: each sequence alone through the plain
    model, log-softmax of its full logits."""
    model, exact = load_model(path, precision.weights).eval(), load_model(path).double().eval()
    worst = 0.0
    for prompt, *completions in pairs:
        for completion in completions:
            ids = torch.tensor([prompt + completion])
            targets = ids[0, len(prompt):]
            with torch.no_grad():
                with precision.autocast(torch.device("cpu")):
                    low = model(input_ids=ids).logits[0, len(prompt) - 1:-1].double()
                high = exact(input_ids=ids).logits[0, len(prompt) - 1:-1]
            pick = lambda z: torch.log_softmax(z, -1).gather(-1, targets[:, None])  # noqa: E731
            worst = max(worst, (pick(low) - pick(high)).abs().max().item())
    return worst


def _reference_logps(path: str, precision: Precision, pairs, cache_dir: Path) -> np.ndarray:
    """(2B,) through the reference actor's own path (its windows packed into rows under a small
    token budget: several rows, other row-mates than the trainer's), read back from its cache."""
    prompts = [p for p, _, _ in pairs] * 2
    completions = [c for _, c, _ in pairs] + [r for _, _, r in pairs]
    cache = Cache(str(cache_dir), CacheKey("tiny", "tiny", {}, precision.key))
    cache.init()
    table = pa.table({"prompt_ids": pa.array(prompts, pa.list_(pa.int32())),
                      "completion_ids": pa.array(completions, pa.list_(pa.int32()))})
    keys = sequence_keys(table["prompt_ids"].combine_chunks(), table["completion_ids"].combine_chunks())
    ReferenceLogps(cache, path, precision=precision, batch_tokens=256)(table.append_column("key", keys))
    index, _, _ = cache.read_index()
    found = dict(zip(index["key"].to_pylist(), index["logp"].to_pylist()))
    return np.array([found[k] for k in keys.to_pylist()], dtype=np.float64)


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_step0_rewards_are_zero_up_to_bf16_layout_rounding(tmp_path: Path, engine: str) -> None:
    """The bound: both sides run the same bf16 operations on the same bf16-rounded weights, and
    packed attention computes each sequence on its own; what can differ is a kernel's accumulation
    order where it follows the batch's shape (GEMM blocking over a row's other sequences). That
    flips bf16 roundings (2**-8 relative), so each side's token log-probs are the exact ones up to
    bf16 rounding: within u_tok, the largest bf16 error of a token's log-prob (measured on the model
    itself, each sequence alone, against float64). A sequence of T completion tokens then differs
    between the two sides by at most 2 T u_tok: |reward| <= beta * 2 T u_tok. On CPU the GEMMs'
    rows do not depend on their row-mates, so the rewards are exactly 0. The reference at float32
    without autocast (before issue 24) misses the policy's rounding: not 0, though within the bound."""
    cfg = load_config(QUICKSTART, ["train.bf16=true", f"train.engine={engine}"])
    trainer, reference = cfg.precision(), cfg.reference.precision()
    assert reference == trainer  # resolved from the trainer's (reference.dtype / reference.autocast autos)
    path = str(write_tiny(tmp_path / "model", seed=3))
    tok = load_tokenizer(path)
    pairs = _pairs(16, len(tok))
    tokens = np.array([len(c) for _, c, _ in pairs] + [len(r) for _, _, r in pairs])

    policy = _policy_logps(path, trainer, pairs, tok.pad_token_id)
    after = BETA * (policy - _reference_logps(path, reference, pairs, tmp_path / "after"))
    before = BETA * (policy - _reference_logps(path, Precision("float32"), pairs, tmp_path / "before"))
    u_tok = _token_error(path, trainer, pairs)

    assert 0 < u_tok < 0.01  # bf16 rounding: present, and small
    assert (np.abs(after) <= BETA * 2 * tokens * u_tok).all(), (np.abs(after) / (BETA * 2 * tokens * u_tok)).max()
    assert np.abs(after).max() == 0.0, np.abs(after).max()
    assert (np.abs(before) > 0).mean() > 0.5, before  # before: most rewards were rounding noise
