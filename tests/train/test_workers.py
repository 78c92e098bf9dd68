"""Ray Train workers: 2 workers and 1 worker on the same global batch give the same update,
with DDP and with DeepSpeed ZeRO-2; metrics are means over the global batch.

The learning rate is small on purpose: Adam's first step moves each weight by lr * g / (|g| + eps),
so a gradient element within float rounding of 0 (summed in a different order by the all-reduce)
can move by up to lr either way. At lr = 1e-4 that rounding stays below the 1e-6 tolerance.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import ray.data
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raydpo.config import LossConfig, TrainConfig
from raydpo.data.synthetic import max_rows
from raydpo.data.tokenize import TokenizeSettings, tokenize_pair
from raydpo.logprobs import model_sequence_logps, pair_batch
from raydpo.models import build_tiny_tokenizer, load_model, write_tiny
from raydpo.train.loop import LoopArgs, train_loop_per_worker

GLOBAL_BATCH = 8


def _rows(model_dir: Path) -> list[dict]:
    """8 tokenized pairs with reference columns from the initial model."""
    tok = build_tiny_tokenizer()
    model = load_model(str(model_dir)).eval()
    rows = []
    for r in max_rows(GLOBAL_BATCH, seed=11):
        p = tokenize_pair(tok, [{"role": "user", "content": r["prompt"]}], [{"role": "assistant", "content": r["chosen"]}],
                          [{"role": "assistant", "content": r["rejected"]}], TokenizeSettings(64, 32))
        rows.append({"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids})
    with torch.no_grad():
        batch = pair_batch([r["prompt_ids"] for r in rows], [r["chosen_ids"] for r in rows],
                           [r["rejected_ids"] for r in rows], tok.pad_token_id)
        logps = model_sequence_logps(model, batch)
    for i, r in enumerate(rows):
        r["ref_chosen_logps"], r["ref_rejected_logps"] = float(logps[i]), float(logps[GLOBAL_BATCH + i])
    return rows


def _train(tmp: Path, model_dir: Path, rows: list[dict], engine: str, workers: int, micro: int,
           max_tokens: int | None = None) -> tuple[dict, dict]:
    out = tmp / f"{engine}-{workers}"
    train = ray.data.from_items(rows).materialize()
    train_cfg = TrainConfig(engine=engine, num_workers=workers, batch_size=GLOBAL_BATCH, micro_batch_size=micro,
                            lr=1e-4, schedule="constant", max_tokens_per_batch=max_tokens)
    args = LoopArgs(
        train=train_cfg, loss=LossConfig(beta=0.5), model_path=str(model_dir), output_dir=str(out),
        local_batch_size=GLOBAL_BATCH // workers, total_steps=1, steps_per_epoch=1,
        train_blocks=train.to_arrow_refs(), train_rows=len(rows), has_eval=False,
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"args": args},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 2 / workers}),
        run_config=RunConfig(name="t", storage_path=str(out / "ray")),
    )
    result = trainer.fit()
    return load_model(str(out / "final")).state_dict(), result.metrics


@pytest.fixture(scope="module")
def one_worker(ray_local, tmp_path_factory):
    """The reference side, trained once for both engines: 1 DDP worker x 1 micro-batch of 8 pairs
    in one packed row (ZeRO-2 equals DDP to 1e-6 in one process: tests/train/test_engine.py)."""
    tmp = tmp_path_factory.mktemp("one-worker")
    model_dir = write_tiny(tmp / "model", seed=5)
    rows = _rows(model_dir)
    params, metrics = _train(tmp, model_dir, rows, "ddp", 1, micro=8)
    return model_dir, rows, params, metrics


@pytest.mark.slow  # three Ray Train runs compared, with 1 and 2 workers
@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_workers_equal_one(one_worker, tmp_path, engine):
    model_dir, rows, one, m1 = one_worker
    # 2 workers x 2 micro-batches of 2 pairs each packed into rows of at most 24 tokens, against
    # the 1-worker run: the loss normalisation and the update are the same however the global
    # batch is split.
    two, m2 = _train(tmp_path, model_dir, rows, engine, 2, micro=2, max_tokens=24)
    initial = load_model(str(model_dir)).state_dict()
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 5e-5  # it did update (Adam moves ~lr)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0)
    # Metrics are global means: the 2-worker run reports the same numbers as the 1-worker run,
    # although each of its workers saw a different half of the batch.
    for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-6), key
    # The checkpoint's manifest, hashed by both ranks, lists both ranks' files, and it verifies.
    import json

    import pyarrow.fs

    from raydpo.train.checkpoints import MANIFEST, verify

    folder = sorted(p for p in (tmp_path / f"{engine}-2" / "ray" / "t").glob("checkpoint_*") if p.is_dir())[-1]
    files = set(json.loads((folder / MANIFEST).read_text())["files"])
    assert {"loop_state.json", "rng_rank0.pt", "rng_rank1.pt"} <= files, files
    if engine == "deepspeed":
        assert sum(name.endswith("optim_states.pt") for name in files) == 2, files  # one partition per rank
    assert verify(pyarrow.fs.LocalFileSystem(), str(folder)).damage is None
