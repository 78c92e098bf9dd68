"""The trainer that lives across online rounds (``raydpo.train.round_trainer``), on a real local
Ray and real Ray Train workers (one DDP worker; two ZeRO-3 workers in the slow tier): a round
trained on it is the offline ``train_policy`` of the same pairs from the same policy, to the last
bit; its scoring of the pairs before a round (the
reference of ``online.reference: previous_round``) agrees with the reference actors; the weights
it sends over a collective are the round's HF folder's."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from raydpo.config import LossConfig, ReferenceConfig, TrainConfig
from raydpo.models import write_tiny

TRAIN = TrainConfig(batch_size=8, micro_batch_size=4, epochs=1, lr=1e-2, log_every=1, schedule="constant")
ZERO3 = TrainConfig(**{**TRAIN.model_dump(), "engine": "deepspeed", "zero_stage": 3, "num_workers": 2,
                       "micro_batch_size": 2})
SEQ = pa.list_(pa.int32())


def _pairs(n: int, seed: int) -> pa.Table:
    """``n`` pairs of random token ids (3-6 prompt tokens, 2-5 completion tokens each side)."""
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[list[int]]:
        return [rng.integers(4, 60, rng.integers(lo, hi + 1)).tolist() for _ in range(n)]

    return pa.table({"prompt_ids": pa.array(ids(3, 6), SEQ), "chosen_ids": pa.array(ids(2, 5), SEQ),
                     "rejected_ids": pa.array(ids(2, 5), SEQ)})


@pytest.mark.parametrize("train", [TRAIN, pytest.param(ZERO3, marks=pytest.mark.slow, id="zero3-2-workers")],
                         ids=lambda t: f"{t.engine}-{t.num_workers}-worker")
def test_a_round_on_the_live_trainer_is_the_offline_training_and_its_scores_and_weights_are_right(
        ray_local, tmp_path, train):
    import ray.data

    from actors.reference import ReferencePool, reference_cache
    from raydpo.data.tokenize import TokenizeSettings
    from raydpo.train.policy import train_policy
    from raydpo.train.round_trainer import RoundTrainer
    from raydpo.weight_sync import WeightReceiver

    model = str(write_tiny(tmp_path / "tiny", hidden_size=32, num_layers=2, num_heads=2, seed=0))
    pairs = _pairs(16, seed=1)
    trainer = RoundTrainer(model, tmp_path / "online", train, LossConfig(), "float32")
    try:
        # The policy scores the pairs before it trains: the reference actors' numbers for the same model.
        scored = trainer.score(pairs)
        settings = ReferenceConfig(num_cpus=0, cache_dir=str(tmp_path / "cache"))
        pool = ReferencePool(reference_cache(model, None, None, TokenizeSettings(max_length=64), settings), model, settings)
        try:
            with_ref, stats = pool.add_logps(pairs)
        finally:
            pool.shutdown()
        assert stats.misses == 16 and stats.model_loads == 1
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(scored[f"ref_{side}_logps"], with_ref[f"ref_{side}_logps"].to_numpy(),
                                       rtol=0, atol=1e-4)

        # One round on the live trainer; the weights it then sends are the round's folder's, bit for
        # bit (the receiver is this process).
        train_pairs = pairs.append_column("ref_chosen_logps", with_ref["ref_chosen_logps"]).append_column(
            "ref_rejected_logps", with_ref["ref_rejected_logps"])
        result = trainer.end_train(trainer.begin_train(train_pairs, 1, tmp_path / "r1", 0, None))
        assert not result["stopped"] and result["last_step"] == 2
        assert trainer.wait_saved() == str(tmp_path / "r1" / "final")
        live_weights = load_file(str(tmp_path / "r1" / "final" / "model.safetensors"))
        index, endpoint = trainer.begin_send(1, 60.0)
        with WeightReceiver(endpoint, 1) as receiver:
            received = dict(receiver.receive())
        sent = trainer.end_send(index)
        assert live_weights.keys() <= received.keys()  # the folder drops the head tied to the embeddings
        assert all(torch.equal(received[k], live_weights[k]) for k in live_weights)
        assert sent["bytes"] == sum(t.numel() * t.element_size() for t in received.values())
    finally:
        trainer.close()

    # = a new train_policy from the same weights on the same pairs (its workers need the CPUs the
    # live trainer held).
    offline = train_policy(ray.data.from_arrow(train_pairs), None, model_path=model, out_dir=tmp_path / "offline",
                           train=train, loss=LossConfig(), dtype="float32", tracker=None)
    offline_weights = load_file(str(offline.final_dir / "model.safetensors"))
    initial = load_file(str(tmp_path / "tiny" / "model.safetensors"))
    assert live_weights.keys() == offline_weights.keys()
    assert all(torch.equal(live_weights[k], offline_weights[k]) for k in live_weights)
    assert any(not torch.equal(live_weights[k], initial[k]) for k in initial)  # it did train
