"""The reference cache's pieces without Ray: keys, identities, atomic blocks, corruption."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from raydpo.data.refcache import (
    BLOCK_SCHEMA, VERSION, Cache, CacheKey, _block_name, key_sum, missing_sequences, model_identity, sequence_keys,
    tokenizer_identity,
)
from raydpo.models import build_tiny_tokenizer, write_tiny

KEY = CacheKey(model="files:abc", tokenizer="tok", settings={"max_length": 32}, dtype="float32")


def ids(rows: list[list[int]]) -> pa.Array:
    return pa.array(rows, pa.list_(pa.int32()))


def test_sequence_keys_depend_on_the_boundary_and_every_id():
    """The same concatenated ids with another prompt/completion split are other sequences."""
    keys = sequence_keys(ids([[1, 2], [1], [1, 2], [1, 2]]), ids([[3], [2, 3], [3], [4]])).to_pylist()
    assert keys[0] == keys[2]  # identical rows, identical keys
    assert len({keys[0], keys[1], keys[3]}) == 3
    assert all(len(k) == 16 for k in keys)


def test_key_sum_is_order_free_and_counts_multiplicity():
    keys = sequence_keys(ids([[1], [2], [3]]), ids([[4], [5], [6]]))
    assert key_sum(keys) == key_sum(pa.array(keys.to_pylist()[::-1], keys.type))
    assert key_sum(keys) != key_sum(keys.slice(0, 2))


def test_cache_key_changes_with_each_input():
    base = KEY.dir_key
    for other in (
        CacheKey("files:abd", "tok", {"max_length": 32}, "float32"),
        CacheKey("files:abc", "tok2", {"max_length": 32}, "float32"),
        CacheKey("files:abc", "tok", {"max_length": 33}, "float32"),
        CacheKey("files:abc", "tok", {"max_length": 32}, "bfloat16"),
    ):
        assert other.dir_key != base
    assert CacheKey("files:abc", "tok", {"max_length": 32}, "float32").dir_key == base


def test_model_identity_is_the_weights_content(tmp_path):
    a = write_tiny(tmp_path / "a", seed=0)
    b = write_tiny(tmp_path / "b", seed=0)
    c = write_tiny(tmp_path / "c", seed=1)
    assert model_identity(str(a)) == model_identity(str(b))  # same bytes, other folder
    assert model_identity(str(a)) != model_identity(str(c))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        model_identity(str(tmp_path / "empty"))


def test_tokenizer_identity_sees_the_chat_template():
    tok = build_tiny_tokenizer()
    before = tokenizer_identity(tok)
    assert tokenizer_identity(build_tiny_tokenizer()) == before
    tok.chat_template = tok.chat_template + " "
    assert tokenizer_identity(tok) != before


def test_blocks_round_trip_and_corrupt_ones_are_deleted(tmp_path):
    cache = Cache(str(tmp_path), KEY)
    cache.init()
    keys = sequence_keys(ids([[1], [2], [3]]), ids([[4], [5], [6]]))
    first = cache.write_block(keys.slice(0, 2), np.array([-1.5, -2.5]), np.array([2, 2]))
    cache.write_block(keys.slice(2), np.array([-3.5]), np.array([2]))
    (tmp_path / cache.path.split("/")[-1] / "blocks" / ".tmp-deadbeef").write_bytes(b"half a write")
    index, corrupt, foreign = cache.read_index()
    assert (corrupt, foreign) == (0, 0) and index.schema.equals(BLOCK_SCHEMA, check_metadata=False)
    assert sorted(index["logp"].to_pylist()) == [-3.5, -2.5, -1.5]

    path = tmp_path / cache.path.split("/")[-1] / "blocks" / first
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-group in the middle of the file
    path.write_bytes(bytes(data))
    index, corrupt, foreign = cache.read_index()
    assert (corrupt, foreign) == (1, 0) and index["logp"].to_pylist() == [-3.5]
    assert not path.exists()


@pytest.mark.parametrize("named", ["under_its_own_name", "renamed_for_this_key"])
def test_a_valid_block_of_another_key_is_never_read_as_hits(tmp_path, named):
    """Cache poisoning: a whole, valid block computed under another key (another model) copied
    into this key's folder is deleted and counted, not read: its values are the other model's."""
    ours, theirs = Cache(str(tmp_path), KEY), Cache(str(tmp_path), dataclasses.replace(KEY, model="files:another"))
    ours.init()
    theirs.init()
    keys = sequence_keys(ids([[1], [2]]), ids([[4], [5]]))
    ours.write_block(keys.slice(0, 1), np.array([-1.0]), np.array([2]))
    name = theirs.write_block(keys, np.array([-9.0, -9.0]), np.array([2, 2]))  # a sequence both keys cache
    data = Path(theirs.path, "blocks", name).read_bytes()
    planted = Path(ours.path, "blocks", name if named == "under_its_own_name" else _block_name(KEY.dir_key, data))
    planted.write_bytes(data)

    index, corrupt, foreign = ours.read_index()
    assert (corrupt, foreign) == (0, 1) and index["logp"].to_pylist() == [-1.0]
    assert not planted.exists() and Path(theirs.path, "blocks", name).exists()
    assert theirs.read_index()[0]["logp"].to_pylist() == [-9.0, -9.0]  # the other key's own blocks are untouched


def test_key_json_that_describes_another_key_is_rewritten(tmp_path):
    cache = Cache(str(tmp_path), KEY)
    cache.init()
    key_json = Path(cache.path, "key.json")
    right = key_json.read_text()
    key_json.write_text('{"model": "files:another"}')
    cache.init()
    assert key_json.read_text() == right and json.loads(right)["model"] == KEY.model


def test_missing_sequences_are_unique_and_only_the_uncached(tmp_path):
    prompt = ids([[1, 2], [1, 2], [7]])
    chosen, rejected = ids([[3], [3], [8]]), ids([[4], [5], [3]])
    batch = pa.table({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    batch = batch.append_column("chosen_key", sequence_keys(prompt, chosen))
    batch = batch.append_column("rejected_key", sequence_keys(prompt, rejected))
    cached = pa.table({"key": sequence_keys(ids([[1, 2]]), ids([[4]]))})  # (1,2)+4 is cached

    import raydpo.data.refcache as refcache

    refcache._INDEXES.clear()
    refcache._INDEXES["x"] = cached

    class Ref:
        def hex(self) -> str:
            return "x"

    out = missing_sequences(batch, Ref())
    got = sorted(zip(out["prompt_ids"].to_pylist(), out["completion_ids"].to_pylist()))
    assert got == [([1, 2], [3]), ([1, 2], [5]), ([7], [3]), ([7], [8])]  # (1,2)+3 once, not twice


def test_cache_dir_may_be_a_uri(tmp_path):
    """A ``file://`` URI goes through the same pyarrow filesystem calls as s3:// or gs:// would."""
    cache = Cache(f"file://{tmp_path}/uri-cache", KEY)
    cache.init()
    keys = sequence_keys(ids([[1]]), ids([[2]]))
    cache.write_block(keys, np.array([-0.25]), np.array([2]))
    cache.record_load()
    index, corrupt, foreign = cache.read_index()
    assert (index["logp"].to_pylist(), corrupt, foreign, cache.loads()) == ([-0.25], 0, 0, 1)
    assert (tmp_path / "uri-cache" / f"v{VERSION}-{KEY.dir_key}" / "key.json").exists()
