"""Weight sync, collective against disk (issue 23, item 3): a new policy into real generators.

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
    .venv-vllm/bin/python bench/weight_sync.py --model /tmp/raydpo-bench/smollm2 --json

(``/tmp/raydpo-bench/smollm2``: ``python ../shared/tools/smollm2_to_hf.py /tmp/raydpo-bench/smollm2``.)

On a local Ray, one ``GeneratorPool`` per backend (vLLM-CPU, then transformers), one actor each, as
the online loop places them; this process plays the trainer: it holds the policy (fp32) and, for
the collective path, is the ``WeightSender`` (rank 0) while the pool receives
(``begin_receive`` / ``finish_receive``). Each rep syncs the other of two policies (the model and a
copy with seeded noise), so every sync changes the weights.

- ``disk_s``: ``pool.sync(folder, v)`` (every actor reloads the round's safetensors folder, warm in
  the page cache); the trainer's ``save_pretrained`` of that folder is timed apart (``save_s``):
  a round writes its folder either way (the fallback, and "a round is complete when its policy is").
- ``collective_s``: from ``WeightSender.open`` to ``finish_receive`` returning (group set-up,
  packing, transfer, the receivers' in-place load, their acknowledgement). ``transport``: ``shm``
  (one host: buckets through /dev/shm, the gloo broadcast carries the go signal) or, with
  ``--no-shared-memory``, ``gloo`` (the buckets themselves over gloo's TCP broadcast).
- GB/s = model bytes (``bytes``, tensor data sent once) / seconds. The median of ``--reps``.

After the last rep, greedy decoding (k=1) of both paths is compared: the same tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
for _k, _v in ENV.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def policies(model_path: str):
    """The model and a copy with seeded noise (5% of each tensor's std), as CPU state dicts; the
    copy's folder is saved beside the model once."""
    import torch

    from raydpo.models import load_model, load_tokenizer

    base = load_model(model_path)
    other = load_model(model_path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.float().std())
    folder = Path(model_path).with_name(Path(model_path).name + "-perturbed")
    t0 = time.perf_counter()
    other.save_pretrained(folder)
    save_s = time.perf_counter() - t0
    load_tokenizer(model_path).save_pretrained(folder)
    return [(base, model_path), (other, str(folder))], save_s


def run_backend(backend: str, model_path: str, pols, reps: int, bucket_bytes: int, prompts,
                shared_memory: bool) -> dict:
    from actors.generator import GeneratorPool
    from raydpo.config import GeneratorConfig
    from raydpo.online.samples import SamplingSettings
    from raydpo.weight_sync import WeightSender

    pool = GeneratorPool(GeneratorConfig(backend=backend, num_actors=1, num_cpus=1, env=ENV, sync_timeout_s=300),
                         model_path)
    disk, coll, nbytes = [], [], 0
    version = 0
    for rep in range(reps):
        for path in ("disk", "collective"):
            version += 1
            model, folder = pols[version % 2]
            if path == "disk":
                t0 = time.perf_counter()
                pool.sync(folder, version)
                disk.append(time.perf_counter() - t0)
            else:
                t0 = time.perf_counter()
                sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=300, shared_memory=shared_memory)
                handle = pool.begin_receive(sender.endpoint, version)
                # named_parameters: a tied LM head once (as a trainer sends it)
                stats = sender.send(model.named_parameters(), bucket_bytes=bucket_bytes)
                transport = sender.transport
                sender.close()
                pool.finish_receive(handle, version, folder)
                coll.append(time.perf_counter() - t0)
                nbytes = stats.bytes
            print(f"{backend} rep {rep} {path}: {(disk if path == 'disk' else coll)[-1]:.3f} s "
                  f"(load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    # Greedy tokens after each path, same weights (the perturbed policy): must be equal.
    greedy = SamplingSettings(k=1, temperature=0.0, max_new_tokens=16)
    model, folder = pols[1]
    version += 1
    pool.sync(folder, version)
    by_disk = [s.completions[0] for s in pool.generate(prompts, greedy)]
    version += 1
    sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=300, shared_memory=shared_memory)
    handle = pool.begin_receive(sender.endpoint, version)
    sender.send(model.named_parameters(), bucket_bytes=bucket_bytes)
    sender.close()
    pool.finish_receive(handle, version, folder)
    by_collective = [s.completions[0] for s in pool.generate(prompts, greedy)]
    pool.shutdown()
    return {"disk_s": statistics.median(disk), "collective_s": statistics.median(coll), "bytes": nbytes,
            "disk_all_s": disk, "collective_all_s": coll, "same_greedy_tokens": by_disk == by_collective,
            "transport": transport}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="plain HF folder (SmolLM2-135M: /tmp/raydpo-bench/smollm2)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--bucket-mib", type=int, default=256)
    ap.add_argument("--backends", default="vllm,transformers")
    ap.add_argument("--no-shared-memory", action="store_true", help="gloo's broadcast even on one host")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = ap.parse_args()

    import ray
    import torch

    from raydpo.models import load_tokenizer

    load_before = os.getloadavg()
    pols, save_s = policies(args.model)
    tok = load_tokenizer(args.model)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("The capital of France is", "def add(a, b):")]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    out: dict = {"model": args.model, "bucket_mib": args.bucket_mib, "reps": args.reps, "save_s": save_s,
                 "torch": torch.__version__, "cpus": os.cpu_count(), "load_before": load_before}
    for backend in args.backends.split(","):
        got = run_backend(backend, args.model, pols, args.reps, args.bucket_mib * 2**20, prompts,
                          not args.no_shared_memory)
        prefix = "" if backend == "vllm" else f"{backend}_"
        for key, value in got.items():
            if key == "bytes":
                out["bytes"] = value
            else:
                out[prefix + key] = value
        out[prefix + "disk_gb_s"] = got["bytes"] / got["disk_s"] / 1e9
        out[prefix + "collective_gb_s"] = got["bytes"] / got["collective_s"] / 1e9
    out["load_after"] = os.getloadavg()
    ray.shutdown()
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
