"""Plot a finished run's learning curves from its MLflow store (issue 9, figure 2).

    python bench/learning_curve.py --tracking-uri sqlite:///mlflow.db --run-id RUN --out docs/img/smollm2_hh_learning.png

Four panels against the optimizer step: reward accuracy, reward margin, and the chosen and rejected
log-probs (the "chosen log-probs fall too" effect DPO users ask about), each for the training
batches (thin) and the held-out pairs (dots, ``eval_`` metrics). Prints the final values as JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [
    ("rewards/accuracies", "reward accuracy"),
    ("rewards/margins", "reward margin (chosen - rejected)"),
    ("logps/chosen", "log-prob of chosen (sum over tokens)"),
    ("logps/rejected", "log-prob of rejected (sum over tokens)"),
]


def history(client, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    ns = p.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ns.tracking_uri)
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    final: dict[str, float] = {}
    for ax, (key, label) in zip(axes.flat, PANELS):
        steps, values = history(client, ns.run_id, key)
        ax.plot(steps, values, lw=0.8, alpha=0.6, label="train batch")
        e_steps, e_values = history(client, ns.run_id, "eval_" + key)
        ax.plot(e_steps, e_values, "o-", lw=1.5, label="held out")
        if e_values:
            final["eval_" + key] = e_values[-1]
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(ns.title, fontsize=11)
    fig.tight_layout()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(ns.out, dpi=110)
    print(json.dumps(final, indent=1))


if __name__ == "__main__":
    main()
