"""Every tensor the step hands to a collective lives on the training device.

nccl (what Ray Train uses for GPU workers) has no CPU tensors, so a CPU tensor in a collective
crashes every multi-GPU run at step 1. This CPU-only machine has no CUDA, but it has another real
device: torch's lazy-tensor backend (``lazy``, TorchScript on the CPU). The test trains on it, with
``torch.distributed`` reporting two workers and its collectives recording the device of every
tensor they are given, so a tensor built on the CPU (as ``torch.tensor(...)`` without a device is)
fails the test the way nccl would fail the run.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from raydpo.logprobs import PolicyScorer
from raydpo.losses import LossParams
from raydpo.models import build_tiny_model
from raydpo.train.engine import OptimConfig, build_engine
from raydpo.train.step import LossSpec, RunningMean, evaluate, train_step


@pytest.fixture(scope="module")
def lazy() -> torch.device:
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    return torch.device("lazy")


def _batch(seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)

    def ids(n: int) -> np.ndarray:
        return g.integers(3, 60, n).astype(np.int32)

    rows = [(ids(3), ids(4), ids(2)), (ids(2), ids(3), ids(5))]
    return {
        "prompt_ids": np.array([r[0] for r in rows], dtype=object),
        "chosen_ids": np.array([r[1] for r in rows], dtype=object),
        "rejected_ids": np.array([r[2] for r in rows], dtype=object),
        "ref_chosen_logps": np.array([-9.0, -12.0], dtype=np.float32),
        "ref_rejected_logps": np.array([-8.0, -10.0], dtype=np.float32),
    }


def test_collectives_get_training_device_tensors(lazy: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_tiny_model(60, hidden_size=32, num_layers=1, num_heads=1, seed=0)
    engine = build_engine("ddp", PolicyScorer(model), OptimConfig(lr=1e-3), grad_accum_steps=2,
                          micro_batch_size=2, device=lazy)
    assert engine.device.type == "lazy"

    seen: list[torch.device] = []

    def record(tensor: torch.Tensor, *args, **kwargs) -> None:
        seen.append(tensor.device)  # a sum over two identical workers: left as it is

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, record)

    spec = LossSpec({"sigmoid": 1.0, "bco_pair": 0.5}, LossParams(beta=0.1))  # bco_pair all-reduces its mean
    metrics = train_step(engine, [_batch(0), _batch(1)], spec, pad_id=0, bco=RunningMean())
    eval_metrics = evaluate(engine, [_batch(2)], spec, pad_id=0)

    assert np.isfinite(metrics["loss"]) and np.isfinite(eval_metrics["eval_loss"])
    assert len(seen) >= 4  # two bco means, the step's sums, the eval sums
    assert all(d.type == "lazy" for d in seen), f"collective tensors on {sorted(set(map(str, seen)))}, training on lazy"
