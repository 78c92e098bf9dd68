"""Tests for raydpo.train.engine: DDP and DeepSpeed ZeRO agree, checkpoints resume exactly.

Multi-process tests use real torch.distributed (gloo on 127.0.0.1, free ports) in processes
started with torch.multiprocessing.spawn; results come back through files in tmp_path.
Single-process runs happen in the pytest process itself, which also exercises the
"no process group yet" path (DeepSpeed then creates a 1-process gloo group).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing.forkserver
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raydpo.train.engine import Engine, OptimConfig, build_engine

GLOBAL_BATCH = 8
SEQ_LEN = 8
VOCAB = 32
N_STEPS = 2
# warmup 1 then linear decay over 4 steps; clipping at 1.0 is active for this model/data.
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.01, warmup_steps=1, total_steps=4, schedule="linear", max_grad_norm=1.0)


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _global_batches(n_steps: int) -> torch.Tensor:
    """(n_steps, GLOBAL_BATCH, SEQ_LEN) token ids, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (n_steps, GLOBAL_BATCH, SEQ_LEN), generator=g)


def _train(engine: Engine, batches: torch.Tensor, rank: int, world_size: int, grad_accum: int) -> tuple[list[float], list[float]]:
    """Run one optimizer step per global batch; this rank takes its contiguous share of rows.

    Every micro-batch has the same number of rows (and tokens), so the mean of the
    micro-batch means over all ranks equals the mean loss over the whole global batch.
    Returns (per-step mean of this rank's micro-batch losses, per-step grad norms).
    """
    per_rank = batches.shape[1] // world_size
    micro = per_rank // grad_accum
    losses, norms = [], []
    for batch in batches:
        local = batch[rank * per_rank : (rank + 1) * per_rank]
        step_loss = 0.0
        for m in range(grad_accum):
            ids = local[m * micro : (m + 1) * micro].to(engine.device)
            loss = engine.module(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            step_loss += loss.item() / grad_accum
        norms.append(engine.step())
        losses.append(step_loss)
    return losses, norms


def _params(engine: Engine) -> dict[str, torch.Tensor]:
    return engine.full_state_dict()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _dp_worker(rank: int, world_size: int, port: int, kind: str, zero_stage: int, out_dir: str) -> None:
    """One data-parallel rank: micro-batch 2, grad accum 2, two optimizer steps."""
    # What Ray Train provides: env vars + an initialised gloo process group.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        grad_accum = 2
        micro = GLOBAL_BATCH // world_size // grad_accum
        engine = build_engine(
            kind, _tiny_llama(), OPTIM, grad_accum_steps=grad_accum, micro_batch_size=micro, zero_stage=zero_stage
        )
        losses, norms = _train(engine, _global_batches(N_STEPS), rank, world_size, grad_accum)
        params = _params(engine)
        assert rank == 0 or zero_stage != 3 or params == {}  # ZeRO-3 gathers onto rank 0 only
        if rank == 0:
            torch.save({"params": params, "norms": norms, "lr": engine.learning_rate()}, Path(out_dir) / "result.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_two_ranks(kind: str, zero_stage: int, tmp_path: Path) -> dict:
    # "forkserver" rather than "spawn": the server imports torch/transformers/deepspeed once
    # (preloaded below) and forks fresh workers from that clean, single-threaded, process-group
    # free state. Plain spawn re-imports everything in every worker (~15 s each on 2 cores);
    # plain fork would copy the pytest process, which may already hold a process group.
    multiprocessing.forkserver.set_forkserver_preload(
        ["torch", "torch.distributed", "transformers.models.llama.modeling_llama", "deepspeed", __name__]
    )
    mp.start_processes(
        _dp_worker,
        args=(2, _free_port(), kind, zero_stage, str(tmp_path)),
        nprocs=2,
        join=True,
        start_method="forkserver",
    )
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _run_single(kind: str, zero_stage: int = 2, grad_accum: int = 2) -> tuple[Engine, list[float], list[float]]:
    micro = GLOBAL_BATCH // grad_accum
    engine = build_engine(kind, _tiny_llama(), OPTIM, grad_accum_steps=grad_accum, micro_batch_size=micro, zero_stage=zero_stage)
    losses, norms = _train(engine, _global_batches(N_STEPS), 0, 1, grad_accum)
    return engine, losses, norms


def _assert_params_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def _assert_changed(params: dict[str, torch.Tensor]) -> None:
    init = _tiny_llama().state_dict()
    assert any(not torch.equal(init[k], params[k]) for k in init), "parameters were not updated"


# ---------------------------------------------------------------------------------------------
# 1. Data parallel over 2 ranks == 1 process with the whole global batch.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "zero_stage"), [("ddp", 2), ("deepspeed", 2), ("deepspeed", 3)], ids=["ddp", "deepspeed", "deepspeed-zero3"]
)
def test_two_ranks_match_single_process(kind: str, zero_stage: int, tmp_path: Path) -> None:
    """ZeRO-3 also checks full_state_dict on rank 1 (DeepSpeed gives it None; we give {})."""
    single, _, single_norms = _run_single(kind, zero_stage)
    expected = _params(single)
    _assert_changed(expected)
    assert single_norms[0] > OPTIM.max_grad_norm  # clipping is exercised

    result = _run_two_ranks(kind, zero_stage, tmp_path)
    _assert_params_close(result["params"], expected, atol=1e-6)
    assert result["norms"] == pytest.approx(single_norms, rel=1e-5, abs=1e-6)
    assert result["lr"] == single.learning_rate()


def test_deepspeed_zero2_matches_ddp() -> None:
    ddp, ddp_losses, ddp_norms = _run_single("ddp")
    ds, ds_losses, ds_norms = _run_single("deepspeed", zero_stage=2)
    _assert_params_close(_params(ds), _params(ddp), atol=1e-6)
    assert ds_losses == pytest.approx(ddp_losses, rel=1e-6)
    assert ds_norms == pytest.approx(ddp_norms, rel=1e-5)
    assert ds.learning_rate() == ddp.learning_rate()


def test_deepspeed_zero3_matches_zero2() -> None:
    """ZeRO-3 (parameters partitioned, full_state_dict gathers them) gives the ZeRO-2 result."""
    z2, z2_losses, z2_norms = _run_single("deepspeed", zero_stage=2)
    z3, z3_losses, z3_norms = _run_single("deepspeed", zero_stage=3)
    _assert_params_close(_params(z3), _params(z2), atol=1e-6)
    assert z3_losses == pytest.approx(z2_losses, rel=1e-6)
    assert z3_norms == pytest.approx(z2_norms, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. save / load resumes bit-exactly.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "zero_stage"),
    [("ddp", 2), ("deepspeed", 2), ("deepspeed", 3)],
    ids=["ddp", "deepspeed-zero2", "deepspeed-zero3"],
)
def test_save_load_round_trip(kind: str, zero_stage: int, tmp_path: Path) -> None:
    grad_accum = 2
    batches = _global_batches(2 * N_STEPS)
    first, second = batches[:N_STEPS], batches[N_STEPS:]

    def fresh() -> Engine:
        return build_engine(
            kind, _tiny_llama(), OPTIM, grad_accum_steps=grad_accum, micro_batch_size=GLOBAL_BATCH // grad_accum,
            zero_stage=zero_stage,
        )

    engine = fresh()
    _train(engine, first, 0, 1, grad_accum)
    engine.save(str(tmp_path / "ckpt"))
    lr_at_save = engine.learning_rate()
    losses, norms = _train(engine, second, 0, 1, grad_accum)
    expected = _params(engine)

    resumed = fresh()
    resumed.load(str(tmp_path / "ckpt"))
    assert resumed.learning_rate() == lr_at_save
    resumed_losses, resumed_norms = _train(resumed, second, 0, 1, grad_accum)
    assert resumed_losses == losses
    assert resumed_norms == norms
    assert resumed.learning_rate() == engine.learning_rate()
    _assert_params_close(_params(resumed), expected, atol=0)


# ---------------------------------------------------------------------------------------------
# 3. LR schedule.
# ---------------------------------------------------------------------------------------------


def _lrs_through_engine(kind: str, optim: OptimConfig, n_steps: int) -> list[float]:
    """learning_rate() before the first step and after each step, on a tiny linear model."""
    torch.manual_seed(0)
    engine = build_engine(kind, torch.nn.Linear(4, 1), optim, grad_accum_steps=1, micro_batch_size=1)
    lrs = [engine.learning_rate()]
    x = torch.ones(1, 4, device=engine.device)
    for _ in range(n_steps):
        engine.backward(engine.module(x).sum())
        engine.step()
        lrs.append(engine.learning_rate())
    return lrs


@pytest.mark.parametrize("kind", ["ddp", "deepspeed"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_lr_schedule(kind: str, schedule: str) -> None:
    from transformers import get_scheduler

    optim = OptimConfig(lr=1.0, warmup_steps=2, total_steps=6, schedule=schedule, max_grad_norm=0.0)
    lrs = _lrs_through_engine(kind, optim, n_steps=6)

    # Hand-computed values at steps 0..6 (learning_rate() = the LR the next step uses).
    warmup = [0.0, 0.5]
    decay_steps = range(2, 7)
    expected_by_hand = {
        "linear": warmup + [(6 - k) / 4 for k in decay_steps],
        "cosine": warmup + [0.5 * (1 + math.cos(math.pi * (k - 2) / 4)) for k in decay_steps],
        "constant": warmup + [1.0 for _ in decay_steps],
    }[schedule]
    assert lrs == pytest.approx(expected_by_hand, abs=1e-12)

    # And the same as transformers.get_scheduler driving a bare optimizer.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    name = "constant_with_warmup" if schedule == "constant" else schedule
    sched = get_scheduler(name, optimizer=opt, num_warmup_steps=2, num_training_steps=6)
    reference = [opt.param_groups[0]["lr"]]
    for _ in range(6):
        opt.step()
        sched.step()
        reference.append(opt.param_groups[0]["lr"])
    assert lrs == reference


def test_grad_norm_reported_without_clipping() -> None:
    """max_grad_norm=0 disables clipping but step() still returns the (unclipped) norm."""
    optim = OptimConfig(lr=0.0, max_grad_norm=0.0)
    torch.manual_seed(0)
    engine = build_engine("ddp", torch.nn.Linear(3, 1, bias=False), optim, grad_accum_steps=2, micro_batch_size=1)
    x1, x2 = torch.tensor([[1.0, 2.0, 2.0]]), torch.tensor([[3.0, 0.0, 4.0]])
    engine.backward(engine.module(x1).sum())
    engine.backward(engine.module(x2).sum())
    # Mean of the two micro-batch gradients = (2, 1, 3) -> norm sqrt(14).
    assert engine.step() == pytest.approx(math.sqrt(14.0))
    # backward/step misuse is an error, not a silent skipped update.
    with pytest.raises(RuntimeError):
        engine.step()


# ---------------------------------------------------------------------------------------------
# 4. Precision: bf16 compute, float32 master weights.
# ---------------------------------------------------------------------------------------------

TINY_LR = OptimConfig(lr=1e-6, total_steps=1, schedule="constant", max_grad_norm=0.0)


def _norm_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The RMSNorm scales: initialised to exactly 1.0, so an update of ~lr is below bf16's step."""
    return [p for n, p in model.named_parameters() if n.endswith("norm.weight")]


def test_ddp_bf16_autocast_keeps_float32_master_weights() -> None:
    """AdamW's first step moves each weight by ~lr = 1e-6. bf16 spaces values near 1.0 by 2^-8,
    so a pure-bf16 model keeps its norm scales at exactly 1.0; our float32 weights move."""
    ids = _global_batches(1)[0]
    engine = build_engine("ddp", _tiny_llama(), TINY_LR, grad_accum_steps=1, micro_batch_size=GLOBAL_BATCH, bf16=True)
    with engine.autocast():
        out = engine.module(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16  # the forward did run in bf16
    engine.backward(out.loss)
    engine.step()
    assert all(p.dtype == torch.float32 for p in engine.model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in engine.optimizer.state.values())
    for scale in _norm_weights(engine.model):
        change = (scale - 1.0).abs()
        assert 0 < change.min() and change.max() < 1e-5

    # The same step on pure bf16 weights rounds every update away.
    pure = _tiny_llama().to(torch.bfloat16)
    opt = torch.optim.AdamW(pure.parameters(), lr=TINY_LR.lr, weight_decay=0.0, foreach=False)
    pure(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(scale, torch.ones_like(scale)) for scale in _norm_weights(pure))


def test_ddp_without_bf16_has_no_autocast() -> None:
    engine = build_engine("ddp", _tiny_llama(), TINY_LR, grad_accum_steps=1, micro_batch_size=1)
    ids = _global_batches(1)[0]
    with engine.autocast():
        assert engine.module(input_ids=ids).logits.dtype == torch.float32


def test_ddp_refuses_low_precision_trainable_weights() -> None:
    with pytest.raises(ValueError, match="float32"):
        build_engine("ddp", _tiny_llama().to(torch.bfloat16), TINY_LR, grad_accum_steps=1, micro_batch_size=1, bf16=True)


def test_deepspeed_bf16_casts_the_module_and_autocast_is_a_no_op() -> None:
    """DeepSpeed keeps float32 master partitions itself: the loop's autocast() changes nothing."""
    engine = build_engine("deepspeed", _tiny_llama(), TINY_LR, grad_accum_steps=1, micro_batch_size=GLOBAL_BATCH, bf16=True)
    assert isinstance(engine.autocast(), contextlib.nullcontext)
    assert all(p.dtype == torch.bfloat16 for p in engine.model.parameters())
    masters = engine.optimizer.single_partition_of_fp32_groups  # ZeRO-2's float32 master copies
    assert masters and all(m.dtype == torch.float32 for m in masters)
    before = [m.clone() for m in masters]
    ids = _global_batches(1)[0]
    with engine.autocast():
        loss = engine.module(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    # The master weights took the 1e-6 update that the bf16 module weights cannot represent.
    assert all(not torch.equal(m, b) for m, b in zip(masters, before))
    assert all(torch.equal(s, torch.ones_like(s)) for s in _norm_weights(engine.model))


# ---------------------------------------------------------------------------------------------
# 5. ZeRO-Offload: optimizer on the CPU with DeepSpeed's CPU Adam (its C++ op compiles once).
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow  # compiles DeepSpeed's cpu_adam op on first use (about a minute on 2 cores)
@pytest.mark.cpu_adam
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_offload_optimizer_matches_ddp(zero_stage: int) -> None:
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    ddp, ddp_losses, ddp_norms = _run_single("ddp")
    micro = GLOBAL_BATCH // 2
    engine = build_engine(
        "deepspeed", _tiny_llama(), OPTIM, grad_accum_steps=2, micro_batch_size=micro, zero_stage=zero_stage,
        offload_optimizer=True,
    )
    assert isinstance(engine.ds_engine.basic_optimizer, DeepSpeedCPUAdam)
    losses, norms = _train(engine, _global_batches(N_STEPS), 0, 1, 2)
    assert losses == pytest.approx(ddp_losses, rel=1e-6)
    assert norms == pytest.approx(ddp_norms, rel=1e-5)
    # CPU Adam is the same AdamW in another order of float32 operations.
    _assert_params_close(_params(engine), _params(ddp), atol=1e-6)
    assert engine.learning_rate() == ddp.learning_rate()


def test_offload_needs_deepspeed() -> None:
    with pytest.raises(ValueError, match="deepspeed"):
        build_engine("ddp", torch.nn.Linear(2, 2), OptimConfig(lr=1e-3), grad_accum_steps=1, micro_batch_size=1,
                     offload_optimizer=True)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        OptimConfig(lr=1e-3, schedule="exponential")
    with pytest.raises(ValueError):
        build_engine("fsdp", torch.nn.Linear(2, 2), OptimConfig(lr=1e-3), grad_accum_steps=1, micro_batch_size=1)


@pytest.mark.parametrize("kind,zero_stage", [("ddp", 2), ("deepspeed", 2), ("deepspeed", 3)])
def test_restart_optimizer_equals_a_fresh_engine_on_the_same_weights(kind: str, zero_stage: int) -> None:
    """An online round on the trainer that stays loaded (round 2 after round 1) trains exactly as a
    new engine built from round 1's weights would: AdamW moments 0, step 0, a new schedule."""
    live, _, _ = _run_single(kind, zero_stage)  # "round 1": two steps move the weights and the moments
    round1 = _params(live)
    second = OptimConfig(lr=2e-3, weight_decay=0.01, warmup_steps=0, total_steps=3, schedule="linear", max_grad_norm=1.0)
    live.restart_optimizer(second)
    batches = _global_batches(N_STEPS + 2)[N_STEPS:]  # "round 2": other batches
    _, live_norms = _train(live, batches, 0, 1, grad_accum=2)

    model = _tiny_llama()
    model.load_state_dict(round1)
    fresh = build_engine(kind, model, second, grad_accum_steps=2, micro_batch_size=GLOBAL_BATCH // 2, zero_stage=zero_stage)
    _, fresh_norms = _train(fresh, batches, 0, 1, grad_accum=2)

    assert live.learning_rate() == pytest.approx(fresh.learning_rate()) == pytest.approx(2e-3 / 3)
    assert live_norms == pytest.approx(fresh_norms, rel=1e-6)
    _assert_params_close(_params(live), _params(fresh), atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 6. Device settings: GPU kernels on CUDA, the CPU exactly as measured.
# ---------------------------------------------------------------------------------------------


def test_optimizer_and_clipping_kernels_per_device() -> None:
    """CUDA: fused AdamW and foreach clipping; the CPU keeps per-tensor loops, which the DDP/ZeRO
    agreement above is measured with (decided by device type alone: no GPU is needed to check it)."""
    from raydpo.train.engine import adamw_kernels, clip_foreach

    assert adamw_kernels(torch.device("cuda", 0)) == {"foreach": False, "fused": True}
    assert adamw_kernels(torch.device("cpu")) == {"foreach": False, "fused": False}
    assert clip_foreach(torch.device("cuda", 1)) and not clip_foreach(torch.device("cpu"))
    engine = build_engine("ddp", torch.nn.Linear(2, 1), OptimConfig(lr=1e-3), grad_accum_steps=1, micro_batch_size=1)
    group = engine.optimizer.param_groups[0]
    assert group["fused"] is False and group["foreach"] is False


def test_deepspeed_config_is_built_once_and_checked() -> None:
    """The config a ZeRO-3 partitioned load used is the engine's; another one is refused."""
    from raydpo.train.engine import deepspeed_config

    config = deepspeed_config(micro_batch_size=4, grad_accum_steps=2, zero_stage=3, bf16=False, max_grad_norm=1.0)
    assert config["zero_optimization"]["stage"] == 3 and config["gradient_clipping"] == 1.0
    other = deepspeed_config(micro_batch_size=4, grad_accum_steps=2, zero_stage=3, bf16=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="ds_config"):
        build_engine("deepspeed", _tiny_llama(), OPTIM, grad_accum_steps=2, micro_batch_size=4, zero_stage=3,
                     ds_config=other)
