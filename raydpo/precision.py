"""The numerics of the policy's forward, defined once: the trainer, the reference actors and the
generators compute at the same precision, so at step 0 (policy = reference) the DPO rewards are 0
up to rounding, not the gap between two precisions.

=========================  ===================  ==============  =====================================
trainer                    weights (in memory)  autocast        why
=========================  ===================  ==============  =====================================
DDP, ``train.bf16``        float32              bfloat16        float32 master weights, bf16 matmuls
DeepSpeed, ``train.bf16``  bfloat16             none            DeepSpeed keeps float32 masters itself
no ``train.bf16``          ``model.dtype``      none            plain float32
=========================  ===================  ==============  =====================================

No Ray or MLflow here: training workers, actors and benchmarks import it alike.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import ContextManager

import torch

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Precision:
    """How a forward computes: its weights' dtype and the autocast dtype around it (None: none).
    ``autocast(device)`` is the context to run every forward in."""

    weights: str  # "float32", "bfloat16" or "float16": the dtype the model is loaded in
    autocast_dtype: str | None = None  # "bfloat16": matmuls (and other autocast ops) run in bf16

    def __post_init__(self) -> None:
        if self.weights not in DTYPES:
            raise ValueError(f"weights dtype {self.weights!r}: one of {', '.join(DTYPES)}")
        if self.autocast_dtype not in (None, "bfloat16"):
            raise ValueError(f"autocast dtype {self.autocast_dtype!r}: bfloat16 or None")

    @classmethod
    def of_trainer(cls, weights: str, engine: str, bf16: bool) -> Precision:
        """The trainer's precision from its resolved settings (``model.dtype``, ``train.engine``,
        ``train.bf16``: ``raydpo.config`` resolves their autos at validation and calls this)."""
        if not bf16:
            return cls(weights=weights)
        if engine == "deepspeed":  # DeepSpeed's bf16 mode casts the module to bf16 itself
            return cls(weights="bfloat16")
        return cls(weights="float32", autocast_dtype="bfloat16")

    @property
    def compute_dtype(self) -> str:
        """The dtype the matmuls run in: what a generator (vLLM, or a plain model) is loaded in."""
        return self.autocast_dtype or self.weights

    @property
    def key(self) -> str:
        """A short name for cache keys: ``float32``, ``bfloat16``, ``float32+autocast:bfloat16``
        (a value without autocast keeps the weights' name, as before autocast was part of it)."""
        return self.weights if self.autocast_dtype is None else f"{self.weights}+autocast:{self.autocast_dtype}"

    def torch_dtype(self) -> torch.dtype:
        """The weights' dtype as a torch dtype."""
        return getattr(torch, self.weights)

    def autocast(self, device: torch.device) -> ContextManager:
        """The context every forward runs in: ``torch.autocast(device.type, bfloat16)`` or nothing."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=getattr(torch, self.autocast_dtype))


def allow_tf32(device: torch.device) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on CUDA (Ampere and later: ~8x float32's
    rate, 10-bit mantissa products, float32 accumulation); nothing elsewhere. torch 2.9+ has a new
    flag API and refuses a mix of old and new in one process, so the new one is used where it
    exists."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
