"""raydpo's DPO update step against TRL's on the CPU, side by side in one run (issue 9).

    python bench/step_vs_trl.py [--pairs 64] [--batch 8] [--warmup-steps 1] [--threads 2]
        [--raydpo NAME=ARGS ...] [--trl-gc on|off|on,off] [--trl-precompute on|off|on,off]
        [--skip-trl] [--out FILE]

SmolLM2-135M-Instruct (float32, the plain HF folder ``--model``, made by
``../shared/tools/smollm2_to_hf.py``) on HH-RLHF helpful-base test pairs. Steps, each measured
process started here, one after the other:

1. Data (in this process): the first rows of ``--data`` kept by raydpo's own code
   (``formats.normalise``, ``tokenize.tokenize_pair`` with ``TokenizeSettings(max_length,
   max_prompt_length)``), ``(warmup + pairs / batch) x batch`` of them, written twice:
   ``pairs.json`` (raydpo's tokenized pairs) and ``pairs.jsonl`` (conversational
   ``{prompt, chosen, rejected}`` message lists, for TRL, which tokenizes them itself).
2. ``bench/matmul_peak.py``: the float32 matmul peak (FLOP/s) with ``--threads`` threads.
3. ``bench/raydpo_step.py ref``: raydpo's reference log-probs, saved for the training processes.
4. ``bench/raydpo_step.py train`` once per ``--raydpo NAME=ARGS`` (default: micro-batch 8 padded,
   and micro-batch 8 packed into rows of at most 2,048 tokens), each in the dev venv's Python.
5. ``bench/trl_step.py`` in ``--trl-python`` (the bench-only venv): TRL with and without
   ``precompute_ref_log_probs``, for each ``--trl-gc`` setting of gradient checkpointing (default
   both: on is TRL's default, off was faster in the smoke test; its best counts).
6. ``bench/matmul_peak.py`` again (the peak is the better of the two: a shared machine only ever
   makes it slower; both are recorded).

Every run warms up ``--warmup-steps`` steps and times the next ``pairs / batch`` steps of
``--batch`` pairs. Peak RSS is each training process's own ``ru_maxrss``, taken here with
``os.wait4`` on that child alone (``VmHWM`` from the child is recorded too). A run that fails
(e.g. killed for memory) is recorded with its exit status and peak RSS, and the others go on. Achieved FLOP/s =
6 x parameters x real tokens of the timed steps / their seconds, where real tokens are those of the
sequences forwarded (prompt + chosen and prompt + rejected of each pair: TRL's
``attention_mask`` sum, and the same count of raydpo's pairs); padding waste = tokens given to the
model (padding included) / real tokens. Ratios are taken against TRL's best: its highest pairs/s and
its lowest peak RSS over the TRL runs. Prints markdown tables; writes every figure to ``--out``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = Path("/tmp/raydpo-bench")
DATA = ROOT.parent / "shared/data/hh-rlhf/helpful-base/test.jsonl.gz"
DEFAULT_RAYDPO = ["mb8=--micro-batch 8", "packed=--micro-batch 8 --packed --max-tokens 2048"]
GOALS = {"pairs_per_s_vs_trl": 2.0, "rss_vs_trl": 0.25, "peak_fraction": 0.5, "padding_waste": 1.05}


# ---------------------------------------------------------------------------------------------
# data


def trl_prompt_tokens(tok, prompt: list[dict]) -> int:
    """Tokens of the prompt as TRL 1.x tokenizes it (the chat template with the generation prompt).
    TRL drops a pair whose prompt alone has ``max_length`` tokens or more (its ``keep_start``
    truncation would leave no completion token)."""
    text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def write_pairs(model: str, data: Path, n: int, max_length: int, max_prompt_length: int, out: Path,
                same_pairs: bool = True) -> dict:
    """The first ``n`` rows of ``data`` that raydpo keeps, as tokenized pairs and as chat rows.

    With ``same_pairs``, rows whose prompt TRL would drop (see :func:`trl_prompt_tokens`) are
    skipped too, so that both sides train on the same pairs in the same batches; they are counted
    in the report as ``dropped["trl_prompt_too_long"]``."""
    from raydpo.data.formats import normalise
    from raydpo.data.tokenize import TokenizeSettings, tokenize_pair
    from raydpo.models import load_tokenizer

    tok = load_tokenizer(model)
    settings = TokenizeSettings(max_length, max_prompt_length)
    tokenized, chats, dropped, truncated, read = [], [], {}, 0, 0
    with gzip.open(data, "rt") as f:
        for i, line in enumerate(f):
            if len(tokenized) == n:
                break
            if not line.strip():
                continue
            read += 1
            pair, reason = normalise(json.loads(line))
            if pair is None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            t = tokenize_pair(tok, pair["prompt"], pair["chosen"], pair["rejected"], settings)
            if t.drop_reason:
                dropped[t.drop_reason] = dropped.get(t.drop_reason, 0) + 1
                continue
            if same_pairs and trl_prompt_tokens(tok, pair["prompt"]) >= max_length:
                dropped["trl_prompt_too_long"] = dropped.get("trl_prompt_too_long", 0) + 1
                continue
            truncated += t.truncated
            tokenized.append({"row": i, "prompt_ids": t.prompt_ids, "chosen_ids": t.chosen_ids,
                              "rejected_ids": t.rejected_ids, "truncated": t.truncated})
            chats.append({"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]})
    if len(tokenized) < n:
        raise SystemExit(f"{data}: only {len(tokenized)} pairs kept, {n} needed")
    out.mkdir(parents=True, exist_ok=True)
    report = {"rows_read": read, "pairs_written": n, "dropped": dropped, "truncated": truncated,
              "max_length": max_length, "max_prompt_length": max_prompt_length, "source": str(data)}
    (out / "pairs.json").write_text(json.dumps({"report": report, "pairs": tokenized}))
    (out / "pairs.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return report


# ---------------------------------------------------------------------------------------------
# child processes


def worker_env_default() -> dict[str, str]:
    """The environment ``raydpo train`` gives its training workers by default (its malloc setting)."""
    from raydpo.config import TrainConfig
    from raydpo.train.policy import worker_env

    return worker_env(TrainConfig())


def run_child(name: str, argv: list[str], logs: Path, timeout: float, extra_env: dict[str, str] | None = None) -> dict:
    """Run ``argv`` alone, wait for it with ``os.wait4`` (its own rusage), return its JSON line
    plus ``child_maxrss_mib`` and ``wall_s``. ``extra_env``: variables for this child only."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TQDM_DISABLE": "1", **(extra_env or {})}
    out_path, err_path = logs / f"{name}.out", logs / f"{name}.err"
    print(f"[step_vs_trl] {name}: {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    wall = time.perf_counter() - t0
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith("{")]
    meta = {"name": name, "child_maxrss_mib": usage.ru_maxrss / 1024, "wall_s": wall,
            "loadavg_before": load0, "loadavg_after": os.getloadavg(), "argv": argv, "returncode": proc.returncode}
    if proc.returncode or not lines:
        # Recorded, not raised: one failed configuration (e.g. killed for memory: returncode -9)
        # must not lose the others of a long run.
        why = f"exited {proc.returncode}" if proc.returncode else "printed no JSON"
        tail = err_path.read_text()[-2000:]
        print(f"[step_vs_trl] {name}: FAILED ({why}) after {wall:.0f} s, peak RSS {meta['child_maxrss_mib']:,.0f} MiB; "
              f"log {err_path}:\n{tail}", flush=True)
        return {**meta, "error": why}
    result = json.loads(lines[-1])
    result.update(meta)
    print(f"[step_vs_trl] {name}: done in {wall:.0f} s, peak RSS {usage.ru_maxrss / 1024:,.0f} MiB"
          + (f", {result['pairs_per_s']:.3f} pairs/s" if "pairs_per_s" in result else ""), flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# report


def _fmt(x, spec: str = ".3f") -> str:
    return "" if x is None else format(x, spec)


def _ratio(a: float, b: float | None, spec: str) -> str:
    return f"{a / b:{spec}}x" if b else ""


def tables(res: dict) -> str:
    peak = res["matmul_peak_flops"]
    runs = [r for r in res["runs"] if "error" not in r]
    trl = [r for r in runs if r["side"] == "trl"]
    ours = [r for r in runs if r["side"] == "raydpo"]
    trl_best_pps = max((r["pairs_per_s"] for r in trl), default=None)
    trl_min_rss = min((r["child_maxrss_mib"] for r in trl), default=None)
    lines = [
        f"Model {res['model']} ({res['params']:,} parameters, float32), {res['data']['pairs_timed']} HH pairs timed "
        f"({res['args']['warmup_steps']} warm-up step(s) of {res['args']['batch']} pairs before), batch "
        f"{res['args']['batch']}, max_length {res['args']['max_length']}, {res['args']['threads']} threads. "
        f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (runs: "
        + ", ".join(f"{m['peak_flops'] / 1e9:.1f}" for m in res["matmul"]) + ").",
        "",
        "| run | pairs/s | vs TRL best | peak RSS (MiB) | vs TRL lowest | real tokens | padding waste | "
        "achieved GFLOP/s | of fp32 peak | seconds (timed) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in ours + trl:
        lines.append(
            f"| {r['label']} | {r['pairs_per_s']:.3f} | "
            f"{_ratio(r['pairs_per_s'], trl_best_pps, '.2f')} | "
            f"{r['child_maxrss_mib']:,.0f} | {_ratio(r['child_maxrss_mib'], trl_min_rss, '.3f')} | "
            f"{r['real_tokens']:,} | {_fmt(r['padding_waste'])} | {r['flops_per_s'] / 1e9:.2f} | "
            f"{r['flops_per_s'] / peak:.1%} | {r['seconds']:.1f} |"
        )
    if ours:
        best = max(ours, key=lambda r: r["pairs_per_s"])
        lowest = min(ours, key=lambda r: r["child_maxrss_mib"])
        lines += ["", "| goal | raydpo | TRL | result |", "|---|---|---|---|"]
        if trl:
            ratio = best["pairs_per_s"] / trl_best_pps
            lines.append(f"| pairs/s >= {GOALS['pairs_per_s_vs_trl']}x TRL's best | {best['pairs_per_s']:.3f} ({best['label']}) | "
                         f"{trl_best_pps:.3f} | {ratio:.2f}x: {'met' if ratio >= GOALS['pairs_per_s_vs_trl'] else 'not met'} |")
            ratio = best["child_maxrss_mib"] / trl_min_rss
            lines.append(f"| peak RSS <= {GOALS['rss_vs_trl']}x TRL's (at the fastest raydpo run) | "
                         f"{best['child_maxrss_mib']:,.0f} MiB ({best['label']}) | {trl_min_rss:,.0f} MiB | "
                         f"{ratio:.3f}x: {'met' if ratio <= GOALS['rss_vs_trl'] else 'not met'} |")
            if lowest is not best:
                ratio = lowest["child_maxrss_mib"] / trl_min_rss
                lines.append(f"| (peak RSS, lowest raydpo run) | {lowest['child_maxrss_mib']:,.0f} MiB ({lowest['label']}) | "
                             f"{trl_min_rss:,.0f} MiB | {ratio:.3f}x |")
        frac = best["flops_per_s"] / peak
        trl_frac = f"{max(r['flops_per_s'] for r in trl) / peak:.1%}" if trl else ""
        lines.append(f"| >= {GOALS['peak_fraction']:.0%} of the fp32 matmul peak | {frac:.1%} ({best['label']}) | "
                     f"{trl_frac} | {'met' if frac >= GOALS['peak_fraction'] else 'not met'} |")
        waste = best["padding_waste"]
        trl_waste = f"{min(r['padding_waste'] for r in trl):.3f}" if trl else ""
        lines.append(f"| padding waste <= {GOALS['padding_waste']} | {waste:.3f} ({best['label']}) | "
                     f"{trl_waste} | {'met' if waste <= GOALS['padding_waste'] else 'not met'} |")
    for r in res["runs"]:
        if "error" in r:
            lines.append(f"FAILED: {r['label']}: {r['error']} after {r['wall_s']:.0f} s, peak RSS {r['child_maxrss_mib']:,.0f} MiB "
                         f"(log: {r['name']}.err).")
    if res.get("ref") and "error" not in res["ref"]:
        ref = res["ref"]
        lines += ["", f"raydpo reference log-probs (separate process, not timed in pairs/s): {ref['seconds']:.1f} s, "
                      f"padding waste {ref['padding_waste']:.3f}, peak RSS {ref['child_maxrss_mib']:,.0f} MiB."]
    for r in trl:
        if r["pairs_kept_by_trl"] != r["pairs_in"]:
            lines.append(f"WARNING: {r['label']} kept {r['pairs_kept_by_trl']} of {r['pairs_in']} pairs.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BENCH / "smollm2"), help="plain HF folder (../shared/tools/smollm2_to_hf.py)")
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--pairs", type=int, default=64, help="pairs in the timed steps (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-prompt-length", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--raydpo", action="append", default=None, metavar="NAME=ARGS",
                   help=f"a raydpo configuration: a name and bench/raydpo_step.py train flags (repeatable; default {DEFAULT_RAYDPO})")
    p.add_argument("--raydpo-env", action="append", default=None, metavar="KEY=VALUE",
                   help="environment of the raydpo training processes (default: what `raydpo train` gives its "
                        "workers, train.malloc_mmap_threshold's default; --raydpo-env none: glibc's own)")
    p.add_argument("--trl-python", default=str(BENCH / "trl-venv/bin/python"))
    p.add_argument("--trl-gc", default="on,off",
                   help="TRL's gradient checkpointing settings to run, each with and without precompute: on,off (default), "
                        "on (TRL's default setting) or off")
    p.add_argument("--trl-precompute", default="on,off",
                   help="TRL runs with precompute_ref_log_probs (on), with the reference model in the step (off), or both (default)")
    p.add_argument("--keep-trl-drops", action="store_true",
                   help="keep rows whose prompt alone reaches max_length (TRL drops them, so the sides' pairs differ)")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-raydpo", action="store_true")
    p.add_argument("--ref-batch-tokens", type=int, default=4096)
    p.add_argument("--matmul-sizes", default="1024,2048,3072")
    p.add_argument("--work", default=str(BENCH / "step"), help="data, logs, reference log-probs")
    p.add_argument("--out", default=None, help="results JSON (default: WORK/results.json)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per child process")
    ns = p.parse_args()
    if ns.pairs % ns.batch:
        p.error("--pairs must be a multiple of --batch")
    configs = []
    for spec in ns.raydpo or DEFAULT_RAYDPO:
        name, _, flags = spec.partition("=")
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            p.error(f"--raydpo {spec!r}: NAME=ARGS with a plain name")
        configs.append((name, shlex.split(flags)))
    raydpo_env = worker_env_default() if ns.raydpo_env is None else dict(
        kv.split("=", 1) for kv in ns.raydpo_env if kv != "none")
    trl_gc = [g for g in ns.trl_gc.split(",") if g]
    trl_precompute = [g == "on" for g in ns.trl_precompute.split(",") if g]
    if any(g not in ("on", "off") for g in ns.trl_precompute.split(",") if g):
        p.error("--trl-precompute takes on, off or on,off")
    if any(g not in ("on", "off") for g in trl_gc):
        p.error("--trl-gc: on, off or on,off")
    if not ns.skip_trl and not Path(ns.trl_python).exists():
        p.error(f"{ns.trl_python} not found: make the TRL venv (docs/benchmarks.md) or pass --skip-trl")

    work = Path(ns.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps = ns.pairs // ns.batch
    total_pairs = (ns.warmup_steps + steps) * ns.batch
    threads = ["--threads", str(ns.threads)]
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)  # the children's OpenMP pools, besides torch.set_num_threads
    t_all = time.perf_counter()

    data = write_pairs(ns.model, Path(ns.data), total_pairs, ns.max_length, ns.max_prompt_length, work,
                       same_pairs=not ns.keep_trl_drops)
    print(f"[step_vs_trl] data: {total_pairs} pairs from {data['rows_read']} rows "
          f"(dropped {data['dropped']}, truncated {data['truncated']})", flush=True)
    data["pairs_timed"] = ns.pairs
    res: dict = {"args": vars(ns), "model": ns.model, "data": data, "runs": [], "matmul": [], "ref": None,
                 "machine": {"cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()}}
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
        res["machine"]["cpu"] = cpu
    except OSError:
        pass
    py = sys.executable
    matmul = [py, str(ROOT / "bench/matmul_peak.py"), *threads, "--sizes", ns.matmul_sizes]
    out = Path(ns.out) if ns.out else work / "results.json"

    def save() -> None:  # after every run, so a late failure keeps what was measured
        out.write_text(json.dumps(res, indent=1))

    res["matmul"].append(run_child("matmul-1", matmul, logs, ns.timeout))
    save()

    pairs_json, pairs_jsonl, ref_npz = work / "pairs.json", work / "pairs.jsonl", work / "ref.npz"
    common = ["--model", ns.model, "--data", str(pairs_json), *threads]
    if not ns.skip_raydpo:
        res["ref"] = run_child("raydpo-ref", [py, str(ROOT / "bench/raydpo_step.py"), "ref", *common, "--out", str(ref_npz),
                                              "--batch-tokens", str(ns.ref_batch_tokens)], logs, ns.timeout)
        save()
        for name, flags in configs if "error" not in res["ref"] else []:
            r = run_child(f"raydpo-{name}", [py, str(ROOT / "bench/raydpo_step.py"), "train", *common, "--ref", str(ref_npz),
                                             "--batch", str(ns.batch), "--warmup-steps", str(ns.warmup_steps),
                                             "--steps", str(steps), *flags], logs, ns.timeout, raydpo_env)
            r["side"], r["env"] = "raydpo", raydpo_env
            r["label"] = f"raydpo {name} ({shlex.join(flags)})" if flags else f"raydpo {name}"
            res["runs"].append(r)
            save()
    if not ns.skip_trl:
        for gc in trl_gc:
            for precompute in trl_precompute:
                name = f"trl-{'precompute' if precompute else 'inline-ref'}-gc{gc}"
                r = run_child(name, [ns.trl_python, str(ROOT / "bench/trl_step.py"), "--model", ns.model, "--pairs", str(pairs_jsonl),
                                     "--batch", str(ns.batch), "--warmup-steps", str(ns.warmup_steps), "--steps", str(steps),
                                     "--max-length", str(ns.max_length), "--gradient-checkpointing", gc, *threads]
                              + (["--precompute"] if precompute else []), logs, ns.timeout)
                r["side"] = "trl"
                r["label"] = (f"TRL {r.get('trl', '')} {'precompute_ref_log_probs' if precompute else 'reference model in the step'}, "
                              f"gradient checkpointing {gc}")
                res["runs"].append(r)
                save()
    res["matmul"].append(run_child("matmul-2", matmul, logs, ns.timeout))

    peaks = [m["peak_flops"] for m in res["matmul"] if "error" not in m]
    if not peaks:
        save()
        raise SystemExit(f"no matmul peak was measured (logs: {logs})")
    res["matmul_peak_flops"] = max(peaks)
    ok = [r for r in res["runs"] if "error" not in r]
    res["params"] = next((r["params"] for r in ok), 0)
    for r in ok:
        r["fraction_of_peak"] = r["flops_per_s"] / res["matmul_peak_flops"]
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["total_s"] = time.perf_counter() - t_all
    save()
    print()
    print(tables(res))
    print(f"\n[step_vs_trl] all runs: {res['total_s']:.0f} s; every figure in {out}; logs in {logs}")


if __name__ == "__main__":
    main()
