"""Bytes the training workers write per checkpoint, from the product's own command.

Runs ``raydpo train CONFIG`` with 2 workers and a checkpoint every step, samples the
``write_chars`` counter (bytes passed to write(), /proc/PID/io) of every Ray Train worker process
at 20 Hz, and divides the workers' total by the number of checkpoints. A checkpoint is written
twice by design (staged locally, then uploaded by Ray Train into storage), so the floor is about 2x
its size; a rank that uploads files it did not write adds one more copy of them per extra rank.
The training and the final HF folder write a little too; both runs compared pay the same.

    python bench/checkpoint_bytes.py --config configs/quickstart.yaml --json
    python bench/checkpoint_bytes.py --engine deepspeed --json      # ZeRO-2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

WORKER_TITLE = "RayTrainWorker"  # Ray names its train worker processes ray::RayTrainWorker...


def sample_worker_writes(job: psutil.Process, stop: threading.Event, seen: dict[int, int]) -> None:
    """Keep the largest write_chars of every train worker process under ``job`` (its local Ray is
    its child), until ``stop``."""
    while not stop.is_set():
        try:
            procs = job.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for proc in procs:
            try:
                if WORKER_TITLE in " ".join(proc.cmdline()):
                    seen[proc.pid] = max(seen.get(proc.pid, 0), proc.io_counters().write_chars)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--engine", choices=["ddp", "deepspeed"], default="ddp")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ckpt-bytes-") as tmp:
        out = Path(tmp) / "run"
        overrides = [f"output_dir={out}", "train.num_workers=2", f"train.engine={args.engine}",
                     "train.micro_batch_size=16", "train.cpus_per_worker=0.5", f"reference.cache_dir={tmp}/ref",
                     "tracking.log_model=false", "train.checkpoint_every=1", f"train.keep_checkpoints={args.steps}",
                     f"train.max_steps={args.steps}", "train.eval_every=0", f"tracking.uri=sqlite:///{tmp}/mlflow.db"]
        cmd = [sys.executable, "-m", "jobs.train_dpo", args.config] + [a for o in overrides for a in ("--set", o)]
        seen: dict[int, int] = {}
        stop = threading.Event()
        log = Path(tmp) / "run.log"
        with log.open("w") as sink:
            job = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
            sampler = threading.Thread(target=sample_worker_writes, args=(psutil.Process(job.pid), stop, seen), daemon=True)
            sampler.start()
            code = job.wait()
        stop.set()
        sampler.join()
        if code != 0:
            sys.exit(f"the run failed ({code}):\n{log.read_text()[-3000:]}")
        checkpoints = sorted(p for p in (out / "ray" / "train").glob("checkpoint_*") if p.is_dir())
        result = {
            "engine": args.engine,
            "workers_seen": len(seen),
            "checkpoints": len(checkpoints),
            "checkpoint_mib": round(folder_bytes(checkpoints[-1]) / 2**20, 3) if checkpoints else None,
            "worker_write_mib_per_checkpoint": round(sum(seen.values()) / max(len(checkpoints), 1) / 2**20, 3),
        }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
