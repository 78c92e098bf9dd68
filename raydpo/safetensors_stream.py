"""Safetensors files one tensor at a time, without memory-mapping them.

``safetensors.safe_open`` maps the whole file: every page a read touches stays in the process's
resident set until the file is closed, so reading a checkpoint tensor by tensor through one handle
ends with the whole checkpoint resident. Here each tensor is read with a plain ``readinto`` into
its own buffer (the page cache keeps the file; the process keeps one tensor), and a checkpoint is
written from a stream of tensors: each file's header (names, dtypes, shapes, offsets) is known
before its first tensor arrives, so the writer holds none of them.

The file format (https://github.com/huggingface/safetensors): an 8-byte little-endian header
length, a JSON header ``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``
padded with spaces to 8 bytes, then the tensors' bytes (row-major, little-endian). A folder of
several files has ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``), as
``save_pretrained`` writes it and ``from_pretrained`` reads it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_CODES = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape: what a header needs before its bytes exist."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class _Located:
    file: Path
    spec: TensorSpec
    begin: int  # absolute byte offset in ``file``


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header and the offset of the data section."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


class SafetensorsFolder:
    """The tensors of an HF folder's safetensors files (one file, or shards named by the index),
    read one at a time with plain reads."""

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        index = folder / INDEX_FILE
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) \
            if index.exists() else [folder / SINGLE_FILE]
        self.tensors: dict[str, _Located] = {}
        for path in files:
            header, data = _header(path)
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                if entry["dtype"] not in _DTYPES:
                    raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, which is not read here")
                spec = TensorSpec(name, _DTYPES[entry["dtype"]], tuple(entry["shape"]))
                self.tensors[name] = _Located(path, spec, data + entry["data_offsets"][0])

    def read(self, name: str) -> Tensor:
        """The tensor ``name``, in its stored dtype, in a buffer of its own (no mapping of the file)."""
        t = self.tensors[name]
        out = torch.empty(t.spec.shape, dtype=t.spec.dtype)
        buf = out.reshape(-1).view(torch.uint8).numpy()
        with open(t.file, "rb", buffering=0) as f:
            f.seek(t.begin)
            done = 0
            while done < len(buf):  # one read() may return less than asked (large reads)
                n = f.readinto(memoryview(buf)[done:])
                if not n:
                    raise EOFError(f"{t.file}: tensor {name} is cut short")
                done += n
        return out


def shard_plan(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """``specs`` in order, cut into files of at most ``max_shard_bytes`` (a tensor larger than
    that is a file of its own), as ``save_pretrained`` cuts them."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _file_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_checkpoint(folder: str | os.PathLike, specs: list[TensorSpec], tensors: Iterable[tuple[str, Tensor]],
                     max_shard_bytes: int = 2 * 2**30) -> list[Path]:
    """Write ``tensors`` (``(name, CPU tensor)``, in the order of ``specs``, each matching its
    spec) into ``folder`` as HF safetensors files plus, when there are several, the index.
    Each tensor is written as it arrives and dropped: the caller's stream bounds the memory.
    Returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = shard_plan(specs, max_shard_bytes)
    names = _file_names(len(shards))
    stream = iter(tensors)
    for name, shard in zip(names, shards):
        _write_file(folder / name, shard, stream)
    if next(stream, None) is not None:
        raise ValueError("more tensors than specs")
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {s.name: n for n, shard in zip(names, shards) for s in shard}}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return [folder / n for n in names]


def _write_file(path: Path, shard: list[TensorSpec], stream) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}  # transformers refuses files without it
    offset = 0
    for s in shard:
        header[s.name] = {"dtype": _CODES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for s in shard:
            got = next(stream, None)
            if got is None:
                raise ValueError(f"the stream ended before tensor {s.name}")
            name, tensor = got
            if name != s.name or tensor.dtype != s.dtype or tuple(tensor.shape) != s.shape:
                raise ValueError(f"expected {s.name} {s.dtype} {s.shape}, got {name} {tensor.dtype} "
                                 f"{tuple(tensor.shape)}")
            f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
