"""The reference stage's columns equal log-probs computed inline, checked against float64."""
from __future__ import annotations

import math

import numpy as np
import torch

from actors.reference import reference_stage
from raydpo.config import ReferenceConfig
from raydpo.data.pipeline import kept_rows, tokenized_dataset
from raydpo.data.refcache import Cache, CacheKey, model_identity
from raydpo.data.synthetic import write_shards
from raydpo.data.tokenize import TokenizeSettings
from raydpo.models import load_model, write_tiny


def _float64_logp(model, prompt: list[int], completion: list[int]) -> float:
    """Independent: one unpadded sequence, log-softmax in float64, a plain loop over tokens."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(prompt), len(prompt) + len(completion)):
        total += torch.log_softmax(logits[t - 1], -1)[ids[0, t]].item()
    return total


def test_reference_columns_equal_inline(ray_local, tmp_path):
    """Two actors, small windows and a small token budget (many sorted batches): every cached value
    equals the float64 loop on the unpadded sequence."""
    model_dir = write_tiny(tmp_path / "model", seed=3)
    sources = write_shards(tmp_path / "data", rows=60, shards=2)
    tokenized = tokenized_dataset(sources, [], model_path=str(model_dir), gguf_file=None,
                                  settings=TokenizeSettings(64, 32), eval_fraction=0.0, seed=0)
    cache = Cache(str(tmp_path / "cache"), CacheKey(model_identity(str(model_dir)), "tiny", {}, "float32"))
    settings = ReferenceConfig(num_actors=2, num_cpus=0.5, num_gpus=0, batch_tokens=64, window=16)
    ds, stats = reference_stage(kept_rows(tokenized), cache, model_path=str(model_dir), gguf_file=None,
                                settings=settings)
    rows = ds.take_all()
    assert len(rows) == 60 and stats.rows == 60 and stats.misses == 60
    assert 1 <= stats.model_loads <= 2  # an actor that got no window may be stopped before it loads
    assert stats.padding_waste == 1.0  # packed as the trainer packs: no padding
    model = load_model(str(model_dir)).eval()
    for row in rows[:20]:
        prompt = [int(x) for x in row["prompt_ids"]]
        for side in ("chosen", "rejected"):
            want = _float64_logp(model, prompt, [int(x) for x in row[f"{side}_ids"]])
            got = row[f"ref_{side}_logps"]
            assert isinstance(got, (np.floating, float))
            assert math.isclose(float(got), want, rel_tol=1e-5), (side, got, want)


def test_the_cache_key_holds_the_precision(tmp_path):
    """A value computed under bf16 autocast is not a float32 one: another key. Plain float32 keeps
    the key it had before the autocast was part of it (dtype "float32"), so old caches still hit."""
    from actors.reference import reference_cache
    from raydpo.data.refcache import tokenizer_identity
    from raydpo.models import load_tokenizer

    model_dir = str(write_tiny(tmp_path / "model", seed=3))
    settings = TokenizeSettings(64, 32)

    def key(**precision) -> CacheKey:
        return reference_cache(model_dir, None, None, settings,
                               ReferenceConfig(cache_dir=str(tmp_path / "cache"), **precision)).key

    plain, bf16 = key(dtype="float32", autocast=None), key(dtype="bfloat16")
    autocast = key(dtype="float32", autocast="bfloat16")
    assert len({plain.dir_key, autocast.dir_key, bf16.dir_key}) == 3
    before = CacheKey(model_identity(model_dir), tokenizer_identity(load_tokenizer(model_dir)), settings, "float32")
    assert plain.dir_key == before.dir_key
