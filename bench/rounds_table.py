"""The table of an online run's rounds, read from its output folder (``raydpo.online.rounds``):
per policy (0 = the initial one) its held-out score, win rate and KL against the initial policy,
and per round the training samples' score, pairs, generation speed and sync seconds.

    python bench/rounds_table.py OUTPUT_DIR [--plot DEST.png]

``--plot`` copies the run's rounds plot (``OUTPUT_DIR/plots/rounds.png``) to DEST.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--plot", type=Path)
    ns = parser.parse_args()
    print(table(ns.output_dir))
    if ns.plot:
        shutil.copyfile(ns.output_dir / "plots" / "rounds.png", ns.plot)


if __name__ == "__main__":
    main()
