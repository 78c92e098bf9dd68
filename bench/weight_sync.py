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
  a round writes its folder either way (the fallback, and "a round is complete when its policy is"),
  but with ``disk`` the generators wait for it: ``disk_with_save_s`` = ``save_s`` + ``disk_s``.
- ``collective_s``: from ``WeightSender.open`` to ``finish_receive`` returning (group set-up,
  packing, transfer, the receivers' in-place load, their acknowledgement). ``transport``: ``shm``
  (one host: buckets through /dev/shm, the gloo broadcast carries the go signal) or, with
  ``--no-shared-memory``, ``gloo`` (the buckets themselves over gloo's TCP broadcast).
- GB/s = model bytes (``bytes``, tensor data sent once) / seconds. The median of ``--reps``, after
  one untimed sync of each path (``first_*_s``: the page cache, the sender's shm arena and the
  engine's first reload are cold then; every later round is warm).

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
    pool.receivers()  # waits for the engine to start: not part of any sync

    def collective(model, folder: str, version: int) -> tuple[float, object]:
        t0 = time.perf_counter()
        sender = WeightSender.open(pool.receivers(), "cpu", timeout_s=300, shared_memory=shared_memory)
        handle = pool.begin_receive(sender.endpoint, version)
        # named_parameters: a tied LM head once, as a trainer sends it
        stats = sender.send(model.named_parameters(), bucket_bytes=bucket_bytes)
        sender.close()
        pool.finish_receive(handle, version, folder)
        return time.perf_counter() - t0, (stats, sender.transport)

    def disk(model, folder: str, version: int) -> tuple[float, object]:
        t0 = time.perf_counter()
        pool.sync(folder, version)
        return time.perf_counter() - t0, None

    # Warm-up, not timed: the first sync of each path (page cache, the sender's shm arena, the
    # engine's first reload) is what every later round is not.
    version = 2
    first_disk, _ = disk(*pols[1], 1)
    first_coll, _ = collective(*pols[0], 2)
    times: dict[str, list[float]] = {"disk": [], "collective": []}
    sends = []
    for rep in range(reps):
        for name, fn in (("disk", disk), ("collective", collective)):
            version += 1
            secs, extra = fn(*pols[version % 2], version)
            times[name].append(secs)
            if extra:
                sends.append(extra[0])
                transport = extra[1]
            print(f"{backend} rep {rep} {name}: {secs:.3f} s (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    # Greedy tokens after each path, same weights (the perturbed policy): must be equal.
    greedy = SamplingSettings(k=1, temperature=0.0, max_new_tokens=16)
    disk(*pols[1], version + 1)
    by_disk = [s.completions[0] for s in pool.generate(prompts, greedy)]
    collective(*pols[1], version + 2)
    by_collective = [s.completions[0] for s in pool.generate(prompts, greedy)]
    pool.shutdown()
    return {"disk_s": statistics.median(times["disk"]), "collective_s": statistics.median(times["collective"]),
            "bytes": sends[0].bytes, "disk_all_s": times["disk"], "collective_all_s": times["collective"],
            "first_disk_s": first_disk, "first_collective_s": first_coll,
            # the sender's side alone: joins + group, packing, transfer, waiting for the acks
            "collective_send_s": statistics.median(s.seconds for s in sends),
            "collective_setup_s": statistics.median(s.setup_s for s in sends),
            "buckets": sends[0].buckets, "same_greedy_tokens": by_disk == by_collective, "transport": transport}


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
        # The disk path end to end: the trainer saves the folder, then the generators reload it.
        out[prefix + "disk_with_save_s"] = save_s + got["disk_s"]
        out[prefix + "disk_gb_s"] = got["bytes"] / got["disk_s"] / 1e9
        out[prefix + "collective_gb_s"] = got["bytes"] / got["collective_s"] / 1e9
    out["load_after"] = os.getloadavg()
    ray.shutdown()
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
