"""TRL's DPO update step, timed: run in the bench-only TRL venv, not raydpo's (issue 9).

    /tmp/raydpo-bench/trl-venv/bin/python bench/trl_step.py --model DIR --pairs PAIRS.jsonl
        [--batch 8] [--steps S] [--warmup-steps 1] [--precompute] [--gradient-checkpointing on|off]
        [--threads 2] [--max-length 512] [--bf16]

``DPOTrainer`` (TRL 1.x) on conversational ``{prompt, chosen, rejected}`` rows (the first
``(warmup + steps) x batch`` of ``PAIRS.jsonl``), ``per_device_train_batch_size=batch``, no
gradient accumulation, sequential sampling (the same batches in the same order as
``bench/raydpo_step.py``), ``max_steps = warmup + steps``, float32 (``bf16=False``: TRL defaults
to bf16 autocast, also on CPU, where it is far slower), on the CPU, nothing saved or logged.

With ``--precompute`` (``precompute_ref_log_probs=True``) TRL computes the reference log-probs in
the trainer's ``__init__`` (``_precompute_ref_logps``, timed apart as ``ref_seconds``, not part of
pairs/s) and keeps no reference model; without it TRL loads a second model, the reference, and
runs it in every step (part of pairs/s). ``--gradient-checkpointing`` defaults to ``on``, as
``DPOConfig`` does (TRL's default differs from transformers').

Timing: a ``TrainerCallback`` takes the clock at the end of every optimizer step; pairs/s is over
the steps after the ``--warmup-steps`` first ones (from the end of the last warm-up step to the end
of the last step, so the next batch's collation is inside, as in raydpo's loop). Tokens (timed
steps only): real = the collated ``attention_mask``'s sum (prompt + chosen and prompt + rejected,
after TRL's own tokenization and ``max_length`` truncation), computed = ``input_ids``' size, counted
in ``training_step``. Peak RSS: this process's ``ru_maxrss`` (and ``VmHWM``). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import time
from pathlib import Path

from procstat import peak_rss_mib, vm_hwm_mib  # bench/, this script's folder




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="plain HF folder")
    p.add_argument("--pairs", required=True, help="JSONL of {prompt, chosen, rejected} chat messages")
    p.add_argument("--batch", type=int, default=8, help="pairs per optimizer step (per_device_train_batch_size)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: every full batch after the warm-up)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--precompute", action="store_true", help="precompute_ref_log_probs=True")
    p.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on", help="DPOConfig's default is on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-7)
    p.add_argument("--bf16", action="store_true", help="TRL's default (bf16 autocast) instead of float32")
    p.add_argument("--out-dir", default="/tmp/raydpo-bench/trl-step")
    ns = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(ns.threads)
    rows = [json.loads(line) for line in Path(ns.pairs).read_text().splitlines() if line.strip()]
    full = len(rows) // ns.batch
    steps = ns.steps if ns.steps is not None else full - ns.warmup_steps
    if steps < 1 or ns.warmup_steps + steps > full:
        raise SystemExit(f"{len(rows)} pairs make {full} batches of {ns.batch}: too few for "
                         f"{ns.warmup_steps} warm-up + {steps} timed steps")
    total_steps = ns.warmup_steps + steps
    rows = rows[: total_steps * ns.batch]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(ns.model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(ns.model, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())

    clock: dict[int, float] = {}  # global step k -> perf_counter at its end (0: the first step's start)
    tokens: dict[int, tuple[int, int]] = {}  # global step (0-based, before it ends) -> (real, computed)
    ref = {"seconds": 0.0}

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            clock.setdefault(0, time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            clock[state.global_step] = time.perf_counter()

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                ref["seconds"] += time.perf_counter() - t0

        def training_step(self, model, inputs, *args, **kwargs):
            real, computed = tokens.get(self.state.global_step, (0, 0))
            tokens[self.state.global_step] = (real + int(inputs["attention_mask"].sum()), computed + inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old name is a
    # deprecated alias, read only when the new one is unset); TRL's DPOConfig still defaults the old one to True.
    names = {f.name for f in dataclasses.fields(DPOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = DPOConfig(
        output_dir=ns.out_dir, per_device_train_batch_size=ns.batch, gradient_accumulation_steps=1,
        max_steps=total_steps, learning_rate=ns.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_length=ns.max_length, precompute_ref_log_probs=ns.precompute, precompute_ref_batch_size=ns.batch,
        bf16=ns.bf16, use_cpu=True, **{checkpointing: ns.gradient_checkpointing == "on"},
        train_sampling_strategy="sequential", dataloader_num_workers=0, dataloader_pin_memory=False,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
    )
    t0 = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepClock()])
    init_s = time.perf_counter() - t0
    kept = len(trainer.train_dataset)
    rss_after_init = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    model_checkpointing = getattr(trainer.model, "is_activation_checkpointing", None)
    if model_checkpointing is None:
        model_checkpointing = getattr(trainer.model, "is_gradient_checkpointing", None)
    if sorted(clock) != list(range(total_steps + 1)):
        raise SystemExit(f"expected {total_steps} optimizer steps, saw {sorted(clock)}")
    seconds = clock[total_steps] - clock[ns.warmup_steps]
    timed = range(ns.warmup_steps, total_steps)  # 0-based global_step during the step
    real = sum(tokens[s][0] for s in timed)
    computed = sum(tokens[s][1] for s in timed)
    timed_pairs = steps * ns.batch
    print(json.dumps({
        "mode": "train", "side": "trl", "trl": trl.__version__, "torch": torch.__version__,
        "precompute_ref_log_probs": ns.precompute, "gradient_checkpointing": ns.gradient_checkpointing == "on",
        "model_checkpointing": model_checkpointing,
        "bf16": ns.bf16, "threads": ns.threads, "max_length": ns.max_length, "batch": ns.batch,
        "params": params, "pairs_in": len(rows), "pairs_kept_by_trl": kept,
        "warmup_steps": ns.warmup_steps, "steps": steps, "pairs": timed_pairs, "seconds": seconds,
        "pairs_per_s": timed_pairs / seconds, "real_tokens": real, "computed_tokens": computed,
        "padding_waste": computed / real if real else None, "tokens_per_s": real / seconds,
        "flops": 6.0 * params * real, "flops_per_s": 6.0 * params * real / seconds,
        "ref_seconds": ref["seconds"] if ns.precompute else None, "trainer_init_s": init_s, "train_s": train_s,
        "peak_rss_mib": peak_rss_mib(), "vm_hwm_mib": vm_hwm_mib(),
        "peak_rss_after_init_mib": rss_after_init,
        "step_seconds": [clock[k + 1] - clock[k] for k in timed], "warmup_seconds": clock[ns.warmup_steps] - clock[0],
        "loadavg": os.getloadavg(),
    }))


if __name__ == "__main__":
    main()
