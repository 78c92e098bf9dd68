"""Peak host memory of a training worker's set-up: ZeRO-3 against DDP (issue 24, item 3).

    .venv/bin/python bench/zero3_load.py --model outputs/smollm2 --json

Two worker processes on the CPU (torch.distributed gloo on 127.0.0.1; Ray is not started), as Ray
Train would run them: each joins the process group and runs the product's own set-up,
:func:`raydpo.train.loop.set_up` (tokenizer, policy, engine), then reads its ``VmHWM``: the peak
resident set since the process started (imports, loading, partitioning, the engine's buffers).
One variant at a time (its two workers together), DDP first, then DeepSpeed ZeRO-3, in the
environment Ray gives training workers (``raydpo.train.policy.worker_env``: glibc's malloc
threshold), at the training defaults otherwise (``train.bf16`` false on a CPU: float32 weights; ``--bf16`` trains
both in bf16, DeepSpeed then loading bf16 weights).

Prints one JSON object: ``ddp_peak_mb`` and ``zero3_peak_mb`` (the larger worker's peak, MiB: what
a worker's memory limit must hold), ``ratio`` (ZeRO-3 / DDP), and each rank's peak. RSS is
deterministic to a few MB between runs (no timing is involved); the page cache is not counted, but
the checkpoint's pages a process maps and reads are, while it maps them.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procstat import vm_hwm_mib  # noqa: E402

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, model: str, engine: str, bf16: bool, out: str) -> None:
    """One training worker: the process group Ray Train would make, then the loop's set-up."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import torch
    import torch.distributed as dist

    from raydpo.config import LossConfig, TrainConfig
    from raydpo.train.loop import LoopArgs, set_up

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    imports = vm_hwm_mib()  # torch, transformers, Ray's modules: what every worker holds before any model
    train = TrainConfig(engine=engine, zero_stage=3, num_workers=WORLD, batch_size=WORLD, micro_batch_size=1,
                        bf16=bf16)
    # DeepSpeed with bf16 loads bf16 weights (float32 masters in its optimizer); DDP float32 (autocast).
    dtype = "bfloat16" if bf16 and engine == "deepspeed" else "float32"
    args = LoopArgs(train=train, loss=LossConfig(), model_path=model, output_dir=out, local_batch_size=1,
                    total_steps=1, steps_per_epoch=1, train_blocks=[], train_rows=0, dtype=dtype)
    w = set_up(args, torch.device("cpu"))
    peak = vm_hwm_mib()
    dist.barrier()
    Path(out, f"peak{rank}.json").write_text(json.dumps({"peak_mb": peak, "imports_mb": imports}))
    dist.barrier()
    dist.destroy_process_group()


def measure(model: str, engine: str, bf16: bool) -> list[dict[str, float]]:
    """Each rank's peak RSS (MiB) from its start to the end of set-up, and after its imports."""
    import torch.multiprocessing as mp

    from raydpo.config import TrainConfig
    from raydpo.train.policy import worker_env

    # The environment Ray starts a training worker with (glibc's malloc settings among it): the
    # spawned workers inherit it before their first allocation.
    os.environ.update(worker_env(TrainConfig()))
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(_free_port(), model, engine, bf16, out), nprocs=WORLD, join=True,
                           start_method="spawn")  # fresh processes: the peak is the worker's own
        return [json.loads(Path(out, f"peak{r}.json").read_text()) for r in range(WORLD)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a local HF folder (safetensors)")
    p.add_argument("--bf16", action="store_true", help="train.bf16 on for both engines")
    p.add_argument("--json", action="store_true", help="only the JSON object on stdout")
    a = p.parse_args()
    model = str(Path(a.model).resolve())
    runs = {"ddp": measure(model, "ddp", a.bf16), "zero3": measure(model, "deepspeed", a.bf16)}
    result: dict = {"model": model, "workers": WORLD, "bf16": a.bf16}
    for name, ranks in runs.items():
        result[f"{name}_peak_mb"] = round(max(r["peak_mb"] for r in ranks), 1)
    result["ratio"] = round(result["zero3_peak_mb"] / result["ddp_peak_mb"], 3)
    for name, ranks in runs.items():
        result[f"{name}_rank_peaks_mb"] = [round(r["peak_mb"], 1) for r in ranks]
        result[f"{name}_imports_mb"] = [round(r["imports_mb"], 1) for r in ranks]
    if not a.json:
        print(f"DDP {result['ddp_peak_mb']} MiB, ZeRO-3 {result['zero3_peak_mb']} MiB: {result['ratio']}x",
              file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
