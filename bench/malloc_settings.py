"""Peak RSS and CPU time of raydpo's update step under glibc malloc settings (issue 9).

    python bench/malloc_settings.py --model /tmp/raydpo-bench/smollm2 --data PAIRS.json --ref REF.npz \\
        [--setting default --setting MALLOC_MMAP_THRESHOLD_=1048576 ...] [--out results.json] \\
        -- [bench/raydpo_step.py train options, e.g. --micro-batch 8 --packed --gradient-checkpointing]

Runs ``bench/raydpo_step.py train`` once per setting, one process after the other, with the
setting in its environment (glibc reads ``MALLOC_*_`` at process start, so it must be set before
the process starts: a Ray runtime env's ``env_vars`` does that for the training workers). Each
child's peak RSS comes from its own ``ru_maxrss`` (printed by raydpo_step.py); its wall and CPU
seconds of the timed steps likewise. The losses of every setting must be equal: the allocator
changes where tensors live, never their values.

Prints a Markdown table and writes every child's JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(setting: str, step_args: list[str]) -> dict:
    env = dict(os.environ)
    if setting != "default":
        for part in setting.split(","):
            key, _, value = part.partition("=")
            env[key] = value
    cmd = [sys.executable, str(ROOT / "bench" / "raydpo_step.py"), "train", *step_args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{setting}: raydpo_step.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"setting": setting, **result}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="tokenized pairs JSON written by bench/step_vs_trl.py")
    p.add_argument("--ref", required=True, help=".npz written by bench/raydpo_step.py ref")
    p.add_argument("--setting", action="append", default=[],
                   help="'default' or VAR=VALUE[,VAR=VALUE]; repeat (default: default, 1 MiB, 4 MiB, 64 KiB thresholds)")
    p.add_argument("--out", default=None)
    p.add_argument("step_args", nargs=argparse.REMAINDER, help="after --: more raydpo_step.py train options")
    ns = p.parse_args()
    settings = ns.setting or ["default", "MALLOC_MMAP_THRESHOLD_=1048576", "MALLOC_MMAP_THRESHOLD_=4194304",
                              "MALLOC_MMAP_THRESHOLD_=65536"]
    extra = [a for a in ns.step_args if a != "--"]
    step_args = ["--model", ns.model, "--data", ns.data, "--ref", ns.ref, *extra]

    results = []
    for setting in settings:
        print(f"[malloc] {setting} ...", file=sys.stderr, flush=True)
        results.append(run_one(setting, step_args))
    if ns.out:
        Path(ns.out).write_text(json.dumps(results, indent=1))

    base = results[0]
    print("| glibc setting | peak RSS (MiB) | vs first | pairs/s | CPU s (timed steps) | vs first | losses equal |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        same = r["losses"] == base["losses"]
        print(f"| `{r['setting']}` | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] / base['peak_rss_mib']:.3f}x | "
              f"{r['pairs_per_s']:.3f} | {r['cpu_seconds']:.0f} | {r['cpu_seconds'] / base['cpu_seconds']:.2f}x | {same} |")


if __name__ == "__main__":
    main()
