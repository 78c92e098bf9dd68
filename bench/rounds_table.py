"""The table of an online run's rounds, read from its output folder (``raydpo.online.rounds``):
per policy (0 = the initial one) its held-out score, win rate and KL against the initial policy,
and per round the training samples' score, pairs, generation speed and sync seconds.

    python bench/rounds_table.py OUTPUT_DIR [--plot DEST.png] [--seconds]

``--plot`` copies the run's rounds plot (``OUTPUT_DIR/plots/rounds.png``) to DEST. ``--seconds``
prints instead where each round's wall time went (``round/seconds_*``): generate, judge,
reference, train (waiting for it beyond what ran meanwhile), sync, evaluate, save, ahead (the
next round's samples drawn during training), and the rest of the round.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from raydpo.online.rounds import RoundDir, read_json


def table(out: Path) -> str:
    lines = ["| policy | eval score (mean ± std) | win rate vs initial | KL to initial (nats) | the round's samples (from the previous policy): score | pairs | gen tokens/s | sync s |",
             "|---|---|---|---|---|---|---|---|"]
    r = 0
    while RoundDir(out, r).eval.exists():
        rd = RoundDir(out, r)
        ev = read_json(rd.eval)
        m = read_json(rd.done) if rd.done.exists() else {}
        lines.append(
            f"| {'initial' if r == 0 else f'after round {r}'} | {ev['round/eval_score_mean']:.3f} ± "
            f"{ev['round/eval_score_std']:.3f} | {ev['round/win_rate_vs_initial']:.3f} | {ev['round/kl_to_initial']:.3f} | "
            + (f"{m['round/judge_score_mean']:.3f} | {m['round/pairs']:.0f} | {m['round/gen_tokens_per_s']:.1f} | "
               f"{m['round/sync_seconds']:.2f} |" if m else "- | - | - | - |"))
        r += 1
    return "\n".join(lines)


STAGES = ("generate", "judge", "reference", "train", "sync", "evaluate", "save", "ahead")


def seconds_table(out: Path) -> str:
    lines = ["| round | " + " | ".join(STAGES) + " | rest | round |", "|---" * (len(STAGES) + 3) + "|"]
    r = 1
    while RoundDir(out, r).done.exists():
        m = read_json(RoundDir(out, r).done)
        parts = [m.get(f"round/seconds_{s}", 0.0) for s in STAGES]
        total = m["round/seconds"]
        lines.append(f"| {r} | " + " | ".join(f"{p:.2f}" for p in parts) + f" | {total - sum(parts):.2f} | {total:.2f} |")
        r += 1
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--seconds", action="store_true")
    ns = parser.parse_args()
    print(seconds_table(ns.output_dir) if ns.seconds else table(ns.output_dir))
    if ns.plot:
        shutil.copyfile(ns.output_dir / "plots" / "rounds.png", ns.plot)


if __name__ == "__main__":
    main()
