"""raydpo's DPO update step, timed in one process without Ray (issue 9). Runs in the dev venv.

    python bench/raydpo_step.py ref   --model DIR --data PAIRS.json --out REF.npz [--threads 2] [--pairs N]
    python bench/raydpo_step.py train --model DIR --data PAIRS.json --ref REF.npz [--batch 8] [--micro-batch 8]
                                      [--steps S] [--warmup-steps 1] [--pairs N] [--threads 2]
                                      [--gradient-checkpointing] [--bf16] [--packed [--max-tokens T]]

``PAIRS.json`` holds raydpo's tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``),
written by ``bench/step_vs_trl.py`` with ``raydpo.data.tokenize.tokenize_pair``.

``ref``: the reference log-probs of every pair with ``raydpo.logprobs.packed_logps`` (what a
reference actor does), saved to ``REF.npz``. It is its own process because raydpo's training
process never holds the reference model: computing them in the ``train`` process and freeing the
model would still leave the reference's high-water mark in that process's peak RSS.

``train``: the policy (``raydpo.models.load_model``) in an engine (``build_engine("ddp", ...)``,
world size 1, so unwrapped), then per step of ``--batch`` pairs, in data order: micro-batches ->
``raydpo.train.step.pair_forward`` -> ``engine.backward`` -> ``engine.step``, as
``raydpo/train/loop.py`` does minus Ray Data and metrics reduction. ``--warmup-steps`` steps run
first, untimed; then ``--steps`` steps are timed (default: every remaining full batch).

Counts (timed steps only): real tokens = the tokens of the sequences forwarded, prompt + chosen
and prompt + rejected of each pair (the prompt is forwarded twice, once per sequence, as in TRL);
computed tokens = the padded ``input_ids`` the model was given (a forward pre-hook counts them);
padding waste = computed / real. Peak RSS: ``ru_maxrss`` of this process (and ``VmHWM``), for the
whole process: model load, engine, every step. Prints one JSON object.

Where raydpo's construction lives: :func:`build` (one place to adapt as the step changes).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procstat import peak_rss_mib, vm_hwm_mib  # noqa: E402  (bench/, this script's folder)






def load_pairs(path: str, n: int | None) -> list[dict]:
    import numpy as np

    pairs = json.loads(Path(path).read_text())["pairs"]
    if n is not None:
        if n > len(pairs):
            raise SystemExit(f"{path} has {len(pairs)} pairs, {n} asked for")
        pairs = pairs[:n]
    return [{k: np.asarray(p[k], dtype=np.int32) for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs]


# ---------------------------------------------------------------------------------------------
# ref: reference log-probs in a process of their own


def reference(ns: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from raydpo.logprobs import packed_logps
    from raydpo.models import load_model, load_tokenizer

    torch.set_num_threads(ns.threads)
    pairs = load_pairs(ns.data, ns.pairs)
    pad = load_tokenizer(ns.model).pad_token_id
    model = load_model(ns.model).eval()
    prompts = [list(p["prompt_ids"]) for p in pairs for _ in (0, 1)]
    completions = [list(p[f"{side}_ids"]) for p in pairs for side in ("chosen", "rejected")]
    t0 = time.perf_counter()
    logps, padded = packed_logps(model, prompts, completions, pad, ns.batch_tokens)
    seconds = time.perf_counter() - t0
    real = sum(len(p) + len(c) for p, c in zip(prompts, completions))
    np.savez(ns.out, chosen=logps[0::2].astype(np.float32), rejected=logps[1::2].astype(np.float32))
    print(json.dumps({"mode": "ref", "pairs": len(pairs), "seconds": seconds, "pairs_per_s": len(pairs) / seconds,
                      "tokens": real, "padded_tokens": int(padded), "padding_waste": padded / real,
                      "batch_tokens": ns.batch_tokens, "peak_rss_mib": peak_rss_mib(), "vm_hwm_mib": vm_hwm_mib(),
                      "out": ns.out}))


# ---------------------------------------------------------------------------------------------
# train: the update step


@dataclass(frozen=True)
class Settings:
    """What a raydpo configuration of the benchmark may change (CLI flags of ``train``)."""

    batch: int = 8  # pairs per optimizer step
    micro_batch: int = 8  # pairs per forward/backward
    max_tokens: int = 0  # with packed: each packed row holds at most this many tokens (0: one row)
    gradient_checkpointing: bool = False
    bf16: bool = False  # bf16 autocast of the forward, float32 weights (engine.autocast())
    packed: bool = False  # pair_forward(..., packed=True): one row per micro-batch, no padding
    chunk_tokens: int = 1024  # PolicyScorer's head chunk (positions per chunk)
    lora_r: int = 0  # > 0: train PEFT LoRA adapters of this rank on every linear layer (train.lora)
    lr: float = 5e-7
    beta: float = 0.1
    total_steps: int = 1  # for the LR schedule only (constant here)


def build(model_dir: str, settings: Settings):
    """raydpo's side of the benchmark, built in ONE place: ``(engine, step_fn)``.

    ``step_fn(batch) -> {"loss", "grad_norm", "computed_tokens", "micro_batches"}`` runs one
    optimizer step on ``batch`` (``settings.batch`` pairs: ``prompt_ids`` / ``chosen_ids`` /
    ``rejected_ids`` lists of int32 arrays, ``ref_chosen_logps`` / ``ref_rejected_logps`` float32
    arrays), exactly as the training loop does; ``computed_tokens`` is the padded ``input_ids`` it
    forwarded.

    ADAPT HERE when the step changes (``raydpo/train/loop.py`` is the model to follow): how the
    model is prepared (gradient checkpointing, ``raydpo.train.adapters.prepare_model``), whether it
    is wrapped in ``raydpo.logprobs.PolicyScorer`` (used when it exists), how the engine is built,
    how a batch is cut into micro-batches, and how each forward is called (``engine.autocast()``,
    ``pair_forward``'s keyword options ``packed`` / ``max_tokens``, as ``train.packing`` /
    ``train.max_tokens_per_batch`` give them in the loop). It is ``raydpo.train.step.train_step``
    spelled out, less its metric reduction.
    """
    import raydpo.logprobs as logprobs
    from raydpo.losses import LossParams
    from raydpo.models import load_model, load_tokenizer
    from raydpo.train.engine import OptimConfig, build_engine
    from raydpo.train.step import LossSpec, pair_forward

    pad_id = load_tokenizer(model_dir).pad_token_id
    model = load_model(model_dir, "float32")

    # 1. Memory-saving preparation of the policy (before the engine: it owns the model after).
    if settings.gradient_checkpointing or settings.lora_r:
        from raydpo.config import LoraConfig
        from raydpo.train.adapters import LoraSettings, ModelPrep, prepare_model

        # LoRA's other settings are the config's defaults (alpha 32, dropout 0.05, all-linear).
        lora = (LoraSettings(**LoraConfig(r=settings.lora_r).model_dump()) if settings.lora_r else None)
        model = prepare_model(model, ModelPrep(gradient_checkpointing=settings.gradient_checkpointing,
                                               lora=lora))

    # 2. The module the engine trains: the scorer around the LM when raydpo has one.
    if hasattr(logprobs, "PolicyScorer"):
        module = logprobs.PolicyScorer(model, settings.chunk_tokens)
    else:
        module = model
    # Counts the padded tokens of every forward (works for the scorer and a plain HF model alike).
    counter = {"computed": 0}

    def count_tokens(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            counter["computed"] += int(ids.numel())

    module.register_forward_pre_hook(count_tokens, with_kwargs=True)

    # 3. The engine: DDP at world size 1 (unwrapped), AdamW, constant LR.
    if settings.batch % settings.micro_batch:
        raise SystemExit(f"--batch {settings.batch} is not a multiple of --micro-batch {settings.micro_batch}")
    accum = settings.batch // settings.micro_batch
    optim = OptimConfig(lr=settings.lr, total_steps=max(settings.total_steps, 1), schedule="constant", max_grad_norm=1.0)
    engine_kwargs = {"bf16": True} if settings.bf16 else {}
    engine = build_engine("ddp", module, optim, grad_accum_steps=accum, micro_batch_size=settings.micro_batch, **engine_kwargs)
    engine.module.train()
    autocast = getattr(engine, "autocast", contextlib.nullcontext)
    if settings.bf16 and not hasattr(engine, "autocast"):
        raise SystemExit("--bf16: this raydpo's engine has no autocast()")

    spec = LossSpec({"sigmoid": 1.0}, LossParams(beta=settings.beta))
    forward_kwargs: dict = {}
    options = inspect.signature(pair_forward).parameters
    if settings.packed:
        if "packed" not in options:
            raise SystemExit("--packed: this raydpo's pair_forward has no packed option")
        forward_kwargs["packed"] = True
    if settings.max_tokens:
        if not settings.packed or "max_tokens" not in options:
            raise SystemExit("--max-tokens: needs --packed and a pair_forward with max_tokens")
        forward_kwargs["max_tokens"] = settings.max_tokens

    def step_fn(batch: dict) -> dict:
        counter["computed"] = 0
        n = len(batch["prompt_ids"])
        loss_sum = 0.0
        for start in range(0, n, settings.micro_batch):
            micro = {k: v[start : start + settings.micro_batch] for k, v in batch.items()}
            with autocast():
                loss, _sums = pair_forward(engine.module, micro, spec, pad_id, engine.device, **forward_kwargs)
            engine.backward(loss)
            loss_sum += float(loss.detach()) * len(micro["prompt_ids"])
        grad_norm = engine.step()
        return {"loss": loss_sum / n, "grad_norm": float(grad_norm), "computed_tokens": counter["computed"],
                "micro_batches": accum}

    return engine, step_fn


def train(ns: argparse.Namespace) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(ns.threads)
    torch.manual_seed(0)
    pairs = load_pairs(ns.data, ns.pairs)
    ref = np.load(ns.ref)
    ref_c, ref_r = ref["chosen"][: len(pairs)], ref["rejected"][: len(pairs)]
    if len(ref_c) < len(pairs):
        raise SystemExit(f"{ns.ref} has {len(ref_c)} pairs' log-probs, the data {len(pairs)}")
    full = len(pairs) // ns.batch
    steps = ns.steps if ns.steps is not None else full - ns.warmup_steps
    if steps < 1 or ns.warmup_steps + steps > full:
        raise SystemExit(f"{len(pairs)} pairs make {full} batches of {ns.batch}: too few for "
                         f"{ns.warmup_steps} warm-up + {steps} timed steps")
    settings = Settings(batch=ns.batch, micro_batch=ns.micro_batch, max_tokens=ns.max_tokens,
                        gradient_checkpointing=ns.gradient_checkpointing, bf16=ns.bf16, packed=ns.packed,
                        chunk_tokens=ns.chunk_tokens, lora_r=ns.lora, total_steps=ns.warmup_steps + steps)

    t0 = time.perf_counter()
    engine, step_fn = build(ns.model, settings)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in engine.model.parameters())  # shared (tied) tensors once
    rss_after_build = peak_rss_mib()

    def batch_of(i: int) -> dict:
        part = pairs[i * ns.batch : (i + 1) * ns.batch]
        out = {k: [p[k] for p in part] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        out["ref_chosen_logps"] = ref_c[i * ns.batch : (i + 1) * ns.batch]
        out["ref_rejected_logps"] = ref_r[i * ns.batch : (i + 1) * ns.batch]
        return out

    def real_tokens(batch: dict) -> int:
        return sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(batch["prompt_ids"], batch["chosen_ids"], batch["rejected_ids"]))

    warm = []
    for i in range(ns.warmup_steps):
        t = time.perf_counter()
        out = step_fn(batch_of(i))
        warm.append({**out, "seconds": time.perf_counter() - t})
    timed, real, computed = [], 0, 0
    t_start, c_start = time.perf_counter(), time.process_time()
    for i in range(ns.warmup_steps, ns.warmup_steps + steps):
        batch = batch_of(i)
        t = time.perf_counter()
        out = step_fn(batch)
        timed.append({**out, "seconds": time.perf_counter() - t})
        real += real_tokens(batch)
        computed += out["computed_tokens"]
    seconds, cpu = time.perf_counter() - t_start, time.process_time() - c_start
    timed_pairs = steps * ns.batch
    print(json.dumps({
        "mode": "train", "side": "raydpo", "settings": asdict(settings), "threads": ns.threads,
        "scorer": type(engine.model).__name__, "params": params,
        "warmup_steps": ns.warmup_steps, "steps": steps, "pairs": timed_pairs, "seconds": seconds, "cpu_seconds": cpu,
        "pairs_per_s": timed_pairs / seconds, "real_tokens": real, "computed_tokens": computed,
        "padding_waste": computed / real if real else None, "tokens_per_s": real / seconds,
        "flops": 6.0 * params * real, "flops_per_s": 6.0 * params * real / seconds,
        "build_s": build_s, "peak_rss_mib": peak_rss_mib(), "vm_hwm_mib": vm_hwm_mib(),
        "peak_rss_after_build_mib": rss_after_build,
        "step_seconds": [s["seconds"] for s in timed], "warmup_seconds": [s["seconds"] for s in warm],
        "losses": [s["loss"] for s in warm + timed], "grad_norms": [s["grad_norm"] for s in warm + timed],
        "torch": torch.__version__, "loadavg": os.getloadavg(),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for name in ("ref", "train"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="plain HF folder (SmolLM2: /tmp/raydpo-bench/smollm2)")
        s.add_argument("--data", required=True, help="tokenized pairs JSON written by bench/step_vs_trl.py")
        s.add_argument("--pairs", type=int, default=None, help="use the first N pairs of --data (default: all)")
        s.add_argument("--threads", type=int, default=2)
    r = sub.choices["ref"]
    r.add_argument("--out", required=True, help=".npz for the reference log-probs")
    r.add_argument("--batch-tokens", type=int, default=4096, help="packed_logps' tokens per forward (one packed row)")
    t = sub.choices["train"]
    t.add_argument("--ref", required=True, help=".npz written by the ref mode")
    t.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    t.add_argument("--micro-batch", type=int, default=8, help="pairs per forward/backward")
    t.add_argument("--steps", type=int, default=None, help="timed steps (default: every full batch after the warm-up)")
    t.add_argument("--warmup-steps", type=int, default=1, help="untimed steps first")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast forward, float32 weights")
    t.add_argument("--packed", action="store_true", help="pair_forward(..., packed=True): no padding")
    t.add_argument("--max-tokens", type=int, default=0, help="with --packed: tokens per packed row at most (train.max_tokens_per_batch)")
    t.add_argument("--lora", type=int, default=0, metavar="R", help="train LoRA adapters of rank R (train.lora)")
    t.add_argument("--chunk-tokens", type=int, default=1024, help="PolicyScorer's head chunk")
    ns = p.parse_args()
    reference(ns) if ns.mode == "ref" else train(ns)


if __name__ == "__main__":
    main()
