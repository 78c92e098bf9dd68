"""bco_pair's running reward mean, as the training step maintains it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydpo.losses import LossParams
from raydpo.models import build_tiny_model, build_tiny_tokenizer
from raydpo.train.step import LossSpec, RunningMean, pair_forward


def test_running_mean_by_hand():
    """Batches (mean 1.0 over 2 pairs), then (mean 4.0 over 1 pair): (1*2 + 4*1) / 3 = 2.0."""
    r = RunningMean()
    assert r.update(torch.tensor(1.0), 2) == pytest.approx(1.0)
    assert r.update(torch.tensor(4.0), 1) == pytest.approx(2.0)
    assert r.count == 3


def test_bco_pair_step_uses_the_updated_mean():
    """TRL order: the batch's mean reward enters delta before that batch's loss is computed."""
    tok = build_tiny_tokenizer()
    model = build_tiny_model(len(tok), seed=1).eval()
    batch = {
        "prompt_ids": np.array([np.array([4, 7, 8]), np.array([4, 9])], dtype=object),
        "chosen_ids": np.array([np.array([10, 2]), np.array([11, 12, 2])], dtype=object),
        "rejected_ids": np.array([np.array([13, 2]), np.array([14, 2])], dtype=object),
        "ref_chosen_logps": np.array([-9.0, -12.0], dtype=np.float32),
        "ref_rejected_logps": np.array([-8.0, -10.0], dtype=np.float32),
    }
    spec = LossSpec({"bco_pair": 1.0}, LossParams(beta=0.5))
    bco = RunningMean(mean=0.3, count=6)
    with torch.no_grad():
        loss, sums = pair_forward(model, batch, spec, tok.pad_token_id, torch.device("cpu"), bco)
    # Independently: the rewards are the sums' rewards; the new mean folds 2 pairs' mean into 6.
    rc, rr = sums[2].item() / 2, sums[3].item() / 2  # mean chosen / rejected reward
    delta = (0.3 * 6 + (rc + rr) / 2 * 2) / 8
    assert bco.mean == pytest.approx(delta, rel=1e-6)
    assert bco.count == 8
    with torch.no_grad():
        _, plain = pair_forward(model, batch, LossSpec({"bco_pair": 1.0}, LossParams(beta=0.5, bco_delta=delta)),
                                tok.pad_token_id, torch.device("cpu"))
    assert loss.item() == pytest.approx(plain[1].item() / 2, rel=1e-6)


def test_to_device_on_the_cpu_is_a_plain_copy() -> None:
    """Pinning is for CUDA only (no pinned memory without it): on the CPU the layout arrives as it was."""
    from raydpo.logprobs import pair_batch, to_device

    layout = pair_batch([[4, 5]], [[6, 7, 2]], [[8, 2]], 0, packed=True)
    moved = to_device(layout, torch.device("cpu"))
    assert moved.keys() == layout.keys()
    for k, v in layout.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(moved[k], v) and not moved[k].is_pinned(), k
        else:  # host values (the packed bounds) travel as they are
            assert moved[k] is v, k
