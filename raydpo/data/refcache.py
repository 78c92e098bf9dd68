"""The reference log-prob cache: Parquet blocks under a directory keyed by everything they depend on.

Layout (any pyarrow filesystem: a local path, ``file://``, ``s3://``, ``gs://``)::

    {cache_dir}/v2-{dir_key}/key.json                  what the key hashes, for humans
    {cache_dir}/v2-{dir_key}/blocks/{name}.parquet     key: binary(16), logp: float32, tokens: int32
    {cache_dir}/v2-{dir_key}/loads/{host}-{pid}-{ns}.json  one record per reference-model load

``dir_key`` hashes the model weights' identity, the tokenizer with its chat template, the
tokenization settings and the precision (dtype and autocast). Inside it, each *sequence* (prompt + one completion) is keyed by
the hash of its token ids, so the data's content is part of every key: an unchanged pair hits, a new
or changed one misses, and a completion shared by two pairs is computed once.

A block's file name is the hash of its key directory's ``dir_key`` and its bytes, and its Parquet
metadata names the ``dir_key`` too. It is written to a temporary name and renamed, so a reader sees
whole blocks or nothing. A file whose bytes do not match its name (torn, truncated, bit-flipped) is
deleted and its sequences are computed again, never read; so is a whole, valid block of another key
(another model or tokenizer) copied into this folder under its own name: its values are another
model's log-probs, and reading them as hits would silently train against the wrong reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:  # the key only holds it; importing tokenize would pull in transformers
    from raydpo.data.tokenize import TokenizeSettings

VERSION = 2  # 2: blocks name their key (in their file name's hash and metadata); v1 folders are not read
KEY_BYTES = 16
DEFAULT_CACHE_DIR = "~/.cache/raydpo/ref"
BLOCK_SCHEMA = pa.schema([("key", pa.binary(KEY_BYTES)), ("logp", pa.float32()), ("tokens", pa.int32())])
_BLOCK_NAME = re.compile(r"^[0-9a-f]{40}\.parquet$")
_KEY_METADATA = b"raydpo.cache_key"  # a block's Parquet metadata: the dir_key it was computed under
# Files whose bytes are the model: the weights and the config that shapes the forward pass.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_MODEL_FILES = ("config.json",)


def _digest(*parts: bytes, size: int = 20) -> str:
    h = hashlib.blake2b(digest_size=size)
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# What the key hashes


def _file_hash(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=20)).hexdigest()


def model_identity(name_or_path: str, gguf_file: str | None = None) -> str:
    """``files:<hash>`` of a local folder's weight and config files (content, not names or dates),
    or ``hub:<id>@<commit>`` for a hub id, the commit resolved on the hub or in the local HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        files = sorted(
            f for f in path.iterdir()
            if f.is_file() and (f.name in _MODEL_FILES or f.suffix in _WEIGHT_SUFFIXES)
            and (gguf_file is None or f.suffix != ".gguf" or f.name == gguf_file)
        )
        if not any(f.suffix in _WEIGHT_SUFFIXES for f in files):
            raise FileNotFoundError(f"{path}: no weight files ({', '.join(_WEIGHT_SUFFIXES)}) to identify the model by")
        return "files:" + _digest(*(f"{f.name}={_file_hash(f)}".encode() for f in files))
    return f"hub:{name_or_path}@{_hub_commit(name_or_path)}" + (f"/{gguf_file}" if gguf_file else "")


def source_identity(source: str) -> str:
    """A data source's fingerprint: the content hash of a local file (``file:<hash>``), else its
    name (a URI or dataset id: its content is not read twice just to name it)."""
    path = Path(source).expanduser()
    if path.is_file():
        return "file:" + _file_hash(path)
    return "name:" + _digest(source.encode())


def sources_identity(identities: dict[str, str]) -> str:
    """One fingerprint of a run's sources (``source -> source_identity``), independent of order."""
    return _digest(*(f"{s}={i}".encode() for s, i in sorted(identities.items())), size=16)


def _hub_commit(repo_id: str) -> str:
    """The commit the hub's ``main`` points at; offline, the snapshot transformers would load."""
    from huggingface_hub import HfApi, snapshot_download

    if not os.environ.get("HF_HUB_OFFLINE"):
        try:
            sha = HfApi().model_info(repo_id, timeout=10).sha
            if sha:
                return sha
        except Exception:  # noqa: BLE001 - no network or no such repo: try the local cache below
            pass
    try:
        return Path(snapshot_download(repo_id, local_files_only=True)).name
    except Exception as e:  # noqa: BLE001
        raise FileNotFoundError(f"model {repo_id!r}: not a local folder, and its revision cannot be resolved "
                                f"on the hub or in the local Hugging Face cache ({e})") from None


def tokenizer_identity(tokenizer: Any, chat_template: str | None = None) -> str:
    """Hash of the vocabulary and merges, the special tokens and the chat template in use
    (``chat_template`` where the config overrides the tokenizer's own)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({"eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
                           "bos": tokenizer.bos_token_id}, sort_keys=True)
    return _digest(vocab.encode(), specials.encode(), (chat_template or tokenizer.chat_template or "").encode())


@dataclass(frozen=True)
class CacheKey:
    """The inputs that decide a reference log-prob besides the token ids themselves."""

    model: str  # model_identity(...)
    tokenizer: str  # tokenizer_identity(...)
    settings: TokenizeSettings  # whole: a field added to it reaches the key by itself
    # raydpo.precision.Precision.key: the weights' dtype ("float32"), with its autocast where there
    # is one ("float32+autocast:bfloat16"). Named dtype, as before autocast: old keys stay valid.
    dtype: str

    @property
    def dir_key(self) -> str:
        blob = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return _digest(blob.encode(), size=16)


def sequence_keys(prompt_ids: pa.Array, completion_ids: pa.Array) -> pa.Array:
    """``binary(16)`` per row: the hash of the prompt's and the completion's token ids."""
    out = []
    for p, c in zip(prompt_ids.to_numpy(zero_copy_only=False), completion_ids.to_numpy(zero_copy_only=False)):
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        p, c = np.asarray(p, dtype="<i4"), np.asarray(c, dtype="<i4")
        h.update(len(p).to_bytes(8, "little"))
        h.update(p.tobytes())
        h.update(c.tobytes())
        out.append(h.digest())
    return pa.array(out, type=pa.binary(KEY_BYTES))


def key_sum(keys: pa.Array) -> int:
    """Sum of the keys as integers mod 2**128: an order-free hash of a multiset of sequences, so
    per-batch sums combine into the data's fingerprint without gathering the keys anywhere."""
    return sum(int.from_bytes(k, "little") for k in keys.to_pylist()) % 2**128


# ---------------------------------------------------------------------------------------------
# The cache directory


def resolve(cache_dir: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path in it; ``~`` expands for local paths."""
    if "://" in cache_dir:
        return pafs.FileSystem.from_uri(cache_dir)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(cache_dir))


class Cache:
    """One key's directory. Plain values (a URI string and the key's fields) so it pickles to actors."""

    def __init__(self, cache_dir: str, key: CacheKey) -> None:
        self.uri = cache_dir
        self.key = key
        self.fs, root = resolve(cache_dir)
        self.path = f"{root.rstrip('/')}/v{VERSION}-{key.dir_key}"

    def __reduce__(self):
        return (Cache, (self.uri, self.key))

    def init(self) -> None:
        self.fs.create_dir(f"{self.path}/blocks", recursive=True)
        self.fs.create_dir(f"{self.path}/loads", recursive=True)
        # key.json is for humans (the blocks name their key themselves): rewritten when missing or
        # when it does not describe this key (damaged, or copied in from another key's folder).
        key_json = json.dumps(asdict(self.key), indent=1).encode()
        try:
            with self.fs.open_input_stream(f"{self.path}/key.json", compression=None) as f:
                current = f.read()
        except FileNotFoundError:
            current = None
        if current != key_json:
            self._write_atomic(f"{self.path}/key.json", key_json)

    def _write_atomic(self, final: str, data: bytes) -> None:
        tmp = f"{os.path.dirname(final)}/.tmp-{uuid.uuid4().hex}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, final)  # a rename: readers never see a partial file

    def write_block(self, keys: pa.Array, logps: np.ndarray, tokens: np.ndarray) -> str:
        """Write one block atomically; returns its file name (``_block_name`` of its bytes)."""
        table = pa.table({"key": keys, "logp": pa.array(logps, pa.float32()), "tokens": pa.array(tokens, pa.int32())},
                         schema=BLOCK_SCHEMA.with_metadata({_KEY_METADATA: self.key.dir_key.encode()}))
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue().to_pybytes()
        name = _block_name(self.key.dir_key, data)
        self._write_atomic(f"{self.path}/blocks/{name}", data)
        return name

    def record_load(self) -> None:
        """One small file per reference-model load: who computed into this key, and when."""
        record = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        self._write_atomic(f"{self.path}/loads/{record['host']}-{os.getpid()}-{time.time_ns()}.json",
                           json.dumps(record).encode())

    def loads(self) -> int:
        return len(self._names("loads"))

    def _names(self, sub: str) -> list[str]:
        selector = pafs.FileSelector(f"{self.path}/{sub}", allow_not_found=True)
        return sorted(os.path.basename(i.path) for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def read_index(self) -> tuple[pa.Table, int, int]:
        """All valid blocks as one table (key, logp, tokens), and how many blocks were deleted:
        ``corrupt`` ones (bytes that do not hash to the name, or no block schema) and ``foreign``
        ones (whole blocks written under another cache key). Both are recomputed, never read."""
        tables, corrupt, foreign = [], 0, 0
        for name in self._names("blocks"):
            if not _BLOCK_NAME.match(name):
                continue  # a temporary file of a writer that is still running or died
            path = f"{self.path}/blocks/{name}"
            with self.fs.open_input_stream(path, compression=None) as f:
                data = f.read()
            table = _parse_block(data)
            owner = (table.schema.metadata or {}).get(_KEY_METADATA, b"").decode() if table is not None else ""
            if owner == self.key.dir_key and name == _block_name(owner, data):
                tables.append(table)
                continue
            if owner and owner != self.key.dir_key:
                foreign += 1  # however it is named: its values are another key's log-probs
            else:
                corrupt += 1
            self.fs.delete_file(path)  # never read again; its sequences are recomputed
        index = pa.concat_tables(tables) if tables else BLOCK_SCHEMA.empty_table()
        return index, corrupt, foreign


def _block_name(dir_key: str, data: bytes) -> str:
    """A block's file name: the hash of the key it was computed under and its bytes, so a block is
    valid in its own key's folder only (a copy elsewhere fails the check however it is named)."""
    return f"{_digest(dir_key.encode(), data)}.parquet"


def _parse_block(data: bytes) -> pa.Table | None:
    """The block's table, or None where the bytes are not a Parquet file of the block schema."""
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError):
        return None
    return table if table.schema.equals(BLOCK_SCHEMA, check_metadata=False) else None


# ---------------------------------------------------------------------------------------------
# Batch functions for Ray Data (plain pyarrow in, pyarrow out)

_INDEXES: dict[str, pa.Table] = {}


def _index(ref: Any) -> pa.Table:
    """The index table behind an object ref, fetched once per worker process."""
    import ray

    hex_id = ref.hex()
    if hex_id not in _INDEXES:
        _INDEXES.clear()
        _INDEXES[hex_id] = ray.get(ref)
    return _INDEXES[hex_id]


def add_keys(batch: pa.Table) -> pa.Table:
    """Adds ``chosen_key`` and ``rejected_key`` (binary(16)) to tokenized pairs."""
    batch = batch.append_column("chosen_key", sequence_keys(batch["prompt_ids"], batch["chosen_ids"]))
    return batch.append_column("rejected_key", sequence_keys(batch["prompt_ids"], batch["rejected_ids"]))


def count_hits(batch: pa.Table, index_ref: Any) -> pa.Table:
    """One row per batch: ``rows``, ``hits`` (pairs whose two sequences are both cached), and the
    batch's ``key_sum`` (a decimal string: 128-bit integers do not fit Arrow's int64)."""
    known = _index(index_ref)["key"]
    hit = pc.and_(pc.is_in(batch["chosen_key"], value_set=known), pc.is_in(batch["rejected_key"], value_set=known))
    key_total = (key_sum(batch["chosen_key"]) + key_sum(batch["rejected_key"])) % 2**128
    return pa.table({"rows": [batch.num_rows], "hits": [pc.sum(hit).as_py() or 0], "key_sum": [str(key_total)]})


def missing_sequences(batch: pa.Table, index_ref: Any) -> pa.Table:
    """The sequences of a batch of pairs that the cache lacks, once each: ``key, prompt_ids, completion_ids``."""
    known = _index(index_ref)["key"]
    keys, prompts, completions = [], [], []
    for side in ("chosen", "rejected"):
        missing = pc.invert(pc.is_in(batch[f"{side}_key"], value_set=known))
        part = batch.filter(missing)
        keys.append(part[f"{side}_key"])
        prompts.append(part["prompt_ids"])
        completions.append(part[f"{side}_ids"])
    table = pa.table({
        "key": pa.chunked_array([c for k in keys for c in k.chunks], pa.binary(KEY_BYTES)),
        "prompt_ids": pa.chunked_array([c for k in prompts for c in k.chunks], batch.schema.field("prompt_ids").type),
        "completion_ids": pa.chunked_array([c for k in completions for c in k.chunks], batch.schema.field("chosen_ids").type),
    })
    if table.num_rows == 0:
        return table
    first = pc.index_in(table["key"], value_set=pc.unique(table["key"]))  # position of each key's first copy
    _, unique_rows = np.unique(first.to_numpy(), return_index=True)
    return table.take(pa.array(np.sort(unique_rows)))


def lookup(batch: pa.Table, index_ref: Any) -> pa.Table:
    """Replace the key columns by ``ref_chosen_logps`` / ``ref_rejected_logps`` (float32) from the cache."""
    index = _index(index_ref)
    for side in ("chosen", "rejected"):
        where = pc.index_in(batch[f"{side}_key"], value_set=index["key"])
        if where.null_count:
            raise RuntimeError(f"reference cache: {where.null_count} {side} sequences missing after precompute")
        batch = batch.append_column(f"ref_{side}_logps", pc.take(index["logp"], where).cast(pa.float32()))
    return batch.drop_columns(["chosen_key", "rejected_key"])


@dataclass
class RefStats:
    """What one precompute did; ``tokens_per_s`` counts real (unpadded) tokens per wall second of
    compute. ``seconds`` ends when the missing sequences are cached: the lookup that adds the columns
    is a lazy map, run when the caller materializes the dataset."""

    cache_key: str
    cache_dir: str
    rows: int = 0  # pairs
    hits: int = 0  # pairs whose two sequences were cached before this run
    misses: int = 0
    sequences_computed: int = 0
    tokens: int = 0  # real tokens forwarded
    padded_tokens: int = 0  # tokens forwarded, padding included
    corrupt_blocks: int = 0  # deleted and recomputed: damaged bytes
    foreign_blocks: int = 0  # deleted and recomputed: whole blocks of another cache key in this folder
    model_loads: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_seconds if self.compute_seconds else 0.0

    @property
    def padding_waste(self) -> float:
        return self.padded_tokens / self.tokens if self.tokens else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "padding_waste": self.padding_waste}
