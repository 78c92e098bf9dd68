"""One command for the first GPU we get (issue 24): raydpo's real update step on a ~0.5B Llama, timed.

On the device machine (repo root, ``$OUT`` set; no Ray, DeepSpeed or vLLM needed; no model files, no
internet). Its image has CUDA torch, transformers and PEFT but not pydantic, which ``raydpo.config``
needs (the engine and the step import it), so its wheels travel in the git-ignored ``build/``::

    # here, once: the wheels for the image's Python 3.12
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d build/gpu_wheels pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    # there, the command (the run tool, carry ["build/gpu_wheels"]):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site build/gpu_wheels/*.whl \
        && PYTHONPATH=/tmp/site python3 bench/gpu_check.py --device cuda

Where pydantic is installed: ``python bench/gpu_check.py --device cuda``.

The dry run on a CPU (a tiny model, short sequences, gloo instead of nccl; seconds)::

    python bench/gpu_check.py --device cpu --tiny

Writes ONE JSON file: ``$OUT/gpu_check.json`` when ``$OUT`` is a folder, ``$OUT`` itself when it
names a file, ``./gpu_check.json`` when it is unset (``--out`` overrides all three). The file is
rewritten after every variant, so a run cut short still leaves what it measured. The full run
keeps to a global budget of 420 s (``--budget-s``): variants not started by then are recorded as
skipped, and a running one stops timing at the budget, so it ends within 8 minutes on an H100.

The model is raydpo's Llama builder (``raydpo.models.build_tiny_model``) at 0.5B parameters with
random weights: hidden 1024, 28 layers, 16 heads, intermediate 4096, vocabulary 32,000, tied
embeddings (MFU needs no trained weights). The data: synthetic pairs in the tokenized-row contract
(``prompt_ids``, ``chosen_ids``, ``rejected_ids`` int32, ``ref_chosen_logps`` /
``ref_rejected_logps`` float32), a 512-token prompt and completions of 1,152 to 1,536 tokens, so
every sequence is 1,664 to 2,048 tokens. One optimizer step = 2 micro-batches of 4 pairs (16
sequences, 29,210 real tokens); 3 warm-up steps, then 10 timed ones.

The variants (each builds its own model with the same seed, so each sees the same weights):

- ``matmul_peak``: bf16 (and float32, at the TF32 setting in force) ``n x n`` matmuls; the best
  bf16 rate is the denominator of MFU. The script first sets what a training worker sets on a GPU:
  its device and TF32 for float32 matmuls (``raydpo.precision.allow_tf32``).
- ``step_{bf16,fp32}_{packed,padded}``: ``raydpo.train.step.train_step`` (the training loop's
  update step) through ``build_engine("ddp", PolicyScorer(model), ...)`` at world size 1: bf16 is
  the engine's autocast with float32 master weights, fp32 is without it (float32 weights and
  TF32 matmuls, the project's float32 on a GPU); packed is
  ``train.packing`` (sequences packed into one row, the varlen attention path), padded is one
  padded batch per micro-batch. Warm-up steps are not timed; each timed step is
  ``torch.cuda.synchronize``-bounded.
- ``collectives_nccl`` (CUDA) / ``collectives_gloo`` (CPU): a 1-process group from
  ``MASTER_ADDR`` / ``MASTER_PORT``; an ``all_reduce`` of the gradient's size (all float32
  parameters), then the bf16 packed step with the module in DistributedDataParallel as the engine
  wraps it at world size > 1, so DDP's reducer all-reduces through the backend. On CPU nccl is
  recorded as skipped.

MFU: model FLOPs per step / step time / peak, with model FLOPs = ``6 * N * T + 12 * L * H * sum_i
s_i^2`` (forward + backward): N the parameters (tied embeddings counted once, as the head's
matmul), T the real tokens of the step (prompt + chosen and prompt + rejected of every pair; padding
never counts), L layers, H hidden size, s_i each sequence's length (the attention term; with every
s_i = S it is ``12 * L * H * S * T``, the PaLM formula). The head runs on completion positions only,
so the 6 N T term counts the head on prompt positions it skips (1.5% of the FLOPs here; the
attention term is 17%). ``mfu`` is against
the bf16 matmul peak measured in the same run; ``mfu_nominal`` against the datasheet's dense bf16
peak where the device is known.

Each variant is recorded with ``status`` ``ok`` (its numbers), ``error`` (the exception and the
end of its traceback) or ``skipped`` (why): one variant's failure never ends the script.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


@dataclass(frozen=True)
class Shape:
    """Model, data and time budget of a run."""

    hidden: int
    layers: int
    heads: int
    vocab: int  # intermediate size is 4 x hidden (raydpo.models.build_tiny_model)
    seq_len: int  # longest sequence, prompt + completion, tokens
    prompt_len: int  # tokens; completions are 3/4 (seq_len - prompt_len) .. seq_len - prompt_len
    pairs_per_micro_batch: int
    micro_batches: int  # per optimizer step (gradient accumulation)
    warmup_steps: int  # untimed
    timed_steps: int
    budget_s: float  # global: variants not started by then are skipped
    matmul_sizes: tuple[int, ...]


FULL = Shape(hidden=1024, layers=28, heads=16, vocab=32_000, seq_len=2048, prompt_len=512, pairs_per_micro_batch=4,
             micro_batches=2, warmup_steps=3, timed_steps=10, budget_s=420, matmul_sizes=(4096, 8192))
TINY = Shape(hidden=64, layers=2, heads=4, vocab=512, seq_len=64, prompt_len=16, pairs_per_micro_batch=2,
             micro_batches=2, warmup_steps=1, timed_steps=2, budget_s=120, matmul_sizes=(256,))

# Dense bf16 tensor-core peak from NVIDIA's datasheets, FLOP/s, by a piece of torch's device name.
NOMINAL_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
                "A100": 312e12}
PAD_ID = 0
LR = 1e-6


def main() -> None:
    ns = parse_args()
    shape = TINY if ns.tiny else FULL
    if ns.budget_s is not None:
        shape = replace(shape, budget_s=ns.budget_s)
    ctx = Context(device_of(ns.device), shape, time.monotonic() + shape.budget_s)
    out = output_path(ns.out)
    report: dict[str, Any] = {  # each part of the set-up that can fail records its error instead
        "script": "bench/gpu_check.py", "argv": sys.argv[1:], "started_utc": datetime.now(timezone.utc).isoformat(),
        "shape": asdict(shape), "data": ctx.data_facts(),
        "flops_formula": "6 * params * tokens + 12 * layers * hidden * sum(seq_len_i ** 2), per optimizer step",
        "gpu_settings": recorded(gpu_settings, ctx.device), "env": recorded(environment, ctx.device),
        "model": recorded(model_facts, ctx), "variants": {},
    }
    log(f"model: {report['model'].get('params', 0) / 1e6:.1f}M parameters; {report['data']['tokens_per_step']} real "
        f"tokens per step; device {report['env'].get('device_name')}; writing {out}")
    for name, run in plan(ctx.device):
        report["variants"][name] = attempt(name, run, ctx)
        report["ratios"] = ratios(report["variants"])
        report["wall_s"] = round(time.monotonic() - ctx.started, 1)
        write_json(report, out)
    log(summary(report))


def plan(device: torch.device) -> list[tuple[str, Callable[[Context], dict] | str]]:
    """The variants in order of importance (a run out of time skips the last ones); a string in
    place of a function is the reason the variant is skipped on this device."""
    step = functools.partial
    cuda = device.type == "cuda"
    return [
        ("matmul_peak", matmul_peak),
        ("step_bf16_packed", step(update_step, bf16=True, packed=True)),
        ("step_bf16_padded", step(update_step, bf16=True, packed=False)),
        ("collectives_nccl", step(collectives, backend="nccl") if cuda else "nccl needs CUDA (gloo ran instead)"),
        ("collectives_gloo", "the GPU run measures nccl" if cuda else step(collectives, backend="gloo")),
        ("step_fp32_packed", step(update_step, bf16=False, packed=True)),
        ("step_fp32_padded", step(update_step, bf16=False, packed=False)),
    ]


# ---------------------------------------------------------------------------------------------
# Set-up: arguments, the run's context, the synthetic batch, the model


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the GPU check) or cpu (the dry run)")
    p.add_argument("--tiny", action="store_true", help="a tiny model and short sequences: the dry run")
    p.add_argument("--out", default=None, help="the JSON file (default: $OUT/gpu_check.json, else ./gpu_check.json)")
    p.add_argument("--budget-s", type=float, default=None, help="global time budget, s (default 420; tiny 120)")
    return p.parse_args()


def device_of(name: str) -> torch.device:
    """``cuda`` as ``cuda:<current>``: nccl's ``device_id`` and DDP's ``device_ids`` need an index."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def gpu_settings(device: torch.device) -> dict[str, str]:
    """What a training worker sets on its GPU before it builds anything: its device, and TF32 for
    float32 matmuls (``raydpo.precision.allow_tf32``; a no-op on CPU)."""
    from raydpo.precision import allow_tf32

    if device.type == "cuda":
        torch.cuda.set_device(device)
    allow_tf32(device)
    return {"float32_matmul": fp32_matmul_setting()}


def output_path(explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    out = os.environ.get("OUT")
    if not out:
        return Path("gpu_check.json")
    return Path(out) / "gpu_check.json" if Path(out).is_dir() else Path(out)


class Context:
    """What every variant shares: the device, the shape, the deadline, the step's micro-batches,
    and the measured matmul peak (set by ``matmul_peak``)."""

    def __init__(self, device: torch.device, shape: Shape, deadline: float) -> None:
        self.device, self.shape, self.deadline = device, shape, deadline
        self.started = time.monotonic()
        self.peak_bf16: float | None = None
        self.micro_batches = synthetic_micro_batches(shape)

    def sequence_lengths(self) -> list[int]:
        return [len(b["prompt_ids"][i]) + len(b[side][i]) for b in self.micro_batches
                for side in ("chosen_ids", "rejected_ids") for i in range(len(b["prompt_ids"]))]

    def model_flops(self, params: int) -> float:
        """Forward + backward FLOPs of one optimizer step (module docstring)."""
        lengths = self.sequence_lengths()
        s = self.shape
        return 6.0 * params * sum(lengths) + 12.0 * s.layers * s.hidden * sum(n * n for n in lengths)

    def data_facts(self) -> dict[str, Any]:
        lengths = self.sequence_lengths()
        return {"sequences_per_step": len(lengths), "tokens_per_step": sum(lengths), "longest": max(lengths),
                "mean_length": sum(lengths) / len(lengths), "prompt_len": self.shape.prompt_len}


def synthetic_micro_batches(shape: Shape) -> list[dict[str, Any]]:
    """One step's micro-batches in the tokenized-row contract. Token ids are uniform over the
    vocabulary (ids 0-2 left out: pad and specials); the reference log-probs are those of a
    uniform model, ``-len * ln(V)``, plus noise, about what a random-init policy gives."""
    rng = np.random.default_rng(0)
    longest = shape.seq_len - shape.prompt_len
    batches = []
    for _ in range(shape.micro_batches):
        n = shape.pairs_per_micro_batch
        ids = lambda length: rng.integers(3, shape.vocab, size=length, dtype=np.int32)  # noqa: E731
        lengths = rng.integers(3 * longest // 4, longest + 1, size=(n, 2))
        chosen = [ids(int(c)) for c, _ in lengths]
        rejected = [ids(int(r)) for _, r in lengths]
        uniform = math.log(shape.vocab)
        batches.append({
            "prompt_ids": [ids(shape.prompt_len) for _ in range(n)],
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "ref_chosen_logps": np.array([-len(c) * uniform for c in chosen], np.float32) + rng.normal(0, 1, n).astype(np.float32),
            "ref_rejected_logps": np.array([-len(r) * uniform for r in rejected], np.float32) + rng.normal(0, 1, n).astype(np.float32),
        })
    return batches


def build_model(ctx: Context, device: torch.device | None = None) -> torch.nn.Module:
    """raydpo's Llama builder at the run's shape, its weights created on the device directly (a
    0.5B model initialised on the host would take longer than its steps)."""
    from raydpo.models import build_tiny_model

    s = ctx.shape
    with device or ctx.device:
        model = build_tiny_model(s.vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                                 max_positions=s.seq_len, seed=0)
    return model


def model_facts(ctx: Context) -> dict[str, Any]:
    """The model's shape and parameter count (from a model built on the meta device: no memory)."""
    model = build_model(ctx, torch.device("meta"))
    c = model.config
    return {"params": sum(p.numel() for p in model.parameters()),  # tied embeddings once
            "hidden": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size, "vocab": c.vocab_size,
            "tied_embeddings": c.tie_word_embeddings}


# ---------------------------------------------------------------------------------------------
# Variants


def matmul_peak(ctx: Context) -> dict[str, Any]:
    """Best rate of ``n x n @ n x n`` products in bf16 and in float32 (TF32 if enabled); each
    round is 10 back-to-back products between synchronizations (bench/matmul_peak.py)."""
    from bench.matmul_peak import product_rates

    out: dict[str, Any] = {"float32_matmul": fp32_matmul_setting()}
    for name, dtype in (("bf16", "bfloat16"), ("fp32", "float32")):
        out[f"{name}_peak_flops"] = max(max(product_rates(n, 5, device=str(ctx.device), dtype=dtype, products=10,
                                                          warmup=3))
                                        for n in ctx.shape.matmul_sizes)
    ctx.peak_bf16 = out["bf16_peak_flops"]
    return out


def update_step(ctx: Context, *, bf16: bool, packed: bool, ddp: bool = False) -> dict[str, Any]:
    """The training loop's update step (``train_step``) on the synthetic micro-batches: the
    ``PolicyScorer`` in the DDP engine at world size 1; ``ddp`` wraps the module in
    DistributedDataParallel as the engine does at world size > 1 (needs a process group)."""
    from raydpo.logprobs import PolicyScorer
    from raydpo.losses import LossParams
    from raydpo.train.engine import OptimConfig, build_engine
    from raydpo.train.step import LossSpec, train_step

    s = ctx.shape
    free_memory(ctx.device)  # the peak below is this step's alone
    model = build_model(ctx)
    scorer = PolicyScorer(model)
    optim = OptimConfig(lr=LR, total_steps=s.warmup_steps + s.timed_steps, schedule="constant")
    engine = build_engine("ddp", scorer, optim, grad_accum_steps=s.micro_batches,
                          micro_batch_size=s.pairs_per_micro_batch, bf16=bf16, device=ctx.device)
    if ddp:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        engine.module = torch.nn.parallel.DistributedDataParallel(engine.model, device_ids=ids)
        engine._prepare_next_micro_batch()  # the engine's own no_sync bookkeeping for the wrapped module
    spec = LossSpec({"sigmoid": 1.0}, LossParams(beta=0.1))

    def one_step() -> dict[str, float]:
        return train_step(engine, ctx.micro_batches, spec, PAD_ID, packed=packed)

    steps = timed_steps(ctx, one_step)
    # What the decoder's layers called: the scorer picks the attention for the device and the compute
    # dtype at each forward (flash varlen where installed), so it is read after the steps.
    attn = model.config._attn_implementation
    params = sum(p.numel() for p in engine.model.parameters())
    seconds = sum(t for t, _ in steps["timed"]) / len(steps["timed"])
    flops = ctx.model_flops(params)
    tokens = sum(ctx.sequence_lengths())
    nominal = nominal_bf16_peak(ctx.device)
    result = {
        "bf16": bf16, "packed": packed, "ddp_wrapped": ddp, "attn_implementation": attn,
        "float32_matmul": fp32_matmul_setting(),
        "warmup_steps": len(steps["warmup"]), "timed_steps": len(steps["timed"]),
        "step_seconds": [round(t, 4) for t, _ in steps["timed"]],
        "warmup_seconds": [round(t, 4) for t, _ in steps["warmup"]],
        "mean_step_s": seconds, "tokens_per_step": tokens, "computed_tokens_per_step": computed_tokens(ctx, packed),
        "tokens_per_s": tokens / seconds, "model_flops_per_step": flops, "flops_per_s": flops / seconds,
        "mfu": flops / seconds / ctx.peak_bf16 if ctx.peak_bf16 else None,
        "mfu_nominal": flops / seconds / nominal if nominal else None,
        "losses": [m["loss"] for _, m in steps["warmup"] + steps["timed"]],
        "grad_norms": [m["grad_norm"] for _, m in steps["warmup"] + steps["timed"]],
        "peak_memory_bytes": torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else None,
    }
    del engine, scorer, model
    return result


def collectives(ctx: Context, *, backend: str) -> dict[str, Any]:
    """A 1-process ``backend`` group (env:// from MASTER_ADDR / MASTER_PORT): an all_reduce of the
    gradient's size, then the bf16 packed step with DDP's reducer all-reducing through it."""
    import datetime as dt

    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    extra = {"device_id": ctx.device} if ctx.device.type == "cuda" else {}
    dist.init_process_group(backend, init_method="env://", rank=0, world_size=1, timeout=dt.timedelta(seconds=120),
                            **extra)
    try:
        params = model_facts(ctx)["params"]
        grad = torch.ones(params, dtype=torch.float32, device=ctx.device)
        for _ in range(3):
            dist.all_reduce(grad)
        times = []
        for _ in range(10):
            sync(ctx.device)
            t0 = time.perf_counter()
            dist.all_reduce(grad)
            sync(ctx.device)
            times.append(time.perf_counter() - t0)
        del grad
        nbytes = params * 4
        reduce = {"bytes": nbytes, "best_s": min(times), "median_s": float(np.median(times)),
                  "bytes_per_s": nbytes / min(times)}
        return {"backend": backend, "world_size": dist.get_world_size(), "all_reduce": reduce,
                "ddp_step": update_step(ctx, bf16=True, packed=True, ddp=True)}
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Running a variant: the deadline, its errors, its memory


def recorded(part: Callable[..., dict], *args: Any) -> dict[str, Any]:
    """A part of the set-up: its result, or its error (the variants then record their own)."""
    try:
        return part(*args)
    except Exception as e:  # noqa: BLE001
        log(f"{part.__name__}: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


def attempt(name: str, run: Callable[[Context], dict] | str, ctx: Context) -> dict[str, Any]:
    """Run one variant and return its record; an exception is recorded, never raised."""
    if isinstance(run, str):
        log(f"{name}: skipped ({run})")
        return {"status": "skipped", "reason": run}
    if time.monotonic() >= ctx.deadline:
        log(f"{name}: skipped (budget of {ctx.shape.budget_s:.0f} s spent)")
        return {"status": "skipped", "reason": f"the global budget of {ctx.shape.budget_s:.0f} s was spent"}
    log(f"{name}: running")
    free_memory(ctx.device)
    t0 = time.monotonic()
    try:
        record = {"status": "ok", **run(ctx)}
    except Exception as e:  # noqa: BLE001  (a variant's failure is a result)
        tail = traceback.format_exc().strip().splitlines()[-12:]
        record = {"status": "error", "error": f"{type(e).__name__}: {e}"[:2000], "traceback": tail}
        log(f"{name}: {record['error'][:300]}")
    record["wall_s"] = round(time.monotonic() - t0, 2)
    free_memory(ctx.device)
    return record


def timed_steps(ctx: Context, step: Callable[[], dict]) -> dict[str, list[tuple[float, dict]]]:
    """Warm-up steps, then timed ones, each between two device synchronizations; timing stops at
    the deadline once one timed step is done."""
    out: dict[str, list[tuple[float, dict]]] = {"warmup": [], "timed": []}
    for phase, count in (("warmup", ctx.shape.warmup_steps), ("timed", ctx.shape.timed_steps)):
        for _ in range(count):
            if out["timed"] and time.monotonic() >= ctx.deadline:
                return out
            sync(ctx.device)
            t0 = time.perf_counter()
            metrics = step()
            sync(ctx.device)
            out[phase].append((time.perf_counter() - t0, metrics))
    return out


def computed_tokens(ctx: Context, packed: bool) -> int:
    """Tokens the decoder is given per step (padding included), from the step's own layout."""
    from raydpo.logprobs import pair_batch

    return sum(int(pair_batch(b["prompt_ids"], b["chosen_ids"], b["rejected_ids"], PAD_ID,
                              packed=packed)["input_ids"].numel()) for b in ctx.micro_batches)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# What the run records about its machine, and the output


def environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    import transformers

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                           "transformers": transformers.__version__, "torch_cuda": torch.version.cuda,
                           "device": str(device), "cpu_count": os.cpu_count(), "float32_matmul": fp32_matmul_setting()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {"device_name": props.name, "capability": f"{props.major}.{props.minor}",
                "device_memory_bytes": props.total_memory, "device_count": torch.cuda.device_count()}
    else:
        env["device_name"] = "cpu"
    # Installed versions, none imported (raydpo.config needs pydantic; the GPU image lacks it).
    for dist_name in ("pydantic", "peft", "kernels", "ray", "deepspeed", "vllm"):
        try:
            env[dist_name] = md.version(dist_name)
        except md.PackageNotFoundError:
            env[dist_name] = None
    try:  # whether flash-attention imports here (a CUDA build of it does not import without CUDA)
        import flash_attn

        env["flash_attn"] = getattr(flash_attn, "__version__", "imported")
    except Exception as e:  # noqa: BLE001
        env["flash_attn"] = f"not importable: {type(e).__name__}: {e}"[:300]
    return env


def fp32_matmul_setting() -> str:
    """How float32 matmuls run on CUDA now: torch 2.9+'s flag (``tf32``, ``ieee``; ``none``: unset,
    so the legacy setting, ``highest`` = IEEE or ``high`` = TF32, decides). Read without mixing the
    two APIs where a value was set through the new one (torch refuses that mix)."""
    matmul = torch.backends.cuda.matmul
    try:
        new = str(matmul.fp32_precision) if hasattr(matmul, "fp32_precision") else "none"
        return new if new != "none" else f"legacy:{torch.get_float32_matmul_precision()}"
    except Exception as e:  # noqa: BLE001
        return f"unknown ({type(e).__name__})"


def nominal_bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in NOMINAL_BF16.items() if key in name), None)


def write_json(report: dict[str, Any], out: Path) -> None:
    """Atomically: a reader (or a run killed mid-write) never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out)


def summary(report: dict[str, Any]) -> str:
    lines = [f"done in {report['wall_s']} s"]
    for name, v in report["variants"].items():
        if v["status"] != "ok":
            lines.append(f"  {name}: {v['status']} ({v.get('reason') or v.get('error', '')[:120]})")
            continue
        step = v.get("ddp_step", v)
        if "tokens_per_s" in step:
            mfu = f"{step['mfu']:.1%}" if step.get("mfu") is not None else "n/a"
            lines.append(f"  {name}: {step['tokens_per_s']:,.0f} tokens/s, MFU {mfu}, {step['attn_implementation']}")
        else:
            lines.append(f"  {name}: " + ", ".join(f"{k} {v[k]:.3g}" for k in v if k.endswith("_flops")))
    return "\n".join(lines)


def ratios(variants: dict[str, dict]) -> dict[str, float]:
    """Tokens/s of one variant over another's, for the comparisons the issue asks for (those whose
    two variants both ran). Goal (issue 24): step_bf16_packed's ``mfu`` >= 0.40."""
    def rate(name: str, part: str | None = None) -> float | None:
        v = variants.get(name, {})
        if v.get("status") != "ok":
            return None
        return (v[part] if part else v).get("tokens_per_s")

    pairs = {"packed_over_padded_bf16": (rate("step_bf16_packed"), rate("step_bf16_padded")),
             "packed_over_padded_fp32": (rate("step_fp32_packed"), rate("step_fp32_padded")),
             "bf16_over_fp32_packed": (rate("step_bf16_packed"), rate("step_fp32_packed")),
             "ddp_over_plain_bf16_packed": (rate("collectives_nccl", "ddp_step") or rate("collectives_gloo", "ddp_step"),
                                            rate("step_bf16_packed"))}
    return {k: a / b for k, (a, b) in pairs.items() if a and b}


def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
