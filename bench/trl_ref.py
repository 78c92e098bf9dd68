"""TRL's reference log-prob precompute, timed: run in the bench-only TRL venv, not raydpo's.

    /tmp/raydpo-bench/trl-venv/bin/python bench/trl_ref.py --model DIR --pairs PAIRS.jsonl [--batch-pairs 8]

Builds ``DPOTrainer(DPOConfig(precompute_ref_log_probs=True, ...))`` on conversational
prompt/chosen/rejected rows; the precompute runs inside the trainer's ``__init__``, in
``DPOTrainer._precompute_ref_logps`` (TRL 1.x), and exactly that call is timed. Its collated batches
are counted as they pass: real tokens = the attention mask's sum, computed tokens = ``input_ids``'
size. Prints one JSON object. Installed with
``python3 -m venv /tmp/raydpo-bench/trl-venv && /tmp/raydpo-bench/trl-venv/bin/pip install torch==2.13.0 trl``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True, help="JSONL of {prompt, chosen, rejected} chat messages")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=None, help="recorded only: TRL 1.x has no such option")
    p.add_argument("--batch-pairs", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default="/tmp/raydpo-bench/trl")
    # TRL's default, bf16 autocast, is off: raydpo's reference runs in float32 (reference.dtype), and
    # CPUs without bf16 matrix units run it many times slower.
    p.add_argument("--bf16", action="store_true", help="TRL's default (bf16 autocast) instead of float32")
    ns = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(ns.threads)
    rows = [json.loads(line) for line in Path(ns.pairs).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.float32)
    counts = {"seconds": 0.0, "cpu_seconds": 0.0, "tokens": 0, "padded_tokens": 0, "sequences": 0}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            collate = self.data_collator

            def counting(features):
                batch = collate(features)
                counts["tokens"] += int(batch["attention_mask"].sum())
                counts["padded_tokens"] += batch["input_ids"].numel()
                counts["sequences"] += batch["input_ids"].shape[0]
                return batch

            self.data_collator = counting
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                counts["seconds"] += time.perf_counter() - t0
                counts["cpu_seconds"] += time.process_time() - c0
                self.data_collator = collate

    args = DPOConfig(
        output_dir=ns.out_dir, precompute_ref_log_probs=True, precompute_ref_batch_size=ns.batch_pairs,
        per_device_train_batch_size=ns.batch_pairs, max_length=ns.max_length, use_cpu=True, report_to=[], bf16=ns.bf16,
        dataloader_num_workers=0, dataloader_pin_memory=False, save_strategy="no", logging_strategy="no",
    )
    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    init_s = time.perf_counter() - t0
    ds = trainer.train_dataset
    s = counts["seconds"]
    print(json.dumps({
        "trl": trl.__version__, "torch": torch.__version__, "pairs": len(ds), "pairs_in": len(rows),
        "seconds": s, "trainer_init_s": init_s, "tokens": counts["tokens"], "padded_tokens": counts["padded_tokens"],
        "sequences": counts["sequences"], "tokens_per_s": counts["tokens"] / s if s else 0.0,
        "cpu_seconds": counts["cpu_seconds"], "tokens_per_cpu_s": counts["tokens"] / counts["cpu_seconds"] if counts["cpu_seconds"] else 0.0,
        "pairs_per_s": len(ds) / s if s else 0.0,
        "padding_waste": counts["padded_tokens"] / counts["tokens"] if counts["tokens"] else 1.0,
        "max_length": ns.max_length, "max_prompt_length": ns.max_prompt_length, "batch_pairs": ns.batch_pairs, "bf16": ns.bf16,
        "has_ref_columns": "ref_chosen_logps" in ds.column_names,
        "ref_chosen_logps_head": [float(x) for x in ds["ref_chosen_logps"][:4]] if "ref_chosen_logps" in ds.column_names else None,
    }))


if __name__ == "__main__":
    main()
