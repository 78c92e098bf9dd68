"""Capacity model of one online DPO round: a 7B policy on 8 GPUs (issue 23; docs/capacity.md).

Plain arithmetic, no torch, no GPU: every input below is a named default, changeable with a CLI
flag, and each says where it comes from:

- "measured"  : measured by this project (on the 2-core CPU machine; none of ours is a GPU number),
- "published" : a public figure, with its source,
- "assumed"   : our assumption, with the reasoning; no one measured it.

    python bench/capacity.py                      # the table in docs/capacity.md
    python bench/capacity.py --judge-params-b 8   # a reward-model judge instead of a verifier
    python bench/capacity.py --help               # every input, its default and its source

What a round does (jobs/iterative_dpo.py): generate -> judge -> pair -> train (the reference pass,
then the epochs) -> sync -> evaluate. With S = online.max_staleness = 1, round r+1's samples and
scores are drawn while round r trains, so from round 2 on a round takes
max(generate + judge, reference + train) + sync + evaluate.
"""
from __future__ import annotations

import argparse

GB = 1e9


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # --- the workload of one round (assumed: a typical round, the example) ---------------
    a("--params-b", type=float, default=7.0, help="policy parameters, billions (assumed: a 7B policy)")
    a("--prompts", type=int, default=4096, help="training prompts per round (assumed)")
    a("--k", type=int, default=4, help="samples per prompt, online.sampling.k (assumed)")
    a("--gen-tokens", type=int, default=300, help="mean generated tokens per sample (assumed)")
    a("--prompt-tokens", type=int, default=256, help="prompt tokens (assumed)")
    a("--epochs", type=int, default=2, help="epochs over the round's pairs, train.epochs (assumed)")
    # best_worst gives at most one pair per prompt; a prompt whose samples all tie gives none.
    # 1.0 is the upper bound (the most training work), so the train time is not understated.
    a("--pair-fraction", type=float, default=1.0, help="pairs per prompt, best_worst: <= 1 (assumed: the bound)")
    a("--eval-prompts", type=int, default=256, help="held-out prompts, online.eval_prompts (assumed)")
    a("--eval-samples", type=int, default=2, help="samples per eval prompt, online.eval_samples (the default)")
    # --- GPUs ---------------------------------------------------------------------------------------
    a("--gpus", type=int, default=8, help="GPUs in all (the issue: 8)")
    a("--gen-gpus", type=int, default=4, help="GPUs for vLLM generators in the split layouts (assumed: 4 + 4)")
    # published: NVIDIA's H100 SXM specification, BF16 tensor core 1,979 TFLOPS "shown with sparsity,
    # 1/2 lower without" (as reproduced at archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html);
    # 989.4 dense (glennklockwood.com/garden/processors/h100). A100: 312.
    a("--peak-tflops", type=float, default=989.0, help="GPU dense BF16 peak, TFLOPS (published: H100 SXM spec)")
    # --- generation (published) ---------------------------------------------------------------------
    # published: Lambda, "LLMs inference benchmarks, using vLLM, on Lambda Cloud"
    # (github.com/LambdaLabsML/vllm-benchmark, benchmark_v0.md): Llama 3.1 8B, 1x H100-80GB-SXM, tp=1,
    # vLLM v0.6.0 with 10 scheduler steps, 5,000 ShareGPT prompts, max-num-seqs 256: 8,088 output
    # tokens/s (3,958 with 1 scheduler step; 3,032 with v0.5.4). Other published points: 5,777 tokens/s
    # offline on one H100 (MLPerf Inference v5.1, Red Hat, Llama 3.1 8B FP8, vLLM 0.10.0).
    a("--gen-tps", type=float, default=8000.0, help="vLLM output tokens/s per GPU at large batch (published: Lambda, 8,088)")
    # published: same Lambda table, median time per output token at 256 sequences: 25.57 ms. A
    # generate call cannot end before its longest sample has been decoded one token at a time.
    a("--tpot-ms", type=float, default=25.6, help="decode time per token of one sequence, ms (published: Lambda)")
    # --- judge --------------------------------------------------------------------------------------
    # assumed: a verifier is a Python function per sample in one process; 1 ms is a generous figure
    # for a string or math check (the quickstart's max-task verifier takes far less).
    a("--judge-ms", type=float, default=1.0, help="verifier time per sample, ms, one process (assumed)")
    a("--judge-params-b", type=float, default=0.0,
      help="reward-model judge parameters, billions; 0: a verifier (assumed: forward-only at --mfu on the generator GPUs)")
    # --- training (published MFU, converted with 6 N FLOPs per token) ---------------------------------
    # published: torchtitan docs/performance.md: Llama 3.1 8B, 8 H100, FSDP2, selective activation
    # checkpointing: 5,762 tokens/s/GPU (6,667 with torch.compile), "33% to 39% MFU". PyTorch blog
    # "Maximizing training throughput" (IBM + Meta): 7B on A100, FSDP, 57% MFU (3,700 tokens/s/GPU).
    # assumed: 30% for a DPO step under DeepSpeed ZeRO-3 on a Hugging Face model with ~556-token
    # sequences, below torchtitan's tuned pre-training figures.
    a("--mfu", type=float, default=0.30, help="model FLOPs utilisation, training and forward-only (assumed, see source comment)")
    a("--grad-checkpointing", action="store_true",
      help="train.gradient_checkpointing: 8 N instead of 6 N FLOPs per token (default off, as in the config)")
    # --- weight sync (published bandwidths) ----------------------------------------------------------
    # published: NCCL maintainer (sjeaugey) in NVIDIA/nccl-tests issue 212: H100 NVLink line rate
    # 450 GB/s; "NCCL can get an effective NVLink bandwidth of 370GB/s" (busBw of non-allreduce
    # operations). A100 NVLink: ~200-230 GB/s all-reduce busBw (NVIDIA/nccl-tests issue 149).
    a("--nvlink-gbps", type=float, default=370.0, help="NCCL broadcast / all-gather bus bandwidth, NVLink, GB/s (published)")
    # published: 400 Gb/s per NIC (NDR InfiniBand, the torchtitan H100 hosts: "400 Gb/s per GPU") =
    # 50 GB/s line rate; DeepSeek-V3 issue 28 quotes IB at 50 GB/s. assumed: a generator on another
    # node is reached through one such NIC at 80% of line rate (as NVLink's 370 of 450).
    a("--ib-gbps", type=float, default=40.0, help="NCCL between nodes through one 400 Gb/s NIC, GB/s (assumed from published line rate)")
    # assumed, derived from published peer timings (end to end, gather + NCCL + vLLM load_weights):
    # TRL PR 7131: Qwen3-32B (64 GB) ~2.3 s, 16 trainer + 16 vLLM H200s (28 GB/s); SkyRL PR 161: 14B
    # (28 GB) 1.6 s over CUDA IPC on 8 H100 (17.5 GB/s). The receivers' load_weights, not the wire,
    # bounds these, so we charge it apart from the wire at 25 GB/s.
    a("--load-gbps", type=float, default=25.0, help="vLLM load_weights into the engine, GB/s (assumed from published peer syncs)")
    # The range for a shared file system (EFS, FSx, NFS); published for comparison: one EFS
    # client is capped at 500 MiB/s (Amazon Web Services in Action, 3rd ed., from the EFS docs).
    a("--disk-gbps", type=float, nargs="+", default=[1.0, 0.3],
      help="shared file system write and read speed per client, GB/s (the issue: 0.3-1)")
    # --- colocation (time-shared GPUs, not in raydpo today) --------------------------------------------
    # published: vllm-project/vllm PR 48337 (A100, Qwen3-8B): sleep + wake 6.84 s (level 2), 12.76 s
    # (level 1). assumed: the trainer moves its ZeRO-3 state (16 bytes/param / GPUs) to the host and back
    # at 25 GB/s per GPU.
    a("--vllm-sleep-wake-s", type=float, default=6.84, help="vLLM sleep + wake, s (published: vLLM PR 48337)")
    a("--host-gbps", type=float, default=25.0, help="GPU <-> host copy per GPU, GB/s (assumed: PCIe 5 x16 at ~40%%)")
    # --- measured on CPU (for the 'before' line only) ---------------------------------------------------
    a("--ray-train-restart-s", type=float, default=15.0,
      help="a Ray Train restart, s (measured: 2-core CPU, tiny model; the old per-round cost)")
    return p.parse_args(argv)


def stages(c: argparse.Namespace, gen_gpus: int, train_gpus: int) -> dict[str, float]:
    """Seconds of each stage of one round with ``gen_gpus`` generating and ``train_gpus`` training."""
    n = c.params_b * 1e9
    peak = c.peak_tflops * 1e12 * c.mfu  # achieved FLOP/s per GPU
    samples = c.prompts * c.k
    pairs = c.prompts * c.pair_fraction
    pair_tokens = 2 * (c.prompt_tokens + c.gen_tokens)  # chosen + rejected, each with its prompt
    eval_samples = c.eval_prompts * c.eval_samples
    gen = max(samples * c.gen_tokens / (gen_gpus * c.gen_tps), c.gen_tokens * c.tpot_ms / 1e3)
    if c.judge_params_b:
        judge = 2 * c.judge_params_b * 1e9 * samples * (c.prompt_tokens + c.gen_tokens) / (gen_gpus * peak)
    else:
        judge = samples * c.judge_ms / 1e3
    reference = 2 * n * pairs * pair_tokens / (train_gpus * peak)  # one forward, before training
    per_token = 8 if c.grad_checkpointing else 6
    train = per_token * n * pairs * pair_tokens * c.epochs / (train_gpus * peak)
    # evaluate: sample the held-out prompts, judge them, and log pi_initial(y) of every sample for
    # the KL (one forward of the reference actor; counted at the trainer GPUs' rate).
    eval_gen = max(eval_samples * c.gen_tokens / (gen_gpus * c.gen_tps), c.gen_tokens * c.tpot_ms / 1e3)
    eval_judge = (2 * c.judge_params_b * 1e9 * eval_samples * (c.prompt_tokens + c.gen_tokens) / (gen_gpus * peak)
                  if c.judge_params_b else eval_samples * c.judge_ms / 1e3)
    eval_ref = 2 * n * eval_samples * (c.prompt_tokens + c.gen_tokens) / (train_gpus * peak)
    return {"generate": gen, "judge": judge, "reference": reference, "train": train,
            "evaluate": eval_gen + eval_judge + eval_ref}


def sync_seconds(c: argparse.Namespace, train_gpus: int, how: str, disk_gbps: float = 0.0,
                 link_gbps: float | None = None) -> float:
    """One weight sync of a bf16 policy: ZeRO-3 gather on the trainer, then NCCL broadcast to every
    generator ('collective') or a safetensors write and one read per generator ('disk'), then each
    engine's load_weights."""
    size = c.params_b * 1e9 * 2  # bytes, bf16
    gather = size * (train_gpus - 1) / train_gpus / (c.nvlink_gbps * GB)  # all-gather among the trainer's ranks
    load = size / (c.load_gbps * GB)
    if how == "collective":
        return gather + size / ((link_gbps or c.nvlink_gbps) * GB) + load
    # disk: rank 0 writes the folder; the generators read it at once, each at the per-client speed
    return gather + size / (disk_gbps * GB) + size / (disk_gbps * GB) + load


def round_total(s: dict[str, float], staleness: int, sync: float, swap: float = 0.0) -> float:
    if staleness == 0:
        return s["generate"] + s["judge"] + s["reference"] + s["train"] + swap + sync + s["evaluate"]
    return max(s["generate"] + s["judge"], s["reference"] + s["train"]) + swap + sync + s["evaluate"]


def rows(c: argparse.Namespace) -> list[list[str]]:
    g, t = c.gen_gpus, c.gpus - c.gen_gpus
    syncs = [("collective (NVLink)", lambda tg: sync_seconds(c, tg, "collective"))]
    syncs += [(f"disk {d:g} GB/s", lambda tg, d=d: sync_seconds(c, tg, "disk", d)) for d in c.disk_gbps]
    # S = 1: the split that balances generate + judge against reference + train
    best = min(range(1, c.gpus), key=lambda gg: round_total(stages(c, gg, c.gpus - gg), 1,
                                                             sync_seconds(c, c.gpus - gg, "collective")))
    # time-shared: every GPU generates, then every GPU trains; vLLM sleeps and the trainer's ZeRO-3
    # state (16 bytes per parameter) goes to the host and back in between
    swap = c.vllm_sleep_wake_s + 2 * (c.params_b * 1e9 * 16 / c.gpus) / (c.host_gbps * GB)
    layouts = [
        (f"{g} gen + {t} train (split)", 0, g, t, 0.0, syncs),
        (f"{g} gen + {t} train (split)", 1, g, t, 0.0, syncs),
        (f"{best} gen + {c.gpus - best} train (split, balanced)", 1, best, c.gpus - best, 0.0, syncs[:1]),
        (f"all {c.gpus} time-shared (not in raydpo)", 0, c.gpus, c.gpus, swap, syncs[:1]),
    ]
    out = []
    for name, staleness, gg, tg, sw, sync_kinds in layouts:
        s = stages(c, gg, tg)
        for sync_name, sync in sync_kinds:
            sy = sync(tg)
            total = round_total(s, staleness, sy, sw)
            out.append([str(staleness), name, sync_name, f"{s['generate']:.0f}", f"{s['judge']:.0f}",
                        f"{s['reference']:.0f}", f"{s['train']:.0f}", f"{sw:.0f}" if sw else "-",
                        f"{sy:.1f}", f"{s['evaluate']:.0f}", f"**{total:.0f}**", f"{total / 60:.1f}"])
    return out


def main(argv: list[str] | None = None) -> None:
    c = parse(argv)
    n = c.params_b * 1e9
    samples = c.prompts * c.k
    pair_tokens = 2 * (c.prompt_tokens + c.gen_tokens)
    train_tokens = c.prompts * c.pair_fraction * pair_tokens * c.epochs
    judge = f"reward model {c.judge_params_b:g}B" if c.judge_params_b else f"verifier, {c.judge_ms:g} ms/sample"
    print(f"Round: {c.prompts:,} prompts x k={c.k} -> {samples:,} samples, {samples * c.gen_tokens / 1e6:.2f}M generated "
          f"tokens; <= {c.prompts * c.pair_fraction:,.0f} pairs x {pair_tokens:,} tokens x {c.epochs} epochs = "
          f"{train_tokens / 1e6:.2f}M trained tokens; judge: {judge}.")
    print(f"Policy {c.params_b:g}B bf16 = {n * 2 / GB:.1f} GB of weights. Training at {c.mfu:.0%} MFU of "
          f"{c.peak_tflops:g} TFLOPS = {c.peak_tflops * 1e12 * c.mfu / ((8 if c.grad_checkpointing else 6) * n):,.0f} "
          f"tokens/s per GPU; generation {c.gen_tps:,.0f} tokens/s per GPU.")
    print()
    head = ["S", "GPUs", "sync", "generate", "judge", "reference", "train", "swap", "sync", "evaluate",
            "round (s)", "round (min)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for r in rows(c):
        print("| " + " | ".join(r) + " |")
    print()
    t = c.gpus - c.gen_gpus
    print(f"Sync to a generator on another node (one 400 Gb/s NIC, {c.ib_gbps:g} GB/s): "
          f"{sync_seconds(c, t, 'collective', link_gbps=c.ib_gbps):.1f} s; NCCL wire time alone on NVLink: "
          f"{n * 2 / (c.nvlink_gbps * GB):.2f} s.")
    loads = ", ".join(f"{c.ray_train_restart_s + 3 * n * 2 / (d * GB):.0f} s at {d:g} GB/s" for d in c.disk_gbps)
    print(f"Before the long-lived trainer and reference actors, each round also paid a Ray Train restart "
          f"({c.ray_train_restart_s:g} s measured on CPU) and three {n * 2 / GB:.0f} GB loads (trainer + 2 reference): {loads}.")


if __name__ == "__main__":
    main()
