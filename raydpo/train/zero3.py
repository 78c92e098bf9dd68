"""Loading a model straight into DeepSpeed ZeRO-3 partitions, one parameter at a time.

Under ZeRO-3 each of W ranks keeps 1/W of every parameter. Loading the whole model on every rank
first (and letting ``deepspeed.initialize`` partition it) needs the whole model in every worker's
memory, W times over on one host. Here no process ever holds more than one full parameter:

1. the model is built under transformers' ZeRO-3 integration (``HfDeepSpeedConfig`` alive around
   ``from_config``: ``deepspeed.zero.Init`` partitions each layer's parameters as it is
   constructed, in the DeepSpeed config's dtype: bf16 with ``bf16.enabled``);
2. each parameter is gathered in turn (``deepspeed.zero.GatheredParameters``, modifier rank 0), rank
   0 copies the checkpoint's tensor into it, read from the safetensors file with a plain read
   (:class:`~raydpo.safetensors_stream.SafetensorsFolder`), and DeepSpeed re-partitions it from
   rank 0's values on leaving the block.

Why not ``from_pretrained`` under ``HfDeepSpeedConfig``: in transformers 5 its ZeRO-3 path reads the
whole checkpoint into one state dict on rank 0 before copying it into the partitions
(``modeling_utils._load_pretrained_model``: ``merged_state_dict``), a full copy on rank 0, and
memory-mapped reads keep every page they touch resident until the file is closed.

The DeepSpeed config given here must be the one ``deepspeed.initialize`` then gets
(:func:`raydpo.train.engine.deepspeed_config`, built once by the caller).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raydpo.models import DTYPES
from raydpo.safetensors_stream import SafetensorsFolder

__all__ = ["load_partitioned"]


def _local_folder(name_or_path: str) -> Path:
    """A local folder as it is; a hub id downloaded (its safetensors and configs) into the HF cache."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors"]))


def load_partitioned(name_or_path: str, dtype: str, ds_config: dict[str, Any]) -> torch.nn.Module:
    """COLLECTIVE (every rank, a process group initialised): the causal LM at ``name_or_path`` (a
    folder of safetensors, or a hub id) with its parameters ZeRO-3 partitioned over the ranks, in
    ``dtype`` (the DeepSpeed config's bf16 setting decides the partitions' dtype; ``dtype`` must
    agree with it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        raise ValueError("load_partitioned needs a ZeRO stage 3 DeepSpeed config")
    bf16 = ds_config.get("bf16", {}).get("enabled", False)
    if (dtype == "bfloat16") != bf16 or dtype == "float16":
        raise ValueError(f"model dtype {dtype} does not match the DeepSpeed config (bf16.enabled: {bf16})")
    folder = _local_folder(name_or_path)
    weights = SafetensorsFolder(folder)
    config = AutoConfig.from_pretrained(folder)
    # transformers keeps a weak reference to this object: while it lives, from_config builds under
    # deepspeed.zero.Init (and initialises each layer on rank 0, gathered, as it does for any new model).
    keep = HfDeepSpeedConfig(ds_config)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    finally:
        unset_hf_deepspeed_config()
        del keep
    _copy_weights(model, weights, str(folder))
    _release_free_heap()
    return model


def _release_free_heap() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    Building under ``zero.Init`` allocates each layer's parameters whole and frees them once
    partitioned, and every gather allocates and frees one parameter; below glibc's mmap threshold
    these come from the heap, whose freed pages stay resident. On SmolLM2-135M, 2 ranks, that was
    ~300 MB per rank (bench/zero3_load.py), resident under everything DeepSpeed allocates next."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _copy_weights(model: torch.nn.Module, weights: SafetensorsFolder, where: str) -> None:
    """COLLECTIVE: every parameter and persistent buffer of ``model`` from ``weights``; tied
    parameters (one object under several names) once, from whichever name the file has."""
    import deepspeed

    rank = dist.get_rank()
    prefix = getattr(model, "base_model_prefix", "")
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(tensor), []).append(name)
        tensors[id(tensor)] = tensor

    def stored(names: list[str]) -> str | None:
        for name in names:
            for key in (name, name.removeprefix(f"{prefix}.")):  # a base model's file has no prefix
                if key in weights.tensors:
                    return key
        return None

    missing = [names[0] for key, names in aliases.items() if stored(names) is None]
    if missing:
        raise ValueError(f"{where}: the checkpoint has no tensor for {', '.join(missing[:5])}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    with torch.no_grad():
        for key, names in aliases.items():
            tensor, source = tensors[key], stored(names)
            shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
            if weights.tensors[source].spec.shape != shape:
                raise ValueError(f"{where}: {source} has shape {weights.tensors[source].spec.shape}, the model's "
                                 f"{names[0]} {shape}")
            if hasattr(tensor, "ds_id"):  # a partitioned parameter
                with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                    if rank == 0:
                        tensor.data.copy_(weights.read(source))
            else:  # a buffer (never partitioned): every rank reads it; they are small
                tensor.copy_(weights.read(source))
