"""raydpo.precision: the trainer's precision, defined once, and the contexts it gives."""
from __future__ import annotations

import pytest
import torch

from raydpo.config import ModelConfig, TrainConfig
from raydpo.precision import Precision, allow_tf32


@pytest.mark.parametrize("engine, bf16, dtype, expected", [
    ("ddp", True, "float32", Precision("float32", "bfloat16")),  # float32 masters, bf16 matmuls
    ("deepspeed", True, "bfloat16", Precision("bfloat16")),  # DeepSpeed keeps float32 masters itself
    ("deepspeed", True, "float32", Precision("bfloat16")),  # DeepSpeed casts the module to bf16 anyway
    ("ddp", False, "float32", Precision("float32")),
    ("deepspeed", False, "float32", Precision("float32")),
])
def test_from_config(engine: str, bf16: bool, dtype: str, expected: Precision) -> None:
    got = Precision.from_config(ModelConfig(name_or_path="tiny", dtype=dtype), TrainConfig(engine=engine, bf16=bf16))
    assert got == expected


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
