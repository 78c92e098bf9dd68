"""Training engines: DeepSpeed ZeRO (stage 2/3) and torch DDP behind one small interface.

The training loop (run inside Ray Train workers, or as a plain single process) only
ever talks to :class:`Engine`::

    engine = build_engine("ddp", model, OptimConfig(lr=1e-5), grad_accum_steps=4, micro_batch_size=2, bf16=True)
    for step in range(total_steps):
        for micro_batch in next_micro_batches(grad_accum_steps):
            with engine.autocast():
                loss = compute_loss(engine.module, micro_batch)  # mean over the micro-batch
            engine.backward(loss)
        grad_norm = engine.step()
        lr = engine.learning_rate()

Semantics shared by both kinds (tests check that they agree with each other and with a
single process seeing the whole global batch):

* ``backward(loss)`` takes the *mean* loss of one micro-batch. It is called exactly
  ``grad_accum_steps`` times per optimizer step; the accumulated gradient is the mean of the
  micro-batch gradients (so, with equal micro-batch sizes, the gradient of the mean loss over
  the local batch), and it is averaged over data-parallel ranks.
* ``step()`` applies one optimizer update, advances the LR schedule, zeroes gradients and
  returns the global gradient L2 norm measured *before* clipping (identical on every rank).
* Exactly one forward of ``engine.module`` per ``backward`` (concatenate chosen/rejected into
  one batch): DDP arms its gradient all-reduce in forward.
* ``bf16=True`` never trains bf16 weights: parameters and optimizer state stay float32 (the
  "master weights") so small updates are not rounded away. DDP runs the forward under
  ``torch.autocast(bfloat16)`` (:meth:`Engine.autocast`); DeepSpeed casts the module to bf16
  itself and keeps float32 master copies in its ZeRO optimizer, so its ``autocast()`` is a no-op.
  Wrap every forward in ``engine.autocast()`` and the loop is the same for both kinds.

DeepSpeed on a CUDA-less host needs its CPU accelerator, chosen from ``DS_ACCELERATOR`` when
DeepSpeed is first imported; :func:`_import_deepspeed` sets ``DS_ACCELERATOR=cpu`` if unset, so
nothing may import deepspeed earlier with a different choice.

torch.distributed: when a process group is already initialised (Ray Train does this, gloo on
CPU / nccl on GPU) the engines use it. Otherwise the process is treated as world size 1; DDP
then runs unwrapped, and DeepSpeed (which insists on a process group) gets a 1-process group
(nccl on a CUDA device, gloo on the CPU) created here on 127.0.0.1 with a free port (see
:func:`_ensure_single_process_group`).

On CUDA, AdamW runs its fused kernel and clipping its foreach kernels; on the CPU both run
per tensor, as the engines' DDP/ZeRO agreement is measured (:func:`adamw_kernels`).

Weights out: :meth:`Engine.weights` streams them one tensor at a time (ZeRO-3 gathers each alone),
which the final HF folder is written from; :meth:`Engine.full_state_dict` holds them all.

This module must import without Ray and without DeepSpeed; DeepSpeed is imported lazily.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from raydpo.config import TrainConfig

__all__ = ["OptimConfig", "Engine", "DDPEngine", "DeepSpeedEngine", "build_engine"]

_SCHEDULES = ("constant", "linear", "cosine")
_TRAIN = TrainConfig.model_fields  # the defaults, defined once there


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + LR schedule settings shared by every engine kind: the optimizer's part of
    ``train:`` (its defaults are ``TrainConfig``'s), plus the run's step count.

    Attributes:
        lr: peak learning rate (reached at the end of warmup).
        weight_decay: decoupled (AdamW) weight decay, applied to every parameter.
        betas: AdamW betas.
        eps: AdamW epsilon.
        warmup_steps: optimizer steps of linear warmup from 0 to ``lr``.
        total_steps: total optimizer steps; the decay of "linear"/"cosine" reaches 0 here.
        schedule: after warmup: "constant" keeps ``lr``, "linear" decays linearly to 0,
            "cosine" decays along a half cosine to 0 (``transformers.get_scheduler``).
        max_grad_norm: clip the global gradient L2 norm to this value; 0 disables clipping
            (the norm is still computed and returned by :meth:`Engine.step`).
    """

    lr: float
    weight_decay: float = _TRAIN["weight_decay"].default
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = _TRAIN["warmup_steps"].default
    total_steps: int = 1
    schedule: str = _TRAIN["schedule"].default
    max_grad_norm: float = _TRAIN["max_grad_norm"].default

    @classmethod
    def from_train(cls, train: TrainConfig, total_steps: int) -> OptimConfig:
        return cls(lr=train.lr, weight_decay=train.weight_decay, warmup_steps=train.warmup_steps,
                   total_steps=total_steps, schedule=train.schedule, max_grad_norm=train.max_grad_norm)

    def __post_init__(self) -> None:
        # Fail at construction time rather than deep inside transformers/DeepSpeed.
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.lr < 0 or self.max_grad_norm < 0 or self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"invalid OptimConfig: {self}")


def adamw_kernels(device: torch.device) -> dict[str, bool]:
    """torch AdamW's implementation choice for parameters on ``device``.

    CPU: ``foreach`` and ``fused`` off, so the per-parameter math is identical whether the
    optimizer sees the model's own tensors (DDP) or DeepSpeed's flattened partitions (ZeRO); this is
    what makes DDP and ZeRO runs comparable to float32 round-off (the tests hold them to it).
    CUDA: the fused kernel (one launch for every parameter's update instead of about ten per
    parameter): the per-element arithmetic is the same whatever the grouping, and on a GPU the
    per-parameter launches otherwise dominate a step's optimizer time.
    """
    if device.type == "cuda":
        return {"foreach": False, "fused": True}
    return {"foreach": False, "fused": False}


def clip_foreach(device: torch.device) -> bool:
    """``clip_grad_norm_``'s ``foreach`` for gradients on ``device``: grouped kernels on CUDA, the
    per-tensor loop on the CPU (as the tests' DDP/ZeRO comparisons were measured)."""
    return device.type == "cuda"


def _make_optimizer(model: torch.nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """Plain torch AdamW over the trainable parameters (on ``device``: see :func:`adamw_kernels`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        **adamw_kernels(device),
    )


def _make_cpu_adam(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """DeepSpeed's CPU AdamW, which ZeRO-Offload insists on (it refuses a client torch optimizer
    unless ``zero_force_ds_cpu_optimizer`` is turned off, and torch AdamW over offloaded
    partitions would be slow). Same AdamW math as torch's, in a vectorised C++ op that DeepSpeed
    compiles on first use (a C++ compiler is needed; the build is cached in ~/.cache/torch_extensions)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return DeepSpeedCPUAdam(
            params, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay, adamw_mode=True
        )
    except RuntimeError as e:
        raise RuntimeError(
            "offload_optimizer needs DeepSpeed's cpu_adam op, which did not build on this host (it needs a "
            "C++ compiler and the Python headers; or install deepspeed with DS_BUILD_CPU_ADAM=1)"
        ) from e


def _zero_config(stage: int, offload_optimizer: bool) -> dict[str, Any]:
    """The ``zero_optimization`` section.

    ``stage3_gather_16bit_weights_on_model_save`` lets ``ds_engine.save_16bit_model`` gather
    ZeRO-3 weights; :meth:`DeepSpeedEngine.full_state_dict` gathers them itself, but setting it
    keeps either route to a consolidated HF folder open. Pinned host memory only helps (and only
    exists) with CUDA.
    """
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return zero


def _make_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Warmup + decay schedule, stepped once per optimizer step."""
    from transformers import get_scheduler

    # transformers names the warmup-then-constant schedule "constant_with_warmup";
    # plain "constant" would ignore warmup_steps.
    name = "constant_with_warmup" if optim.schedule == "constant" else optim.schedule
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=optim.warmup_steps,
        num_training_steps=optim.total_steps,
    )


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if _world_size() > 1:
        dist.barrier()


def _default_device() -> torch.device:
    """The device Ray Train would pick: cuda:LOCAL_RANK when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ensure_single_process_group(device: torch.device) -> None:
    """Create a 1-process group when no process group exists: nccl for a CUDA ``device`` (the
    backend of GPU collectives), gloo on the CPU.

    ``deepspeed.initialize`` always needs torch.distributed; left alone it would go looking
    for MPI (mpi4py) or launcher env vars. A world-size-1 gloo group on 127.0.0.1 with a free
    port is the least surprising substitute. We only set MASTER_ADDR/MASTER_PORT/RANK/
    WORLD_SIZE/LOCAL_RANK if absent, because DeepSpeed also reads them from the environment.
    The group stays alive for the rest of the process (destroying it would break the engine).
    """
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def _import_deepspeed() -> Any:
    """Import DeepSpeed, selecting its CPU accelerator when there is no CUDA.

    DeepSpeed picks its accelerator once, at import, from ``DS_ACCELERATOR`` (else by
    auto-detection, which falls back to CPU with a warning). We set ``DS_ACCELERATOR=cpu``
    explicitly on CUDA-less hosts so the choice does not depend on what else is installed.
    On CPU, DeepSpeed talks to the already-initialised torch.distributed group (gloo);
    it would only use oneCCL if ``oneccl_bindings_for_pytorch`` were installed.
    """
    if "deepspeed" not in sys.modules and not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def deepspeed_ready(device: torch.device | None) -> Any:
    """DeepSpeed imported, ``device`` made CUDA's current device (DeepSpeed places everything on
    its accelerator's current device) and a process group present; returns the module."""
    deepspeed = _import_deepspeed()
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    _ensure_single_process_group(device or _default_device())
    return deepspeed


def deepspeed_config(*, micro_batch_size: int, grad_accum_steps: int, zero_stage: int, bf16: bool,
                     max_grad_norm: float, offload_optimizer: bool = False) -> dict[str, Any]:
    """The DeepSpeed config of a training, built once: a ZeRO-3 partitioned load
    (:func:`raydpo.train.zero3.load_partitioned`) and ``deepspeed.initialize`` get the same dict."""
    if zero_stage not in (2, 3):
        raise ValueError(f"zero_stage must be 2 or 3, got {zero_stage}")
    if grad_accum_steps < 1 or micro_batch_size < 1:
        raise ValueError("grad_accum_steps and micro_batch_size must be >= 1")
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": max_grad_norm,  # 0.0 disables clipping in DeepSpeed too
        "zero_optimization": _zero_config(zero_stage, offload_optimizer),
        "bf16": {"enabled": bf16},
        # Keep DeepSpeed's own periodic logging out of the training logs.
        "steps_per_print": sys.maxsize,
        "wall_clock_breakdown": False,
    }


class Engine:
    """Common interface of the training engines (see the module docstring for semantics).

    Attributes:
        module: what to call forward on (DDP / DeepSpeed wrapper, or the plain model).
        model: the unwrapped model (e.g. a Hugging Face ``PreTrainedModel``). Under ZeRO-3 its
            parameters are partitioned; use :meth:`full_state_dict` to get real weights.
        grad_accum_steps: ``backward`` calls per ``step``.
        device: the device the model lives on; put batches there.
    """

    module: torch.nn.Module
    model: torch.nn.Module
    grad_accum_steps: int
    device: torch.device

    def autocast(self) -> ContextManager[Any]:
        """Wrap each forward (not the backward) in this: the mixed precision the engine needs.

        Null by default; DDP with ``bf16`` returns ``torch.autocast(bfloat16)`` on its device.
        """
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        """Accumulate gradients of the mean loss of ONE micro-batch."""
        raise NotImplementedError

    def restart_optimizer(self, optim: OptimConfig) -> None:
        """AdamW as a freshly built engine would have it, on the weights as they are: moments 0,
        step 0, and a new schedule of ``optim.total_steps``. An online round trains the previous
        round's policy with a fresh optimizer (as iterative DPO does), on a trainer that stays
        loaded across rounds."""
        raise NotImplementedError

    def step(self) -> float:
        """Optimizer step + scheduler step + zero grad.

        Returns the global gradient L2 norm before clipping (same value on every rank).
        """
        raise NotImplementedError

    def learning_rate(self) -> float:
        """The learning rate the NEXT :meth:`step` will use.

        Before any step that is the schedule's value at step 0; after ``step()`` number k it
        is the schedule's value at k (this is what HF Trainer logs too). It is read from the
        optimizer, so it is also right after :meth:`load`.
        """
        raise NotImplementedError

    def save(self, directory: str) -> None:
        """COLLECTIVE: write model + optimizer + scheduler state under ``directory``.

        Every rank must call it with the same directory, on a filesystem all ranks share. DDP writes
        ``engine_state.pt``; DeepSpeed ``latest`` (the tag), ``zero_to_fp32.py`` and
        ``global_step<N>/`` (model states, one optimizer partition per rank). The caller's manifest
        lists them all (:mod:`raydpo.train.checkpoints`).
        """
        raise NotImplementedError

    def load(self, directory: str) -> None:
        """COLLECTIVE: restore what :meth:`save` wrote, so training continues bit-exactly.

        The engine must have been built with the same model architecture, config and world size.
        A file missing raises ``FileNotFoundError`` naming it; bytes cut short raise torch's own
        error (:func:`raydpo.train.checkpoints.is_read_failure` tells them from other failures).
        """
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, Tensor]:
        """COLLECTIVE: full model weights as CPU tensors (valid at least on rank 0)."""
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def weights(self, module: torch.nn.Module, names: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
        """COLLECTIVE (every rank iterates it to the end, in step): ``module``'s tensors (``module``
        is this engine's model or a part of it) under their state-dict ``names``, one at a time, as
        CPU tensors on rank 0; other ranks get nothing. Under ZeRO-3 each is gathered alone, so no
        process ever holds more than one full parameter besides what the consumer keeps; on a CPU
        the other engines yield the model's own tensors (valid until the next step)."""
        state = module.state_dict()
        if _rank() == 0:
            for name in names:
                yield name, state[name].detach().to("cpu")


class DDPEngine(Engine):
    """torch AdamW, wrapped in DistributedDataParallel when world size > 1.

    With ``bf16`` the weights, gradients and AdamW state stay float32 and only the forward's
    matmuls run in bf16 (autocast): a pure-bf16 model would round away every update smaller
    than 2^-8 of a weight (at lr 1e-6 that is all of them).
    """

    _CHECKPOINT_FILE = "engine_state.pt"

    def __init__(
        self,
        model: torch.nn.Module,
        optim: OptimConfig,
        *,
        grad_accum_steps: int,
        device: torch.device,
        bf16: bool = False,
    ) -> None:
        low = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad and p.dtype != torch.float32})
        if low:
            # A bf16/fp16 parameter under AdamW loses small updates to rounding: train float32
            # weights and pass bf16=True (autocast) instead.
            raise ValueError(f"DDP trains float32 weights; trainable parameters are {', '.join(low)}: "
                             "load the model in float32 and use bf16=True (autocast)")
        self.optim_config = optim
        self.grad_accum_steps = grad_accum_steps
        self.device = device
        self.bf16 = bf16
        self.model = model.to(device)
        if _world_size() > 1:
            # device_ids only for CUDA; on CPU DDP must be given None.
            device_ids = [device.index] if device.type == "cuda" else None
            self.module = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        else:
            self.module = self.model
        self.optimizer = _make_optimizer(self.model, optim, device)
        self.scheduler = _make_scheduler(self.optimizer, optim)
        self._micro_step = 0
        self._prepare_next_micro_batch()

    def autocast(self) -> ContextManager[Any]:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _prepare_next_micro_batch(self) -> None:
        """Tell DDP whether the coming micro-batch's backward should all-reduce.

        Only the final micro-batch of a step all-reduces (DDP averages over ranks), so the
        accumulated gradient crosses the network once per step. This is exactly what
        ``DistributedDataParallel.no_sync()`` does, but DDP reads the flag in *forward*
        (that is when it arms its reducer), and forward happens in the training loop between
        our calls, so a ``with no_sync():`` block cannot span it. We therefore set the same
        attribute no_sync() toggles, ahead of each forward.
        """
        if isinstance(self.module, torch.nn.parallel.DistributedDataParallel):
            self.module.require_backward_grad_sync = self._micro_step == self.grad_accum_steps - 1

    def backward(self, loss: Tensor) -> None:
        if self._micro_step >= self.grad_accum_steps:
            raise RuntimeError(f"backward() called more than grad_accum_steps={self.grad_accum_steps} times before step()")
        # Dividing by grad_accum_steps turns the sum of accumulated grads into their mean.
        (loss / self.grad_accum_steps).backward()
        self._micro_step += 1
        self._prepare_next_micro_batch()

    def step(self) -> float:
        if self._micro_step != self.grad_accum_steps:
            raise RuntimeError(
                f"step() after {self._micro_step} backward() calls; expected grad_accum_steps={self.grad_accum_steps}"
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Gradients are already identical on all ranks (DDP all-reduced them), so the norm is
        # too. max_norm=inf still computes the norm when clipping is disabled.
        max_norm = self.optim_config.max_grad_norm if self.optim_config.max_grad_norm > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=max_norm, foreach=clip_foreach(self.device))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_step = 0
        self._prepare_next_micro_batch()
        return float(grad_norm)

    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def restart_optimizer(self, optim: OptimConfig) -> None:
        self.optim_config = optim
        self.optimizer = _make_optimizer(self.model, optim, self.device)
        self.scheduler = _make_scheduler(self.optimizer, optim)
        self._micro_step = 0
        self._prepare_next_micro_batch()

    def save(self, directory: str) -> None:
        # DDP keeps identical replicas, so rank 0 writes everything; the barrier makes the file
        # visible before any rank returns (and e.g. starts loading it).
        if _rank() == 0:
            os.makedirs(directory, exist_ok=True)
            state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            torch.save(state, os.path.join(directory, self._CHECKPOINT_FILE))
        _barrier()

    def load(self, directory: str) -> None:
        path = os.path.join(directory, self._CHECKPOINT_FILE)
        # weights_only=True is enough: the state holds only tensors and plain containers.
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.optimizer.zero_grad(set_to_none=True)
        self._micro_step = 0
        self._prepare_next_micro_batch()
        _barrier()

class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO stage 2 or 3 with a client AdamW and HF LR scheduler.

    ``bf16``: DeepSpeed casts the module to bf16 and its ZeRO optimizer keeps float32 master
    partitions, so :meth:`autocast` stays the inherited no-op. ``offload_optimizer`` keeps the
    optimizer state and the float32 master weights in CPU memory; DeepSpeed then requires its own
    CPU Adam (the ``cpu_adam`` C++ op, JIT-compiled on first use) instead of torch AdamW.
    """

    def __init__(self, model: torch.nn.Module, optim: OptimConfig, *, config: dict[str, Any],
                 device: torch.device | None) -> None:
        """``config``: the DeepSpeed config (:func:`deepspeed_config`), the same dict a ZeRO-3
        partitioned load was given."""
        deepspeed = deepspeed_ready(device)
        zero = config["zero_optimization"]
        self.optim_config = optim
        self.grad_accum_steps = config["gradient_accumulation_steps"]
        self.zero_stage = zero["stage"]
        offload_optimizer = "offload_optimizer" in zero
        kernels_on = device or _default_device()  # where ZeRO keeps the float32 master partitions
        optimizer = _make_cpu_adam(model, optim) if offload_optimizer else _make_optimizer(model, optim, kernels_on)
        scheduler = _make_scheduler(optimizer, optim)
        # Passing the client optimizer/scheduler (rather than DeepSpeed "optimizer"/"scheduler"
        # config sections) keeps the math identical to DDPEngine; ZeRO wraps the optimizer and
        # keeps using its param_groups, so the scheduler's LR changes reach it. DeepSpeed steps
        # the scheduler once per accumulation boundary and checkpoints it.
        ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=config,
        )
        self.ds_engine = ds_engine
        self.module = ds_engine
        self.model = ds_engine.module
        self.optimizer = ds_optimizer
        self.scheduler = ds_scheduler
        self.device = torch.device(ds_engine.device)
        self._micro_step = 0

    def backward(self, loss: Tensor) -> None:
        if self._micro_step >= self.grad_accum_steps:
            raise RuntimeError(f"backward() called more than grad_accum_steps={self.grad_accum_steps} times before step()")
        self._micro_step += 1
        # DeepSpeed divides by gradient_accumulation_steps itself (scale_wrt_gas), giving the
        # same mean-of-micro-batches gradient as DDPEngine, averaged over ranks.
        self.ds_engine.backward(loss)
        if self._micro_step < self.grad_accum_steps:
            # DeepSpeed counts micro-batches in step(): it must be called after every backward
            # and only updates weights on the accumulation boundary. Calling it here keeps our
            # public step() = exactly one optimizer update, like DDPEngine.
            self.ds_engine.step()

    def step(self) -> float:
        if self._micro_step != self.grad_accum_steps:
            raise RuntimeError(
                f"step() after {self._micro_step} backward() calls; expected grad_accum_steps={self.grad_accum_steps}"
            )
        if not self.ds_engine.is_gradient_accumulation_boundary():
            # Would mean DeepSpeed's micro-step counter drifted from ours (e.g. someone called
            # ds_engine.step() directly); stepping now would silently skip an update.
            raise RuntimeError("DeepSpeed is not at a gradient accumulation boundary")
        self.ds_engine.step()  # optimizer step (with clipping), scheduler step, zero grad
        self._micro_step = 0
        # ZeRO computes the norm over all partitions (all-reduced) before clipping.
        norm = self.ds_engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError("DeepSpeed did not compute a gradient norm (zero_optimization.compute_grad_norm=false?)")
        return float(norm)

    def learning_rate(self) -> float:
        return float(self.ds_engine.get_lr()[0])

    def restart_optimizer(self, optim: OptimConfig) -> None:
        """ZeRO keeps the float32 master partitions inside its optimizer, so the optimizer is
        reset in place rather than rebuilt: each partition's AdamW moments zeroed and its step set
        to 0 (what torch AdamW and DeepSpeed's CPU Adam create on their first step), the learning
        rate put back and a new schedule attached where DeepSpeed steps it."""
        if optim.max_grad_norm != self.optim_config.max_grad_norm:
            raise ValueError("restart_optimizer: DeepSpeed fixes gradient clipping when the engine is built")
        client = self.optimizer.optimizer  # the torch AdamW / DeepSpeedCPUAdam over ZeRO's partitions
        for state in client.state.values():
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    state[name].zero_()
            if "step" in state:
                state["step"] = state["step"].zero_() if torch.is_tensor(state["step"]) else 0
        for group in client.param_groups:
            group["lr"], group["weight_decay"], group["betas"], group["eps"] = (
                optim.lr, optim.weight_decay, optim.betas, optim.eps)
            group.pop("initial_lr", None)  # the new schedule takes it from lr
        self.scheduler = _make_scheduler(client, optim)
        self.ds_engine.lr_scheduler = self.scheduler
        self.optim_config = optim
        self._micro_step = 0

    def save(self, directory: str) -> None:
        # Collective: ZeRO ranks each write their optimizer partition (hence a shared
        # filesystem); rank 0 writes the module/scheduler states and the "latest" tag file.
        self.ds_engine.save_checkpoint(directory)

    def load(self, directory: str) -> None:
        # DeepSpeed takes a missing "latest" for "no checkpoint" (a warning) and a missing model-states
        # file for an empty list (a bare AssertionError): name the file this rank reads first.
        latest = os.path.join(directory, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {directory!r}: its file 'latest' is missing")
        with open(latest) as f:
            tag = f.read().strip()
        for path in (self.ds_engine._get_ckpt_name(directory, tag), self.ds_engine._get_zero_ckpt_name(directory, tag)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{os.path.relpath(path, directory)} is missing from the DeepSpeed checkpoint "
                                        f"{directory!r}")
        load_path, _ = self.ds_engine.load_checkpoint(
            directory, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint found in {directory!r}")
        self._micro_step = 0

    def weights(self, module: torch.nn.Module, names: Sequence[str]) -> Iterator[tuple[str, Tensor]]:
        if self.zero_stage != 3:  # ZeRO-2 keeps full (low-precision if bf16) weights on every rank
            yield from super().weights(module, names)
            return
        import deepspeed

        state = module.state_dict(keep_vars=True)  # partitioned parameters: their placeholders
        rank0 = _rank() == 0
        for name in names:
            tensor = state[name]
            if hasattr(tensor, "ds_id"):
                # Every rank gathers the whole parameter (an all-gather); it is partitioned again,
                # unchanged, on leaving the block, so rank 0 copies it out first.
                with deepspeed.zero.GatheredParameters([tensor]):
                    out = tensor.data.detach().to("cpu", copy=True) if rank0 else None
            else:  # a buffer: ZeRO-3 does not partition buffers
                out = tensor.detach().to("cpu", copy=True) if rank0 else None
            if rank0:
                yield name, out

    def full_state_dict(self) -> dict[str, Tensor]:
        if self.zero_stage != 3:
            return super().full_state_dict()
        # Each tensor gathered once (tied parameters are one object under several names), in the
        # parameters' own dtype (float32 unless bf16 is enabled); ranks other than 0 get {}.
        state = self.model.state_dict(keep_vars=True)
        first: dict[int, str] = {}
        for name, tensor in state.items():
            first.setdefault(id(tensor), name)
        gathered = dict(self.weights(self.model, list(first.values())))
        return {name: gathered[first[id(t)]] for name, t in state.items()} if gathered else {}


def build_engine(
    kind: str,
    model: torch.nn.Module,
    optim: OptimConfig,
    *,
    grad_accum_steps: int,
    micro_batch_size: int,
    zero_stage: int = 2,
    bf16: bool = False,
    offload_optimizer: bool = False,
    device: torch.device | None = None,
    ds_config: dict[str, Any] | None = None,
) -> Engine:
    """Build a training engine.

    Args:
        kind: "ddp" or "deepspeed".
        model: the (unwrapped) model, e.g. a Hugging Face causal LM. The engine owns it afterwards.
        optim: optimizer / schedule settings.
        grad_accum_steps: micro-batches (``backward`` calls) per optimizer ``step``.
        micro_batch_size: rows per micro-batch per rank (DeepSpeed needs it for its batch
            bookkeeping; DDP ignores it).
        zero_stage: 2 or 3, DeepSpeed only.
        bf16: mixed precision with float32 master weights: DDP keeps the model float32 and
            runs forwards under :meth:`Engine.autocast`; DeepSpeed casts the module to bf16 and
            keeps float32 master partitions. Either way, wrap each forward in ``engine.autocast()``.
        offload_optimizer: DeepSpeed only: optimizer state and master weights in CPU memory
            (ZeRO-Offload, with DeepSpeed's CPU Adam).
        device: where to put the model; default cuda:LOCAL_RANK if CUDA is available, else CPU.
            DeepSpeed uses its accelerator's current device (we ``set_device`` it if given).
        ds_config: DeepSpeed only: the config a ZeRO-3 partitioned load already used (it must be
            what :func:`deepspeed_config` makes of the arguments above); default: built here.
    """
    if grad_accum_steps < 1 or micro_batch_size < 1:
        raise ValueError("grad_accum_steps and micro_batch_size must be >= 1")
    if kind == "ddp":
        if offload_optimizer:
            raise ValueError("offload_optimizer=True needs kind='deepspeed' (ZeRO-Offload)")
        return DDPEngine(model, optim, grad_accum_steps=grad_accum_steps, device=device or _default_device(), bf16=bf16)
    if kind == "deepspeed":
        config = deepspeed_config(micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                  zero_stage=zero_stage, bf16=bf16, max_grad_norm=optim.max_grad_norm,
                                  offload_optimizer=offload_optimizer)
        if ds_config is not None and ds_config != config:
            raise ValueError(f"ds_config {ds_config} is not the engine's config {config}")
        return DeepSpeedEngine(model, optim, config=ds_config if ds_config is not None else config, device=device)
    raise ValueError(f"kind must be 'ddp' or 'deepspeed', got {kind!r}")
